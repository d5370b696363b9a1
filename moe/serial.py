"""msgpack decoding with limits: the only way this project reads msgpack (never pickle)."""
from __future__ import annotations

from typing import Any

import msgpack


class DecodeError(ValueError):
    """Bytes that are not exactly one well-formed msgpack object within the limits."""


def unpack_limited(raw: bytes, max_bytes: int, what: str = "msgpack data") -> Any:
    """Decode exactly one msgpack object from raw, refusing oversized or trailing data.

    strict_map_key=True: map keys must be str/bytes; raw=False: strings decode as UTF-8.
    """
    if len(raw) > max_bytes:
        raise DecodeError(f"{what} is {len(raw)} bytes, over the {max_bytes}-byte limit")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(max_bytes, 1))
    try:
        unpacker.feed(raw)
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        raise DecodeError(f"{what} is truncated ({len(raw)} bytes)") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DecodeError(f"{what} is not valid msgpack ({type(e).__name__}: {e})") from None
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        return obj
    except (ValueError, TypeError, msgpack.UnpackException):
        pass
    raise DecodeError(f"{what} has trailing bytes after the first object")
