"""A streaming `multipart/form-data` reader: the file part goes straight to disk, chunk by chunk,
so a large image is never held in memory and the quota is enforced while it arrives.

Only what the platform's clients send is needed: parts with `Content-Disposition: form-data;
name=…[; filename=…]`, any part order, optional part headers.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import bad_request

MAX_HEADER = 16 << 10
MAX_FIELD = 64 << 10
_PARAM = re.compile(r';\s*([A-Za-z*]+)="?([^";]*)"?')


class Sink(Protocol):
    def write(self, data: bytes) -> object: ...  # what it returns is ignored


@dataclass
class Received:
    filename: str | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


def boundary_of(content_type: str) -> bytes:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise bad_request("the body must be multipart/form-data with the file in a part named 'file'")
    for key, value in _PARAM.findall(";" + params):
        if key.lower() == "boundary" and value:
            return value.encode("latin-1")
    raise bad_request("multipart/form-data without a boundary")


def _disposition(headers: bytes) -> tuple[str, str | None]:
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            params = dict((k.lower(), v) for k, v in _PARAM.findall(value))
            return params.get("name", ""), params.get("filename")
    raise bad_request("a multipart part has no Content-Disposition")


async def receive(stream: AsyncIterator[bytes], content_type: str, file_field: str,
                  open_sink: Callable[[str | None], Sink]) -> Received:
    """Read the whole body; the part named `file_field` is written to `open_sink(filename)`, other
    parts are kept as small text fields. Raises ApiError(400) on a malformed body."""
    delimiter = b"--" + boundary_of(content_type)
    out = Received()
    buffer = b""
    state = "preamble"
    sink: Sink | None = None
    field_name = ""
    field_value = bytearray()
    async for chunk in stream:
        buffer += chunk
        while True:
            if state == "preamble":
                at = buffer.find(delimiter)
                if at < 0:
                    buffer = buffer[-len(delimiter):]
                    break
                buffer = buffer[at + len(delimiter):]
                state = "after-delimiter"
            if state == "after-delimiter":
                if len(buffer) < 2:
                    break
                if buffer.startswith(b"--"):
                    state = "done"
                    break
                if not buffer.startswith(b"\r\n"):
                    raise bad_request("malformed multipart body (delimiter not followed by CRLF)")
                buffer = buffer[2:]
                state = "headers"
            if state == "headers":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEADER:
                        raise bad_request("multipart part headers too long")
                    break
                name, filename = _disposition(buffer[:end])
                buffer = buffer[end + 4:]
                if name == file_field and sink is None and out.filename is None:
                    out.filename = filename or ""
                    sink = open_sink(filename)
                    field_name = ""
                else:
                    field_name, field_value = name, bytearray()
                state = "body"
            if state == "body":
                end = buffer.find(b"\r\n" + delimiter)
                keep = len(delimiter) + 2
                data = buffer if end < 0 else buffer[:end]
                if end < 0:
                    data = buffer[:-keep] if len(buffer) > keep else b""
                if data:
                    if field_name:
                        field_value += data
                        if len(field_value) > MAX_FIELD:
                            raise bad_request(f"multipart field {field_name} too long")
                    elif sink is not None:
                        sink.write(data)
                        out.size += len(data)
                    buffer = buffer[len(data):]
                if end < 0:
                    break
                buffer = buffer[2 + len(delimiter):]
                if field_name:
                    out.fields[field_name] = field_value.decode("utf-8", "replace")
                    field_name = ""
                elif sink is not None:
                    sink = _Closed()
                state = "after-delimiter"
            if state == "done":
                break
    if state != "done":
        raise bad_request("truncated multipart body")
    if out.filename is None:
        raise bad_request(f"the multipart body has no part named '{file_field}'")
    return out


class _Closed:
    """The file part has ended: later parts with the same name are ignored."""

    def write(self, data: bytes) -> None:  # pragma: no cover - never reached
        pass
