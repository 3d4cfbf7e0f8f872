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
        default=DEFAULT_CACHE_MB,
        show_default=True,
        help="Cluster cache size in MiB.",
    )(f)


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--output", type=click.Choice(["human", "json"]), default="human", show_default=True
    )(f)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))
