"""Commands for images in an object store: gc."""

from __future__ import annotations

import dataclasses

import click

from vdisk.api import format_size
from vdisk.cli.common import echo_json, output_option


@click.command()
@click.argument("bucket_url", metavar="s3://BUCKET")
@click.option(
    "--grace",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds: objects younger than this are never deleted (commits in progress), "
    "and a condemned pack is deleted only by a run this long after.",
)
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@output_option
def gc(bucket_url: str, grace: float, dry_run: bool, output: str) -> None:
    """Delete packs, map pages and manifests that no live manifest references.

    Live: each image's latest manifest and the manifests its snapshots name. Safe while
    other hosts write: see vdisk.formats.remote.gc for the protocol."""
    from vdisk.errors import UsageError
    from vdisk.formats.remote import gc as run_gc

    if grace < 0:
        raise UsageError(f"gc: --grace must not be negative (got {grace})")
    rep = run_gc(bucket_url, grace=grace, dry_run=dry_run)
    if output == "json":
        echo_json(dataclasses.asdict(rep))
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{rep.images} images, {rep.live_manifests} live manifests, {rep.live_packs} live packs; "
        f"{verb} {rep.deleted_packs} packs, {rep.deleted_pages} map pages, "
        f"{rep.deleted_manifests} manifests ({format_size(rep.deleted_bytes)}); "
        f"condemned {rep.condemned} packs; kept {rep.kept_young} young unreferenced packs"
    )
