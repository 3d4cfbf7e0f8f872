"""Commands on backing chains: clone, commit, rebase, flatten."""

from __future__ import annotations

import click

from vdisk import api, ops
from vdisk.cli.common import (
    cache_option,
    format_option,
    parse_options,
    progress_bar,
    progress_option,
)


@click.command()
@click.argument("base")
@click.argument("new")
@click.option(
    "-f", "--format", "fmt", default="vdisk", show_default=True, help="Format of the new clone."
)
@click.option(
    "-F", "--base-format", default=None, help="Format of BASE (recorded; probed once if not given)."
)
@click.option(
    "-o", "--option", "opts", multiple=True, help="Format options, key=value[,key=value]."
)
def clone(base: str, new: str, fmt: str, base_format: str | None, opts: tuple[str, ...]) -> None:
    """Make NEW a linked clone of BASE: reads fall through, writes stay in NEW."""
    api.clone(base, new, format=fmt, base_format=base_format, options=parse_options(opts))
    click.echo(f"{new}: clone of {base}")


@click.command()
@click.argument("overlay")
@progress_option
@cache_option
def commit(overlay: str, progress: bool | None, cache_mb: float | None) -> None:
    """Merge OVERLAY's own data into its backing image."""
    with progress_bar("commit", progress) as bar:
        n = ops.commit(overlay, progress=bar, cache_mb=cache_mb)
    click.echo(f"Image committed ({n} bytes copied).")


@click.command()
@click.argument("image")
@click.option("-b", "--backing", "new_base", required=True, help="New backing image ('' for none).")
@click.option("-F", "--backing-format", default=None, help="Format of the new backing image.")
@click.option(
    "-u",
    "--unsafe",
    is_flag=True,
    help="Only rewrite the reference; do not keep the guest content.",
)
@progress_option
@cache_option
@format_option
def rebase(
    image: str,
    new_base: str,
    backing_format: str | None,
    unsafe: bool,
    progress: bool | None,
    cache_mb: float | None,
    fmt: str | None,
) -> None:
    """Change IMAGE's backing image, keeping its guest content (unless -u)."""
    with progress_bar("rebase", progress) as bar:
        n = ops.rebase(
            image,
            new_base or None,
            new_format=backing_format,
            unsafe=unsafe,
            progress=bar,
            cache_mb=cache_mb,
        )
    click.echo(f"{image}: rebased onto {new_base or '(none)'} ({n} bytes copied in)")


@click.command()
@click.argument("image")
@progress_option
@cache_option
def flatten(image: str, progress: bool | None, cache_mb: float | None) -> None:
    """Copy everything from the backing chain into IMAGE and drop the reference."""
    with progress_bar("flatten", progress) as bar:
        n = ops.flatten(image, progress=bar, cache_mb=cache_mb)
    click.echo(f"{image}: flattened ({n} bytes copied in)")
