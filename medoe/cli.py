"""What every command line shares: one-line argument errors (exit 2) and `HxW`-style sizes."""

from __future__ import annotations

import argparse
import sys


class CliParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `error: ...` line (exit 2), like every other error here."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class DimsError(argparse.ArgumentTypeError, ValueError):
    """A malformed size. argparse shows an ArgumentTypeError's own message (for any other error
    of a `type=` function it says only "invalid value"); library callers catch a ValueError."""


EXAMPLES = {"HxW": "512x1024", "NxHxW": "1x512x1024", "NxHxWx3": "1x512x1024x3"}


def parse_dims(text: str, layout: str = "HxW", what: str = "size", minimum: int = 1) -> tuple[int, ...]:
    """`"512x1024"` -> (512, 1024) for layout "HxW" (also "NxHxW", "NxHxWx3"); case-insensitive."""
    parts = text.strip().lower().split("x")
    expected = f"{what} {text!r}: expected {layout} with positive integers, e.g. {EXAMPLES.get(layout, layout)}"
    if len(parts) != len(layout.split("x")) or not all(p.isdigit() for p in parts):
        raise DimsError(expected)
    values = tuple(int(p) for p in parts)
    if min(values) < 1:
        raise DimsError(expected)
    if min(values) < minimum:
        raise DimsError(f"{what} {text!r}: every side must be at least {minimum}")
    return values


def parse_hw(text: str) -> tuple[int, int]:
    """argparse `type=` for an image size HxW."""
    return parse_dims(text, "HxW")  # type: ignore[return-value]
