"""convert and compare, between any pair of formats."""

from __future__ import annotations

import sys

import click

from vdisk import formats, ops
from vdisk.cli.common import (
    SIZE,
    cache_option,
    echo_json,
    output_option,
    parse_options,
    progress_bar,
    progress_option,
)
from vdisk.errors import UsageError


def _guess_out_format(dst: str) -> str:
    for d in formats.drivers():
        if d.can_create and any(dst.endswith(ext) for ext in d.extensions):
            return d.name
    return "vdisk"


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("-f", "--format", "src_format", default=None, help="Format of SRC (default: probe).")
@click.option(
    "-O",
    "--output-format",
    "out_format",
    default=None,
    help="Format of DST (vdisk or qemu-img names; default from the extension, else vdisk).",
)
@click.option(
    "-c",
    "--compress",
    is_flag=True,
    help="Write the compressed form: vdisk zstd clusters (lz4 is the default), "
    "qcow2 compressed clusters (deflate, or zstd with -o compression_type=zstd), "
    "vmdk streamOptimized.",
)
@click.option(
    "-o", "--option", "opts", multiple=True, help="Options of the output format, key=value[,...]."
)
@click.option("--cluster-size", type=SIZE, default=None)
@click.option(
    "-B",
    "--backing",
    default=None,
    help="Write DST as an overlay of this image (only differences stored).",
)
@click.option("-F", "--backing-format", default=None)
@click.option(
    "--verify", is_flag=True, help="Read both back and compare checksums of the guest content."
)
@click.option(
    "-t",
    "--cache-mode",
    type=click.Choice(ops.CACHE_MODES),
    default="writeback",
    show_default=True,
    help="As qemu-img's -t: writeback syncs DST at the end; unsafe never syncs it "
    "(qemu-img convert's default: faster, but a host crash may leave DST torn).",
)
@progress_option
@cache_option
def convert(
    src: str,
    dst: str,
    src_format: str | None,
    out_format: str | None,
    compress: bool,
    opts: tuple[str, ...],
    cluster_size: int | None,
    backing: str | None,
    backing_format: str | None,
    verify: bool,
    cache_mode: str,
    progress: bool | None,
    cache_mb: float | None,
) -> None:
    """Copy SRC into a new image DST, in any format vdisk writes."""
    fmt = formats.get(out_format).name if out_format else _guess_out_format(dst)
    options = parse_options(opts)
    with progress_bar("convert", progress) as bar:
        res = ops.convert(
            src,
            dst,
            out_format=fmt,
            src_format=src_format,
            options=options,
            cluster_size=cluster_size,
            backing=backing,
            backing_format=backing_format,
            verify=verify,
            progress=bar,
            cache_mb=cache_mb,
            compress=compress,
            cache_mode=cache_mode,
        )
    if verify:
        click.echo(f"verified: guest content identical (xxh3-128 {res.checksum})")


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("-f", "--format-a", default=None)
@click.option("-F", "--format-b", default=None)
@click.option("-s", "--strict", is_flag=True, help="Differing sizes are a difference.")
@progress_option
@output_option
def compare(
    a: str,
    b: str,
    format_a: str | None,
    format_b: str | None,
    strict: bool,
    progress: bool | None,
    output: str,
) -> None:
    """Compare guest content: exit 0 identical, 1 different (the first offset is shown)."""
    if a == b and a != "-":
        raise UsageError("compare: give two images")
    with progress_bar("compare", progress) as bar:
        res = ops.compare(a, b, fmt_a=format_a, fmt_b=format_b, strict=strict, progress=bar)
    if output == "json":
        echo_json(
            {
                "identical": res.identical,
                "first-difference": res.first_difference,
                "size-a": res.size_a,
                "size-b": res.size_b,
            }
        )
    elif res.identical:
        click.echo("Images are identical.")
    else:
        for m in res.messages:
            click.echo(m)
        click.echo(f"Content mismatch at offset {res.first_difference}!")
    sys.exit(0 if res.identical else 1)
