"""What every request passes before the app sees it: the API key (all paths but /health; compared in constant
time) and the body size limit (413 before the body is read, or as a chunked body grows past it)."""

import hmac
import json

from .errors import error_body

OPEN_PATHS = ("/health",)


async def _respond(send, status: int, message: str, headers: tuple = ()) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def authorized(header: bytes | None, api_key: str) -> bool:
    scheme, _, token = (header or b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Guard:
    """ASGI middleware: auth, then the body limit."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not authorized(headers.get(b"authorization"),
                                                                                 self.api_key):
            return await _respond(send, 401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                  ((b"www-authenticate", b"Bearer"),))
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _respond(send, 400, "Content-Length is not a number")
            if int(length) > self.max_body:
                return await _respond(send, 413, f"the body is {int(length)} bytes; at most {self.max_body} are taken")
            return await self.app(scope, receive, send)
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return await self._chunked(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _chunked(self, scope, receive, send):
        """A body without a length is read up to the limit, then handed on."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _respond(send, 413, f"the body is over {self.max_body} bytes")
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)
