"""A request-body cap enforced while the body streams in, before it is read in full."""

import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from shared.errors import ErrorType, ServiceError


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Answers 413 for a declared or streamed body over `max_bytes` (`image_max_bytes` on the
    paths that take input images); never buffers it."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        image_paths: frozenset[str] = frozenset(),
        image_max_bytes: int = 0,
    ) -> None:
        self.app = app
        self._default_max_bytes = max_bytes
        self._image_paths = image_paths
        self._image_max_bytes = max(image_max_bytes, max_bytes)

    def _limit(self, scope: Scope) -> int:
        if scope["path"] in self._image_paths:
            return self._image_max_bytes
        return self._default_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(scope, receive, send, limit)
            return

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            # Whatever the app made of the cut-off body, the client hears 413.
            if exceeded:
                return
            response_started = True
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not response_started:
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = ServiceError(
            ErrorType.PAYLOAD_TOO_LARGE,
            f"the request body is over {limit} bytes",
            headers={"connection": "close"},
        )
        await error_response(error)(scope, receive, send)
