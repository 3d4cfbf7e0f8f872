"""`vdisk mount IMAGE DIR` and `vdisk umount DIR`: the FUSE front end on the command line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import click

from vdisk.cli.common import cache_option, format_option
from vdisk.errors import VdiskError, describe

log = logging.getLogger("vdisk.fuse")


def _setup_logging(debug: bool, logfile: str | None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("vdisk: %(message)s"))
    root = logging.getLogger("vdisk")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if debug:
        logging.getLogger("pyfuse3").addHandler(handler)
        logging.getLogger("pyfuse3").setLevel(logging.DEBUG)


@click.command()
@click.argument("image")
@click.argument("mountpoint", metavar="DIR")
@format_option
@click.option("-r", "--read-only", "readonly", is_flag=True, help="Refuse every write.")
@click.option(
    "-s",
    "--snapshot",
    is_flag=True,
    help="Writes go to a throw-away overlay; the image is unchanged after unmount.",
)
@click.option(
    "--allow-other", is_flag=True, help="Let other users see the mount (needs user_allow_other)."
)
@click.option(
    "--fs",
    "fs",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[PARTITION]",
    help="Root only: also loop-mount the file system in PARTITION (p1, 2, disk; default: "
    "the only partition or the whole disk) at DIR/fs. Write it as --fs=p2.",
)
@click.option("--fs-dir", default=None, help="Mount the --fs file system here instead of DIR/fs.")
@click.option("-b", "--background", is_flag=True, help="Daemonize; return once the mount is ready.")
@click.option("--log", "logfile", default=None, help="Write messages to this file.")
@click.option("--debug", is_flag=True, help="Log every FUSE request.")
@cache_option
def mount(
    image: str,
    mountpoint: str,
    fmt: str | None,
    readonly: bool,
    snapshot: bool,
    allow_other: bool,
    fs: str | None,
    fs_dir: str | None,
    background: bool,
    logfile: str | None,
    debug: bool,
    cache_mb: float | None,
) -> None:
    """Mount IMAGE at DIR: DIR/disk, DIR/p1..pN (partitions), DIR/snapshots/NAME, DIR/stats.

    Runs in the foreground until Ctrl-C, SIGTERM or `vdisk umount DIR`, then writes
    everything back and unmounts."""
    from vdisk.fuse.mount import MountOptions, preflight, serve

    opts = MountOptions(
        image=image,
        mountpoint=mountpoint,
        format=fmt,
        readonly=readonly,
        snapshot=snapshot,
        allow_other=allow_other,
        fs=fs,
        fs_dir=os.path.abspath(fs_dir) if fs_dir else None,
        cache_mb=cache_mb,
    )
    preflight(opts)  # refuse early, in the caller's terminal
    if background:
        _daemonize(opts, logfile, debug)
        return
    _setup_logging(debug, logfile)

    def ready(error: VdiskError | None) -> None:
        if error is None:
            where = (
                f"; file system at {opts.fs_dir or os.path.join(mountpoint, 'fs')}" if fs else ""
            )
            click.echo(
                f"vdisk: {image} mounted at {mountpoint}{where} (Ctrl-C or `vdisk umount "
                f"{mountpoint}` to unmount)",
                err=True,
            )

    serve(opts, ready)


def _daemonize(opts: object, logfile: str | None, debug: bool) -> None:
    """Fork; the child mounts and reports readiness (or the error) through a pipe, the
    parent prints it and exits with the child's verdict."""
    from vdisk.fuse.mount import serve

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg.startswith("OK"):
            return
        if msg.startswith("ERR "):
            status, _, text = msg[4:].partition(" ")
            click.echo(f"vdisk: {text}", err=True)
            sys.exit(int(status) if status.isdigit() else 1)
        click.echo("vdisk: the mount process exited before the mount was ready", err=True)
        sys.exit(1)
    # the child: a new session, no terminal, stdio to /dev/null (or the log file)
    os.close(rfd)
    code = 0
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _setup_logging(debug, logfile)
        reported = False

        def ready(error: VdiskError | None) -> None:
            nonlocal reported
            if reported:
                return
            reported = True
            msg = "OK" if error is None else f"ERR {error.exit_code} {describe(error)}"
            with contextlib.suppress(OSError):
                os.write(wfd, msg.encode())
                os.close(wfd)

        try:
            serve(opts, ready)  # type: ignore[arg-type]
        except VdiskError as e:
            ready(e)
            code = e.exit_code
        except OSError as e:
            ready(VdiskError(describe(e)))
            code = 1
    except BaseException:
        code = 1
        log.exception("the mount process failed")
    finally:
        os._exit(code)


@click.command()
@click.argument("mountpoint", metavar="DIR")
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the mount process to write everything back.",
)
def umount(mountpoint: str, timeout: float) -> None:
    """Write everything back and unmount DIR (a `vdisk mount`, foreground or background)."""
    from vdisk.fuse.mount import unmount

    unmount(mountpoint, timeout=timeout)
