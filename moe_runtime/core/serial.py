"""The integrity rule for every file this project writes, and msgpack decoded with limits.

msgpack is the only serialisation read from disk (never pickle), and it is only ever decoded here:

- `unpack_limited(raw)`: exactly one msgpack object, nothing after it. Before msgpack allocates
  anything, a structural scan walks the bytes and refuses truncated data, trailing data, ext
  types, nesting deeper than MAX_DEPTH, and more objects than the budget: by default
  `object_budget(len(raw))` = 4096 + len(raw) // 8 (a manifest holds about one object per 8+
  bytes), and callers that know their format pass less (a sealed envelope: 16 objects; a trace
  body: 65536). The budget is what bounds memory: a decoded object costs at most ~72 bytes of
  Python overhead beyond its payload, so a file of S bytes decodes into at most ~10 S + 0.3 MB,
  whatever its content (8 MB of nested empty arrays used to cost 500 MB and 15 s; now the scan
  refuses it in ~0.2 s without allocating).
- `seal(body, fmt, version)` / `unseal(raw, fmt, version)`: the envelope every file format uses,
  {"format", "version", "sha256", "body"}, where body is the msgpack encoding of the content and
  sha256 covers (format, version, body). Unsealing checks format, version and digest BEFORE the
  body is decoded, so one flipped bit anywhere is refused, never loaded as a different value.
"""
from __future__ import annotations

import hashlib
from typing import Any

import msgpack

MAX_DEPTH = 32
"""Deepest nesting of arrays/maps any of our formats needs is < 8."""
BASE_OBJECTS = 4096
"""Objects any file may hold regardless of its size."""
ENVELOPE_OBJECTS = 16
"""A sealed envelope is a map of 4 keys and 4 scalar values."""
DIGEST = "sha256"


class DecodeError(ValueError):
    """Bytes that are not exactly one well-formed msgpack object within the limits, or a sealed file
    whose format, version or digest does not check out. The message names the file."""


def object_budget(nbytes: int) -> int:
    """Most msgpack objects (containers, scalars, strings) a file of nbytes may decode into."""
    return BASE_OBJECTS + nbytes // 8


# Fixed-size msgpack types: first byte -> total size in bytes (header + payload).
_FIXED = {0xc0: 1, 0xc2: 1, 0xc3: 1, 0xca: 5, 0xcb: 9, 0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9,
          0xd0: 2, 0xd1: 3, 0xd2: 5, 0xd3: 9}
# Variable-length str/bin: first byte -> width of the big-endian length that follows.
_SIZED = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xd9: 1, 0xda: 2, 0xdb: 4}
# array16/32, map16/32: first byte -> (width of the count, items per count).
_CONTAINERS = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}


def _scan(raw: bytes, what: str, max_objects: int) -> None:
    """Walk one msgpack object's structure without building it; refuse what unpack must not see."""
    n, i, objects = len(raw), 0, 0
    remaining, stack = 1, []  # items left at the current nesting level, and at the enclosing ones
    while remaining:
        if i >= n:
            raise DecodeError(f"{what} is truncated ({n} bytes): an object is incomplete")
        b = raw[i]
        objects += 1
        if objects > max_objects:
            raise DecodeError(f"{what} holds more than {max_objects} msgpack objects for its {n} bytes; "
                              f"refused (a decompression bomb or a corrupted file)")
        remaining -= 1
        count = 0
        if b <= 0x7f or b >= 0xe0:  # positive / negative fixint
            i += 1
        elif b <= 0x8f:  # fixmap
            count, i = 2 * (b & 0x0f), i + 1
        elif b <= 0x9f:  # fixarray
            count, i = b & 0x0f, i + 1
        elif b <= 0xbf:  # fixstr
            i += 1 + (b & 0x1f)
        elif b in _FIXED:
            i += _FIXED[b]
        elif b in _SIZED:
            w = _SIZED[b]
            i += 1 + w + int.from_bytes(raw[i + 1:i + 1 + w], "big")
        elif b in _CONTAINERS:
            w, per = _CONTAINERS[b]
            count, i = per * int.from_bytes(raw[i + 1:i + 1 + w], "big"), i + 1 + w
        elif b == 0xc1:
            raise DecodeError(f"{what} is not valid msgpack (byte 0xc1 at offset {i} is never used)")
        else:  # ext types: none of our formats writes them
            raise DecodeError(f"{what} is not valid msgpack for this project (ext type 0x{b:02x} at offset {i})")
        if count:
            if count > n - i:  # every item takes at least one byte
                raise DecodeError(f"{what} is truncated or corrupted: a container at offset {i} claims "
                                  f"{count} items with {n - i} bytes left")
            if len(stack) >= MAX_DEPTH:
                raise DecodeError(f"{what} nests deeper than {MAX_DEPTH} levels; refused")
            stack.append(remaining)
            remaining = count
        while not remaining and stack:
            remaining = stack.pop()
    if i > n:
        raise DecodeError(f"{what} is truncated ({n} bytes): the last object needs {i} bytes")
    if i < n:
        raise DecodeError(f"{what} has {n - i} trailing bytes after the first object")


def unpack_limited(raw: bytes, max_bytes: int, what: str = "msgpack data", max_objects: int | None = None) -> Any:
    """Decode exactly one msgpack object from raw, refusing oversized, truncated or trailing data.

    Every limit derives from len(raw) (see module docstring). strict_map_key=True: map keys must
    be str/bytes; raw=False: strings decode as UTF-8.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise DecodeError(f"{what} is {type(raw).__name__}, expected bytes")
    n = len(raw)
    if n > max_bytes:
        raise DecodeError(f"{what} is {n} bytes, over the {max_bytes}-byte limit")
    _scan(raw, what, object_budget(n) if max_objects is None else max_objects)
    try:
        return msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, use_list=True, max_bin_len=n,
                               max_str_len=n, max_array_len=n, max_map_len=n, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DecodeError(f"{what} is not valid msgpack ({type(e).__name__}: {e})") from None


def _digest(fmt: str, version: int, body: bytes) -> bytes:
    """sha256 over (format, version) then the body, fed incrementally (no copy of a large body)."""
    h = hashlib.sha256(msgpack.packb([fmt, version], use_bin_type=True))
    h.update(body)
    return h.digest()


def seal(body: Any, fmt: str, version: int) -> bytes:
    """The bytes of a sealed file: body encoded, with a digest over format, version and body."""
    return seal_packed(msgpack.packb(body, use_bin_type=True), fmt, version)


def seal_packed(payload: bytes, fmt: str, version: int) -> bytes:
    """seal() for a body already encoded as msgpack bytes (tests seal hand-made bodies with it)."""
    return msgpack.packb({"format": fmt, "version": version, DIGEST: _digest(fmt, version, payload),
                          "body": payload}, use_bin_type=True)


def unseal(raw: bytes, fmt: str, version: int, what: str, max_bytes: int, max_objects: int | None = None) -> Any:
    """The body of a sealed file, after its format, version and digest check out.
    max_objects: the body's object budget (default object_budget of its size)."""
    env = unpack_limited(raw, max_bytes, what, ENVELOPE_OBJECTS)
    if not isinstance(env, dict) or env.get("format") != fmt:
        got = env.get("format") if isinstance(env, dict) else type(env).__name__
        raise DecodeError(f"{what} is not a {fmt} file (format {got!r})")
    if env.get("version") != version or isinstance(env.get("version"), bool):
        hint = (" (written before files carried digests; re-create it with this version)"
                if isinstance(env.get("version"), int) and env["version"] < version else "")
        raise DecodeError(f"{what} has {fmt} version {env.get('version')!r}; this build reads version "
                          f"{version}{hint}")
    if set(env) != {"format", "version", DIGEST, "body"}:
        raise DecodeError(f"{what}: envelope keys {sorted(env)} are not format, version, {DIGEST}, body")
    body, digest = env["body"], env[DIGEST]
    if not isinstance(body, bytes) or not isinstance(digest, bytes):
        raise DecodeError(f"{what}: envelope fields body/{DIGEST} must be bytes")
    if digest != _digest(fmt, version, body):
        raise DecodeError(f"{what} fails its {DIGEST} digest: the file is corrupted")
    return unpack_limited(body, max_bytes, what, max_objects)


def file_digest(path: Any, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
