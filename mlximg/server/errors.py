"""Errors as OpenAI's API returns them: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
that says whose fault it was, for bad fields, bad bodies, auth, a full queue and engine failures alike."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         499: "cancelled", 500: "server_error", 504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def field_error(errors: list[dict]) -> APIError:
    """A 400 for the first of pydantic's field errors, named as the body names the field."""
    first = errors[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    return bad_request(f"{param}: {first['msg']}" if param else first["msg"], param, "invalid_value")


def install(app: FastAPI) -> None:
    """Every error the app can raise answered in OpenAI's shape; anything unexpected is a 500, and the server
    keeps running."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return await api_error(request, field_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}: {error}"), status_code=500)
