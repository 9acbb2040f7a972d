"""ROK4 object links: an object whose whole content is ``SYMLINK#<bucket>/<key>``.

ROK4 writes them instead of copying unchanged slabs when it updates a pyramid by reference. They
are always shorter than 2048 bytes, so a slab-index read (``[0, 2048 + 8N)``) of a link comes
back short and starting with the signature: that is how readers recognise them without a HEAD.
"""

from __future__ import annotations

SIGNATURE = b"SYMLINK#"
MAX_LINK_SIZE = 2047  # "les objets symboliques ne font jamais plus de 2047 octets"


def encode_link(bucket: str, key: str) -> bytes:
    return SIGNATURE + f"{bucket}/{key}".encode()


def may_be_link(data: bytes, offset: int | None, size: int | None) -> bool:
    """Whether this read result could come from a link object and deserves a closer look.

    A full-size read is never a link; a short read at offset 0 must start with the signature; a
    short read elsewhere (416 past the end of a tiny object, say) only says "check the head".
    """
    if len(data) > MAX_LINK_SIZE:
        return False
    if size is not None and len(data) >= size:
        return False
    if not offset:
        return data.startswith(SIGNATURE)
    return True


def decode_link(data: bytes) -> tuple[str, str] | None:
    """(bucket, key) of a link object's content, or None when it is not a link."""
    if not data.startswith(SIGNATURE) or len(data) > MAX_LINK_SIZE:
        return None
    try:
        target = data[len(SIGNATURE) :].decode().strip()
    except UnicodeDecodeError:
        return None
    bucket, _, key = target.partition("/")
    if not bucket or not key:
        return None
    return bucket, key
