"""Command-line value types shared by every verb: integers that fit the Caffe field they land in."""

from __future__ import annotations

import argparse

INT32 = (-(1 << 31), (1 << 31) - 1)


def int32(text: str) -> int:
    """An integer Caffe keeps in an int32 field (max_iter, level, sizes): refused by argparse with one line
    when it does not fit, instead of a protobuf ValueError deep inside."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not INT32[0] <= value <= INT32[1]:
        raise argparse.ArgumentTypeError(f"{text} does not fit a 32-bit integer ({INT32[0]}..{INT32[1]})")
    return value
