"""`vdisk serve IMAGE [IMAGE ...]`: the NBD front end on the command line."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import urllib.parse
from typing import Any

import click

from vdisk.cli.common import cache_option, format_option
from vdisk.errors import UsageError, VdiskError, describe

log = logging.getLogger("vdisk.nbd")


def _setup_logging(verbose: int, logfile: str | None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("vdisk serve: %(message)s"))
    root = logging.getLogger("vdisk")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


def check_bind(host: str, allow_remote: bool) -> list[str]:
    """Refuse an address other machines can reach unless the user said so: without
    client certificates (--tls-ca) whoever connects can read and write the disk. Returns
    the addresses other machines can reach."""
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--bind {host!r}: cannot resolve: {e.strerror}") from None
    remote = [
        str(ai[4][0])
        for ai in infos
        if not ipaddress.ip_address(str(ai[4][0]).split("%")[0]).is_loopback
    ]
    if remote and not allow_remote:
        raise UsageError(
            f"--bind {host!r} is reachable from other machines ({remote[0]}) and NBD has no "
            "authentication without --tls-ca: pass --allow-remote to do it anyway"
        )
    return remote


def _url(host: str, port: int, name: str, tls: bool = False) -> str:
    """The URI qemu and libnbd take; ``port`` 0 means ``host`` is a Unix socket's path."""
    scheme = "nbds" if tls else "nbd"
    path = urllib.parse.quote(name, safe="@")
    if not port:
        return f"{scheme}+unix:///{path}?socket={urllib.parse.quote(host)}"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{path}"


def _tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """The server's TLS settings (TLS 1.2 or later), or None without --tls-cert."""
    if cert is None:
        if key is not None or ca is not None:
            raise UsageError("--tls-key and --tls-ca need --tls-cert")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def encrypted() -> bytes:  # instead of asking on the terminal: no prompt in a service
        raise UsageError(
            f"{key or cert}: the private key is encrypted; give vdisk serve an unencrypted "
            "key file (readable only by the server's user)"
        )

    try:
        ctx.load_cert_chain(cert, key, password=encrypted)
    except (OSError, ssl.SSLError) as e:
        what = f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else "")
        raise UsageError(
            f"{what}: cannot load the certificate and its key: {_ssl_reason(e)}"
        ) from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--tls-ca {ca}: cannot load: {_ssl_reason(e)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _ssl_reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


@click.command()
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True)
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "-p", "--port", type=int, default=10809, show_default=True, help="TCP port (0: any free one)."
)
@click.option(
    "-k",
    "--socket",
    "socket_path",
    default=None,
    metavar="PATH",
    help="Listen on this Unix socket instead of TCP: nbd+unix:///NAME?socket=PATH.",
)
@click.option(
    "--tls-cert",
    default=None,
    metavar="FILE",
    help="Require TLS of every client, with this PEM certificate (chain) of the server.",
)
@click.option("--tls-key", default=None, metavar="FILE", help="The PEM private key of --tls-cert.")
@click.option(
    "--tls-ca",
    default=None,
    metavar="FILE",
    help="Also require a client certificate signed by a CA in this PEM file.",
)
@click.option("-r", "--read-only", "readonly", is_flag=True, help="Refuse every write.")
@click.option(
    "--export-snapshots",
    is_flag=True,
    help="Also serve each internal snapshot of the images, read-only, as IMAGE@SNAPSHOT.",
)
@click.option(
    "-s",
    "--snapshot",
    is_flag=True,
    help="Writes go to a throw-away overlay; the images are unchanged afterwards.",
)
@format_option
@cache_option
@click.option(
    "--allow-remote", is_flag=True, help="Allow --bind to an address other machines can reach."
)
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Worker threads for slow or large disk calls.",
)
@click.option("--pid-file", default=None, help="Write the server's pid here once it is ready.")
@click.option("--log", "logfile", default=None, help="Write messages to this file.")
@click.option("-v", "--verbose", count=True, help="Log connections (-vv: every failed request).")
def serve(
    images: tuple[str, ...],
    bind: str,
    port: int,
    socket_path: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    readonly: bool,
    export_snapshots: bool,
    snapshot: bool,
    fmt: str | None,
    cache_mb: float | None,
    allow_remote: bool,
    threads: int,
    pid_file: str | None,
    logfile: str | None,
    verbose: int,
) -> None:
    """Serve IMAGEs over NBD, each as an export named after its file name (with one image,
    also as the default export): qemu -drive file=nbd://127.0.0.1:10809,format=raw.

    Runs until Ctrl-C, SIGTERM or SIGHUP, then flushes and closes every image."""
    import trio

    from vdisk import api
    from vdisk.nbd.server import Export, Server

    _setup_logging(verbose, logfile)
    if readonly and snapshot:
        raise UsageError("--read-only and --snapshot do not go together")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: not a TCP port (0..65535)")
    ctx = click.get_current_context()
    if socket_path is not None:
        tcp = [f"--{n.replace('_', '-')}" for n in ("bind", "port", "allow_remote")
               if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]  # fmt: skip
        if tcp:
            raise UsageError(
                f"--socket and {tcp[0]} do not go together (a Unix socket has no address)"
            )
        if not socket_path:
            raise UsageError("--socket: empty path")
        socket_path = os.path.abspath(socket_path)
    tls = _tls_context(tls_cert, tls_key, tls_ca)
    if socket_path is None and check_bind(bind, allow_remote) and tls_ca is None:
        log.warning(
            "--bind %s: other machines can connect, and without --tls-ca anyone who does can "
            "read%s the disk%s",
            bind,
            "" if readonly else " and write",
            "" if tls is not None else " (and without --tls-cert, see every byte on the wire)",
        )
    names = [os.path.basename(os.path.normpath(p)) for p in images]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"two images would have the same export name {sorted(dup)[0]!r}")

    exports: list[Export] = []
    try:
        for path, name in zip(images, names):
            disk = api.open(
                path, format=fmt, readonly=readonly, snapshot=snapshot, cache_mb=cache_mb
            )
            exports.append(
                Export(
                    name, disk, readonly=readonly, description=f"{path} ({disk.format})", image=path
                )
            )
            if export_snapshots:
                exports += _snapshot_exports(path, name, disk)
        server = Server(
            exports, default=names[0] if len(names) == 1 else None, threads=threads, tls=tls
        )
        trio.run(_main, server, bind, port, socket_path, pid_file)
    finally:
        failed: list[str] = []
        for e in reversed(exports):
            try:
                e.disk.close()
            except VdiskError as exc:
                failed.append(f"{e.image or e.description}: {describe(exc)}")
        if pid_file:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
        if failed:
            raise VdiskError("closing failed: " + "; ".join(failed))


def _snapshot_exports(path: str, name: str, disk: Any) -> list[Any]:
    """A read-only export per internal snapshot, as FUSE shows snapshots/NAME: a backup can
    read a consistent state over NBD while the disk itself stays in use."""
    from vdisk.nbd.server import Export

    try:
        snaps = disk.snapshots.list()
    except VdiskError as e:
        log.warning("%s: no snapshots to export: %s", path, describe(e))
        return []
    out = []
    for sn in snaps:
        view = disk.snapshots.open(sn.name)
        desc = f"{path}, snapshot {sn.name!r} ({disk.format})"
        out.append(Export(f"{name}@{sn.name}", view, readonly=True, description=desc))
    return out


async def _main(
    server: Any, bind: str, port: int, socket_path: str | None, pid_file: str | None
) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            if socket_path is not None:
                listeners = await server.listen_unix(socket_path)
            else:
                listeners = await server.listen(bind, port)
        except OSError as e:
            where = socket_path if socket_path is not None else f"{bind}:{port}"
            raise VdiskError(f"cannot listen on {where}: {e.strerror or e}") from None
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(server.serve, listeners)
            host, real_port = addrs[0]
            for export in server.exports.values():
                also = ""
                tls = server.tls is not None
                if server.default == export.name:
                    also = f" (and as the default export {_url(host, real_port, '', tls)})"
                url = _url(host, real_port, export.name, tls)
                click.echo(f"serving {export.image or export.description} as {url}{also}")
            sys.stdout.flush()
            if pid_file:
                tmp = f"{pid_file}.tmp"
                with open(tmp, "w") as f:
                    f.write(f"{os.getpid()}\n")
                os.replace(tmp, pid_file)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
