"""What the routes depend on: the service and the settings of this app, admin authentication, the task-name rule
on path parameters, and strict JSON bodies."""

from __future__ import annotations

import hmac
import json
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lpt_client.schemas import TASK_NAME_RULE, TASK_NAME_SCHEMA_PATTERN
from lpt_serve.api.errors import Forbidden, Unauthorized
from lpt_serve.api.settings import Settings
from lpt_serve.serving.service import Service


# Dependencies are `async def` even though they never await: FastAPI runs a plain `def` dependency in its thread
# pool, a thread hop per request for one attribute read.
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

TaskPath = Annotated[str, Path(pattern=TASK_NAME_SCHEMA_PATTERN, description=f"the task's name: {TASK_NAME_RULE}")]


# ------------------------------------------------------------------------------------------------------ admin
def check_admin_token(settings: Settings, authorization: str | None) -> None:
    """The one admin check: `authorization` must be `Bearer <LPT_ADMIN_TOKEN>`; without a configured token admin
    routes are off. Raises Forbidden or Unauthorized. The app's admin gate calls it before any body is read, and
    `require_admin` again on each admin route."""
    if not settings.admin_enabled():
        raise Forbidden("admin routes are off: start the server with LPT_ADMIN_TOKEN set")
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized("send 'Authorization: Bearer <token>' (the server's LPT_ADMIN_TOKEN)")
    given = authorization.removeprefix("Bearer ").strip().encode()
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(given, expected):
        raise Forbidden("the admin token is wrong")


# Declares the scheme in OpenAPI (the docs page offers to send it); the check itself is `check_admin_token`.
_bearer = HTTPBearer(auto_error=False, scheme_name="adminToken", description="the server's LPT_ADMIN_TOKEN")


async def require_admin(request: Request, settings: SettingsDep,
                  _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Admin routes need `Authorization: Bearer <LPT_ADMIN_TOKEN>` (defence in depth: the gate checked it)."""
    check_admin_token(settings, request.headers.get("authorization"))


AdminOnly = Depends(require_admin)


# ------------------------------------------------------------------------------------------------ JSON bodies
# A `\uD800`-`\uDFFF` escape: the only way a lone surrogate gets into a string that `json.loads` builds (raw
# surrogate bytes are not UTF-8 and fail decoding). Most bodies have none, so the walk below is rarely needed.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json_body(body: bytes) -> Any:
    """`body` as JSON, or `json.JSONDecodeError` saying why not: not UTF-8, malformed, nested too deeply for the
    parser, an integer too long to convert, or a lone UTF-16 surrogate (valid JSON, but not text: no tokenizer
    or encoder takes it). FastAPI answers a `JSONDecodeError` with a validation error, and so do we."""
    try:
        text = body.decode("utf-8-sig")  # RFC 8259 lets a parser ignore a byte order mark; json.loads(bytes) did
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"it is not UTF-8 ({exc.reason})", body.decode("utf-8", "replace"),
                                   exc.start) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("it nests too deeply", text, 0) from None
    except ValueError:  # the one other failure: an integer longer than Python converts
        raise json.JSONDecodeError(f"an integer has more than {sys.get_int_max_str_digits()} digits", text,
                                   0) from None
    escape = _SURROGATE_ESCAPE.search(text)
    if escape is not None and _holds_lone_surrogate(value):
        raise json.JSONDecodeError("a string holds a lone UTF-16 surrogate, which is not Unicode text", text,
                                   escape.start())
    return value


def _holds_lone_surrogate(value: Any) -> bool:
    # Iterative: the value may nest as deep as the parser allowed.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose JSON body is parsed by `parse_json_body`: every undecodable body is a 422, never a 400 or
    a 500 from deep inside the tokenizer."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict
