"""The login Gradio calls, off its event loop.

Gradio's `/login` route awaits an `async` auth function (a plain one runs on the event loop, where
a 600 000-round PBKDF2 check stalled every other request for about a second). `auth_function`
returns one that runs the check in a worker thread, at most `CONCURRENT_CHECKS` at a time, behind
the rate limit per username and per address of `Accounts.login`. Gradio passes the auth function
only the username and password, so `ClientAddress`, an ASGI middleware, keeps each request's
client address where the check can read it.
"""

from __future__ import annotations

import contextvars

import anyio
import fastapi
from starlette.middleware import Middleware

from unlearn_core import settings
from unlearn_core.accounts import Accounts, TooManyAttempts

CONCURRENT_CHECKS = 2  # password hashes at once: more logins wait their turn instead of taking every core
_address: contextvars.ContextVar[str] = contextvars.ContextVar("hotfix_client_address", default="")
_checks: anyio.CapacityLimiter | None = None


def address_of_scope(scope: dict) -> str:
    """The client address of an ASGI request: X-Forwarded-For's first address where a proxy is
    trusted to set it (as `ui.common.client_address`), else the connection's."""
    if settings.current().trust_proxy:
        for name, value in scope.get("headers") or []:
            if name == b"x-forwarded-for":
                forwarded = value.decode("latin-1").split(",")[0].strip()
                if forwarded:
                    return forwarded[:64]
    client = scope.get("client")
    return str(client[0]) if client else ""


class ClientAddress:
    """ASGI middleware: the request's client address, for the login check of the same request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            token = _address.set(address_of_scope(scope))
            try:
                return await self.app(scope, receive, send)
            finally:
                _address.reset(token)
        return await self.app(scope, receive, send)


MIDDLEWARE = [Middleware(ClientAddress)]  # launch(app_kwargs={"middleware": MIDDLEWARE})


def auth_function(accounts: Accounts):
    """An async `auth` for `launch`: the check runs in a thread; a limited username or address
    gets HTTP 429 with the seconds to wait."""

    async def check(username: str, password: str) -> bool:
        global _checks
        if _checks is None:
            _checks = anyio.CapacityLimiter(CONCURRENT_CHECKS)
        try:
            return await anyio.to_thread.run_sync(accounts.login, username, password, _address.get(), limiter=_checks)
        except TooManyAttempts as error:
            raise fastapi.HTTPException(status_code=429, detail=str(error), headers={"Retry-After": str(max(1, round(error.retry_after_s)))}) from None

    return check
