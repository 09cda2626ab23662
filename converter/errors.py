"""The one exception type for user mistakes.

The CLI catches :class:`CaffeError`, prints its message as a single line and exits with code 2;
anything else escaping is an internal bug and may traceback.
"""

from collections.abc import Iterator
from contextlib import contextmanager

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: "\\t"} | {
    c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


class CaffeError(Exception):
    """A user-facing error: bad file, bad field, shapes that do not fit, missing data.

    Its message is always one line: names read from a file (a layer called 'a\\nb', a path with a tab) are
    quoted into it, so control characters and line separators are written as escapes."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(str(message).translate(_CONTROL), *args)


def format_shape(shape: tuple[int, ...] | list[int]) -> str:
    """``2x3x4``, or ``scalar`` for a 0-axis blob: how every message writes a shape."""
    return "x".join(map(str, shape)) or "scalar"


def layer_error(layer_name: str, layer_type: str, message: str) -> CaffeError:
    """An error that names the layer it happened in, as every build-time check should."""
    return CaffeError(f"layer '{layer_name}' ({layer_type}): {message}")


@contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Re-raise a CaffeError from the block with ``prefix: `` in front (e.g. the database a bad record is in)."""
    try:
        yield
    except CaffeError as e:
        if str(e).startswith(f"{prefix}: ") or str(e).startswith(prefix + " "):
            raise  # the message names the same place already
        raise CaffeError(f"{prefix}: {e}") from None
