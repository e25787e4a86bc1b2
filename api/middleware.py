"""ASGI middleware: request metrics, and the request body size limit."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.openai_serving import V1_PREFIX, OpenAIError
from shared import metrics


class RequestMetrics:
    """Counts every HTTP request by route and status, without buffering streamed bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels(endpoint, str(status)).inc()


class BodyLimit:
    """413 for a request body over the limit, before the route reads (or tokenizes) it: by its
    Content-Length at once, and by counting bytes as they arrive for chunked bodies, which
    declare no length. /documents may carry SLUICE_MAX_DOCUMENT_BYTES on top of the limit, and
    /v1/files uploads SLUICE_MAX_FILE_BYTES."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, max_document_bytes: int, max_file_bytes: int = 0
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_document_bytes = max_document_bytes
        self.max_file_bytes = max_file_bytes

    def limit(self, path: str) -> int:
        if path == "/documents" or path.startswith("/documents/"):
            return self.max_bytes + self.max_document_bytes
        if path == "/v1/files":
            return self.max_bytes + self.max_file_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope["path"], limit)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route: the app's handlers give the path's error shape.
                    raise HTTPException(413, _too_large_message(limit))
            return message

        await self.app(scope, counted, send)


def too_large(path: str, limit: int) -> JSONResponse:
    message = _too_large_message(limit)
    if path.startswith(V1_PREFIX):
        return OpenAIError(413, message).response()
    return JSONResponse({"detail": message}, status_code=413)


def _too_large_message(limit: int) -> str:
    return f"request body is larger than {limit} bytes (SLUICE_MAX_BODY_BYTES)"
