"""Options and helpers shared by the commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from vdisk.api import DEFAULT_CACHE_MB, parse_size


class SizeType(click.ParamType):
    """Sizes like 20G, 512M, 4k."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except Exception as e:  # UsageError: turn it into click's message
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def format_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-f",
        "--format",
        "fmt",
        default=None,
        help="Image format (default: probe). qemu-img names work too.",
    )(f)


def cache_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache-mb",
        type=float,
        default=None,
        help=f"Cluster cache size in MiB (default {DEFAULT_CACHE_MB}; 0 for raw images, "
        "which the host's page cache serves).",
    )(f)


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--output", type=click.Choice(["human", "json"]), default="human", show_default=True
    )(f)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


class progress_bar:
    """A rich progress bar on stderr when it is a terminal (or forced with -p); a
    callable (done, total) for the operations in vdisk.ops."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        import sys

        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> progress_bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-p",
        "--progress",
        "progress",
        is_flag=True,
        default=None,
        help="Show a progress bar (default: when stderr is a terminal).",
    )(f)


def parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    """-o key=value[,key=value] as qemu-img takes them."""
    from vdisk.errors import UsageError

    out: dict[str, Any] = {}
    for item in items:
        for kv in item.split(","):
            if not kv:
                continue
            if "=" not in kv:
                out[kv] = True
                continue
            k, v = kv.split("=", 1)
            val: Any = v
            if v.lower() in ("on", "true", "yes"):
                val = True
            elif v.lower() in ("off", "false", "no"):
                val = False
            elif k in ("cluster_size", "block_size", "subcluster_size"):
                val = parse_size(v)
            if not k:
                raise UsageError(f"bad option {kv!r} (expected key=value)")
            out[k] = val
    return out
