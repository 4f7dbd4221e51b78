"""The one error format, {"error": "..."}, for every failure the service answers."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Send

from contract.pydantic_errors import describe_errors

log = logging.getLogger(__name__)


class ClientError(Exception):
    """Something the client sent wrong: answered with `status` and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


MAX_ERROR_CHARS = 400  # an error message never echoes more of the input than an excerpt


def excerpt(value: object, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: what an error message may quote of the input."""
    text = repr(value) if not isinstance(value, str) else repr(value[:limit + 1])
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def bounded(message: str) -> str:
    """The message cut to MAX_ERROR_CHARS: the last guard; messages quote input through excerpt()."""
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + " ..."


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": bounded(message)}, status_code=status, headers=headers)


def error_body(message: str) -> bytes:
    """The same {"error": "..."} body as error_response, for the layers below FastAPI."""
    return orjson.dumps({"error": bounded(message)})


async def respond(send: Send, status: int, body: bytes,
                  extra: dict[str, str] | None = None) -> None:
    """Send a whole JSON response on a raw ASGI `send` (the layers below FastAPI)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if extra:
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientError)
    async def _client(request: Request, exc: ClientError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, describe_errors(exc.errors(), root="request"))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it; app.guard logs and counts the 499

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error (logged on the server)")
