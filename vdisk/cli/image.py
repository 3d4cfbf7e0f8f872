"""Commands on one image: create, info, check, map, resize, compact, scrub, snapshot."""

from __future__ import annotations

import datetime
import sys
from typing import Any

import click

from vdisk import api, ops, runtime
from vdisk.api import format_size, parse_size
from vdisk.cli.common import (
    SIZE,
    cache_option,
    echo_json,
    format_option,
    output_option,
    parse_options,
    progress_bar,
    progress_option,
)
from vdisk.errors import ImageLocked, UsageError, VdiskError, describe


@click.command()
@click.argument("image")
@click.argument("size", required=False)
@click.option(
    "-f", "--format", "fmt", default="vdisk", show_default=True, help="Format of the new image."
)
@click.option(
    "-c",
    "--cluster-size",
    type=SIZE,
    default=None,
    help="Cluster size (vdisk: 4K..2M, default 64K).",
)
@click.option(
    "-b", "--backing", default=None, help="Backing image: the new image is an overlay of it."
)
@click.option(
    "-F",
    "--backing-format",
    default=None,
    help="Format of the backing image (recorded; probed once if not given).",
)
@click.option(
    "-o", "--option", "opts", multiple=True, help="Format options, key=value[,key=value]."
)
def create(
    image: str,
    size: str | None,
    fmt: str,
    cluster_size: int | None,
    backing: str | None,
    backing_format: str | None,
    opts: tuple[str, ...],
) -> None:
    """Create IMAGE of SIZE (20G, 512M, 4096); with -b, SIZE defaults to the base's size."""
    if size is None and backing is None:
        raise UsageError("create: a SIZE is needed (e.g. 20G), or -b BACKING to take it from")
    api.create(
        image,
        parse_size(size) if size is not None else None,  # type: ignore[arg-type]
        format=fmt,
        cluster_size=cluster_size,
        backing=backing,
        backing_format=backing_format,
        options=parse_options(opts),
    )
    click.echo(
        f"Formatting '{image}', fmt={fmt}"
        + (f" size={parse_size(size)}" if size else "")
        + (f" backing_file={backing}" if backing else "")
    )


def _fmt_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


@click.command()
@click.argument("image")
@format_option
@output_option
@click.option(
    "-U",
    "--force-share",
    is_flag=True,
    help="Read even if another process has the image open for writing.",
)
@click.option("--stats", is_flag=True, help="Also print cache and metadata counters.")
def info(image: str, fmt: str | None, output: str, force_share: bool, stats: bool) -> None:
    """Show an image: format, sizes, snapshots and the whole backing chain."""
    live = runtime.read_published(image) if stats else None
    share = force_share or live is not None
    try:
        d = api.open(image, format=fmt, readonly=True, force_share=share)
    except ImageLocked:
        if not stats:
            raise
        # held by a mount or server that has not published its counters yet: read the
        # image anyway (the counters are what was asked for) and say where they are from
        d = api.open(image, format=fmt, readonly=True, force_share=True)
    with d:
        data = d.info()
        if live is not None:
            data["stats"] = live["stats"]
            data["stats-source"] = f"{live['front_end']} (pid {live['pid']})"
        elif stats:
            data["stats"] = d.stats()
            data["stats-source"] = "this process (no live counters published for this image)"
    if output == "json":
        echo_json(data)
        return
    click.echo(f"image: {data['filename']}")
    click.echo(f"file format: {data['format']}")
    click.echo(f"virtual size: {format_size(data['virtual-size'])} ({data['virtual-size']} bytes)")
    click.echo(f"disk size: {format_size(data['actual-size'])}")
    click.echo(f"cluster_size: {data['cluster-size']}")
    if "backing-filename" in data:
        click.echo(f"backing file: {data['backing-filename']}")
        if data.get("backing-filename-format"):
            click.echo(f"backing file format: {data['backing-filename-format']}")
    for i, b in enumerate(data["backing-chain"], 1):
        click.echo(
            f"backing chain {i}: {b['filename']} ({b['format']}, {format_size(b['virtual-size'])})"
        )
    if data["snapshots"]:
        click.echo("Snapshot list:")
        click.echo(f"{'ID':<6}{'TAG':<24}{'VM SIZE':>10}  {'DATE':<20}  VIRTUAL SIZE")
        for s in data["snapshots"]:
            click.echo(
                f"{s['id']:<6}{s['name']:<24}{s['vm-state-size']:>10}  {_fmt_time(s['date']):<20}  {format_size(s['virtual-size'])}"
            )
    spec = data.get("format-specific") or {}
    if spec:
        click.echo("Format specific information:")
        for k, v in spec.items():
            if k in ("created", "modified") and isinstance(v, (int, float)):
                v = _fmt_time(v)
            click.echo(f"    {k}: {v}")
    if stats:
        click.echo(f"Cache statistics ({data.get('stats-source', 'this process')}):")
        for group, counters in data["stats"].items():
            for k, v in (counters or {}).items():
                click.echo(f"    {group}.{k}: {v}")


@click.command()
@click.argument("image")
@format_option
@output_option
@click.option("-r", "--repair", is_flag=True, help="Repair leaks (space allocated but not used).")
def check(image: str, fmt: str | None, output: str, repair: bool) -> None:
    """Verify every checksum and the space accounting. Exit 0 clean, 2 corrupt, 3 leaks only."""
    try:
        with api.open(image, format=fmt, readonly=not repair) as d:
            report = d.check(repair=repair)
    except VdiskError as e:
        from vdisk.errors import BackingMismatch, CorruptImage

        if isinstance(e, (CorruptImage, BackingMismatch)):
            if output == "json":
                echo_json({"filename": image, "check-errors": 1, "corruptions": [describe(e)]})
            else:
                click.echo(f"ERROR: {describe(e)}", err=True)
                click.echo("1 errors were found on the image.")
            sys.exit(2)
        raise
    if output == "json":
        echo_json(
            {
                "filename": image,
                "checked": report.checked,
                "corruptions": report.corruptions,
                "leaks": report.leaks,
                "repaired": report.repaired,
                **report.info,
            }
        )
    else:
        if not report.checked:
            click.echo(f"This image format does not support checks: {image}")
        for c in report.corruptions:
            click.echo(f"ERROR: {c}")
        for leak in report.leaks:
            click.echo(f"Leaked: {leak}")
        for r in report.repaired:
            click.echo(f"Repaired: {r}")
        if report.checked:
            if report.corruptions:
                click.echo(
                    f"\n{len(report.corruptions)} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it."
                )
            elif report.leaks:
                click.echo(
                    f"\n{len(report.leaks)} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."
                )
            else:
                click.echo("No errors were found on the image.")
    sys.exit(report.exit_code)


@click.command("map")
@click.argument("image")
@format_option
@output_option
def map_(image: str, fmt: str | None, output: str) -> None:
    """Show which guest ranges hold data, zeros, or nothing, and at which chain depth."""
    with api.open(image, format=fmt, readonly=True) as d:
        runs = d.map()
    if output == "json":
        echo_json(runs)
        return
    click.echo(f"{'Offset':<20}{'Length':<20}{'Kind':<8}Depth")
    for r in runs:
        kind = "data" if r["data"] else "zero"
        depth = "" if r["depth"] is None else str(r["depth"])
        click.echo(f"{r['start']:<#20x}{r['length']:<#20x}{kind:<8}{depth}")


@click.command()
@click.argument("image")
@click.argument("size")
@format_option
@click.option("--shrink", is_flag=True, help="Allow shrinking (data past the new end is lost).")
def resize(image: str, size: str, fmt: str | None, shrink: bool) -> None:
    """Grow or shrink the virtual disk: SIZE, +SIZE or -SIZE."""
    with api.open(image, format=fmt, readonly=True) as d:
        current = d.size
    if size.startswith("+"):
        new = current + parse_size(size[1:])
    elif size.startswith("-"):
        new = current - parse_size(size[1:])
    else:
        new = parse_size(size)
    if new < 0:
        raise UsageError(f"resize: new size would be negative ({new})")
    got = ops.resize(image, new, fmt=fmt, shrink=shrink)
    note = "" if got == new else f" (the format rounds {new} up)"
    click.echo(f"Image resized to {got} bytes{note}.")


@click.command()
@click.argument("image")
@format_option
def compact(image: str, fmt: str | None) -> None:
    """Give space freed by discards, zeroes and deleted snapshots back to the host."""
    with api.open(image, format=fmt) as d:
        before = d.info()["actual-size"]
        released = d.driver.compact()
        d.flush()
        after = d.info()["actual-size"]
    click.echo(
        f"{image}: released {format_size(max(released, before - after))} (now {format_size(after)} on disk)"
    )


@click.command()
@click.argument("image")
@format_option
@progress_option
@output_option
def scrub(image: str, fmt: str | None, progress: bool | None, output: str) -> None:
    """Read and verify every stored cluster; names each bad one. Exit 2 if any is bad."""
    with progress_bar("scrub", progress) as bar:
        res = ops.scrub(image, fmt=fmt, progress=bar)
    if output == "json":
        echo_json({"filename": image, "bytes-read": res.bytes_read, "errors": res.errors})
    else:
        for e in res.errors:
            click.echo(f"ERROR: {e}")
        click.echo(
            f"{image}: {format_size(res.bytes_read)} verified, {len(res.errors)} bad cluster(s)"
        )
    sys.exit(2 if res.errors else 0)


@click.group()
def snapshot() -> None:
    """Internal snapshots: create, list, revert, delete."""


def _snap_open(image: str, fmt: str | None, readonly: bool, cache_mb: float | None) -> api.Disk:
    return api.open(image, format=fmt, readonly=readonly, cache_mb=cache_mb)


@snapshot.command("create")
@click.argument("image")
@click.argument("name")
@format_option
@cache_option
def snap_create(image: str, name: str, fmt: str | None, cache_mb: float | None) -> None:
    """Save the current state of IMAGE as snapshot NAME (no data is copied)."""
    with _snap_open(image, fmt, False, cache_mb) as d:
        s = d.snapshots.create(name)
    click.echo(f"snapshot '{s.name}' created (id {s.id})")


@snapshot.command("list")
@click.argument("image")
@format_option
@output_option
def snap_list(image: str, fmt: str | None, output: str) -> None:
    """List the snapshots of IMAGE."""
    with api.open(image, format=fmt, readonly=True) as d:
        snaps = d.snapshots.list()
    rows: list[dict[str, Any]] = [s.as_dict() for s in snaps]
    if output == "json":
        echo_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Snapshots of {image}")
    for col in ("ID", "NAME", "DATE", "VIRTUAL SIZE"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["id"]), r["name"], _fmt_time(r["date"]), format_size(r["virtual-size"]))
    Console().print(t)


@snapshot.command("revert")
@click.argument("image")
@click.argument("name")
@format_option
def snap_revert(image: str, name: str, fmt: str | None) -> None:
    """Make snapshot NAME the current state of IMAGE (what was written since is dropped)."""
    with _snap_open(image, fmt, False, 0) as d:
        d.snapshots.revert(name)
    click.echo(f"reverted {image} to snapshot '{name}'")


@snapshot.command("delete")
@click.argument("image")
@click.argument("name")
@format_option
def snap_delete(image: str, name: str, fmt: str | None) -> None:
    """Delete snapshot NAME; clusters only it used are freed."""
    with _snap_open(image, fmt, False, 0) as d:
        d.snapshots.delete(name)
    click.echo(f"deleted snapshot '{name}' of {image}")
