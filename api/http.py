"""The HTTP protocol uvicorn serves with: httptools, plus a cap on the request head, which
httptools alone does not have (one 50 MB header would otherwise be read into memory)."""

import functools
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.errors import HTTP_STATUS, ErrorType, ServiceError
from shared.settings import api_settings

_REASON = b"Request Header Fields Too Large"


def _refusal(max_head_bytes: int) -> bytes:
    error = ServiceError(
        ErrorType.HEADERS_TOO_LARGE,
        f"the request line and headers are over {max_head_bytes} bytes",
    )
    body = json.dumps(error.envelope().model_dump(mode="json")).encode()
    status = HTTP_STATUS[ErrorType.HEADERS_TOO_LARGE]
    head = (
        f"HTTP/1.1 {status} ".encode()
        + _REASON
        + b"\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
    )
    return head + body


@functools.cache
def _head_cap() -> tuple[int, bytes]:
    """T2I_MAX_HEADER_BYTES and the answer past it, read once per process."""
    max_head_bytes = api_settings().max_header_bytes
    return max_head_bytes, _refusal(max_head_bytes)


class CappedHeadProtocol(HttpToolsProtocol):
    """httptools that answers 431 and closes once a request's head passes T2I_MAX_HEADER_BYTES.
    A module-level class, so uvicorn can hand it to each of its worker processes.

    A head ends only at a line feed, so the parser is fed a head one line at a time: every
    byte up to the head's end is counted, however the bytes were split into writes (a whole
    head in one write would otherwise be parsed before it could be measured). A body is fed
    up to its Content-Length, or line by line when chunked (whose message also ends at a line
    feed), so a pipelined head after it starts a fresh count at its first byte."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_head_bytes, self._refusal = _head_cap()
        self._in_head = True
        self._head_bytes = 0
        self._body_left: int | None = None

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._body_left = _content_length(self.headers)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            if self.transport.is_closing() or self.parser is None:
                return
            end = self._piece_end(data, start)
            if self._in_head:
                self._head_bytes += end - start
                if self._head_bytes > self._max_head_bytes:
                    self.transport.write(self._refusal)
                    self.transport.close()
                    return
            elif self._body_left is not None:
                self._body_left -= end - start
            super().data_received(data[start:end])
            # The parser stops at an upgrade and takes nothing after it.
            if self.parser is not None and self.parser.should_upgrade():
                return
            start = end

    def _piece_end(self, data: bytes, start: int) -> int:
        """Where the next piece to parse ends: never past a head's end or a body's end."""
        if self._in_head:
            # One byte past the cap is enough to refuse; a head with no line feed is not read on.
            limit = min(len(data), start + self._max_head_bytes - self._head_bytes + 1)
        elif self._body_left is not None and self._body_left > 0:
            return min(len(data), start + self._body_left)
        else:
            limit = len(data)
        newline = data.find(b"\n", start, limit)
        return limit if newline < 0 else newline + 1


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body length a head declares; None when chunked or not a number (the parser decides)."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length
