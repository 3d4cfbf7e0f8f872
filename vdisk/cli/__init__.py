"""The `vdisk` command, in the style of qemu-img.

Commands live in their own modules and are loaded only when used, so `vdisk info` does
not import trio or pyfuse3. Every error is turned into one line on stderr and the exit
code of its class (vdisk.errors); a traceback means a bug, never bad input.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import click

from vdisk.errors import VdiskError, describe

# name -> "module:attribute" of a click command
COMMANDS: dict[str, str] = {
    "create": "vdisk.cli.image:create",
    "info": "vdisk.cli.image:info",
    "check": "vdisk.cli.image:check",
    "map": "vdisk.cli.image:map_",
    "resize": "vdisk.cli.image:resize",
    "compact": "vdisk.cli.image:compact",
    "scrub": "vdisk.cli.image:scrub",
    "snapshot": "vdisk.cli.image:snapshot",
    "clone": "vdisk.cli.chain:clone",
    "commit": "vdisk.cli.chain:commit",
    "rebase": "vdisk.cli.chain:rebase",
    "flatten": "vdisk.cli.chain:flatten",
    "convert": "vdisk.cli.convert:convert",
    "compare": "vdisk.cli.convert:compare",
    "mount": "vdisk.cli.mount:mount",
    "umount": "vdisk.cli.mount:umount",
    "serve": "vdisk.cli.serve:serve",
    "bench": "vdisk.cli.bench:bench",
    "gc": "vdisk.cli.remote:gc",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if self._available(n))

    @staticmethod
    def _available(name: str) -> bool:
        mod = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(mod) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not self._available(name):
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vdisk")
def cli() -> None:
    """vdisk: compressed, checksummed, copy-on-write disk images; every vendor's format;
    FUSE and NBD front ends."""


def _take_endpoint(argv: list[str]) -> list[str]:
    """``--endpoint URL`` anywhere on the line: the S3 endpoint of s3:// images, for every
    command (it sets VDISK_S3_ENDPOINT, which vdisk.storage.s3 reads)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--endpoint" and i + 1 < len(argv):
            os.environ["VDISK_S3_ENDPOINT"] = argv[i + 1]
            i += 2
            continue
        if a.startswith("--endpoint="):
            os.environ["VDISK_S3_ENDPOINT"] = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the command, map errors to one line and an exit code."""
    import logging

    from vdisk import malloc

    malloc.tune()

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("vdisk: %(levelname)s: %(message)s"))
    logging.getLogger("vdisk").addHandler(handler)
    logging.getLogger("vdisk").setLevel(logging.WARNING)
    try:
        argv = _take_endpoint(list(sys.argv[1:] if argv is None else argv))
        return cli.main(args=argv, prog_name="vdisk", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vdisk: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"vdisk: {e.format_message()}", err=True)
        sys.exit(e.exit_code if e.exit_code != 1 else 2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except VdiskError as e:
        click.echo(f"vdisk: {describe(e)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("vdisk: interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        click.echo(f"vdisk: {describe(e)}", err=True)
        sys.exit(1)
