"""The one exception type for user mistakes.

The CLI catches :class:`CaffeError`, prints its message as a single line and exits with code 2;
anything else escaping is an internal bug and may traceback.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class CaffeError(Exception):
    """A user-facing error: bad file, bad field, shapes that do not fit, missing data."""


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
        raise CaffeError(f"{prefix}: {e}") from None
