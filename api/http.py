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
    A module-level class, so uvicorn can hand it to each of its worker processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_head_bytes, self._refusal = _head_cap()
        self._in_head = True
        self._head_ended = False
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_ended = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        began_in_head, self._head_ended = self._in_head, False
        super().data_received(data)
        # Only chunks that begin and end inside a head count: one that ends the head (and may
        # hold body), or the last chunk of a large body (which ends the message), does not;
        # the parser never holds more than one chunk extra.
        if began_in_head and not self._head_ended:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head_bytes:
                self.transport.write(self._refusal)
                self.transport.close()
