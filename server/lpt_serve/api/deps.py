"""FastAPI dependencies: the service and the settings of this app, and admin authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from lpt_serve.api.errors import Forbidden, Unauthorized
from lpt_serve.api.settings import Settings
from lpt_serve.serving.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Admin routes need `Authorization: Bearer <LPT_ADMIN_TOKEN>`; without a configured token they are off."""
    if not settings.admin_enabled():
        raise Forbidden("admin routes are off: start the server with LPT_ADMIN_TOKEN set")
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized("send 'Authorization: Bearer <token>' (the server's LPT_ADMIN_TOKEN)")
    given = authorization.removeprefix("Bearer ").strip().encode()
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(given, expected):
        raise Forbidden("the admin token is wrong")


AdminOnly = Depends(require_admin)
