"""A minimal streaming tar reader for shards: regular members only, in file order.

Python's ``tarfile`` parses every header through several layers and costs about as much as decoding a small
JPEG; this reader does only what shards need (ustar/GNU headers, GNU long names, pax ``path``), checks each
header's checksum, and raises :class:`TarFormatError` on anything truncated or malformed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512
_CHUNK = 1 << 24  # a corrupt size field must hit the end of the stream, not allocate its claimed size


class TarFormatError(ValueError):
    """The stream is not a well-formed tar archive (truncated, bad checksum, bad size field)."""


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 encoding for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise TarFormatError(f"bad numeric field {field!r}") from exc


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Read in bounded chunks, so a header claiming terabytes fails at the end of the stream instead of in
    one giant allocation (MemoryError, OverflowError)."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(min(n - got, _CHUNK))
        if not chunk:
            raise TarFormatError(f"unexpected end of archive (wanted {n} bytes, got {got})")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)  # returns a single chunk itself, without a copy


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        _, _, keyvalue = record.partition(" ")
        key, _, value = keyvalue.partition("=")
        if key == "path":
            return value
    return None


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) for every regular file of a tar stream."""
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if header == bytes(BLOCK):
            return  # end-of-archive marker
        if not header:  # every tar writer ends with the marker: without it, whole samples may be missing
            raise TarFormatError("archive ends without an end-of-archive marker (truncated between members)")
        if len(header) != BLOCK:
            raise TarFormatError("truncated header")
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarFormatError("header checksum mismatch")
        size = _octal(header[124:136])
        kind = header[156:157]
        data = _read_exact(stream, size)
        padding = -size % BLOCK
        if padding:
            _read_exact(stream, padding)
        if kind in (b"L", b"x"):
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace") if kind == b"L" else _pax_path(data)
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
        long_name = None
        yield name, data


def iter_samples(stream: BinaryIO, on_error: Callable[[Exception], None] | None = None,
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members sharing a key (file name up to the first dot) into samples.

    With ``on_error``, a broken archive is reported to it instead of raised, and the sample that was being
    read is still yielded with the members it has, so a decoder can count it.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        for name, data in iter_tar_members(stream):
            base = name.rsplit("/", 1)[-1]
            member_key, _, ext = base.partition(".")
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members[ext.lower()] = data
    except (TarFormatError, OSError, EOFError) as exc:
        if on_error is None:
            raise
        on_error(exc)
    if key is not None:
        yield key, members
