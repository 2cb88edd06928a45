"""Who is calling: API key -> tenant, and whether the caller may administer every tenant.

``settings.api_keys`` maps keys to tenants and ``settings.admin_keys`` lists keys with admin
rights (an admin key not in ``api_keys`` acts as ``settings.tenant``). With no keys at all the
server is open: every request is the single tenant ``settings.tenant``, with admin rights.
Authentication is an ASGI middleware so it runs before the request body is even parsed: an
unauthenticated caller learns nothing about the API.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from kvcellar.config import Settings
from kvcellar.server.schemas import APIError

PROTECTED_PREFIXES = ("/v1/", "/cache/")


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.default_tenant = settings.tenant
        self._keys: list[tuple[bytes, Caller]] = []
        admin = set(settings.admin_keys)
        for key in dict.fromkeys([*settings.api_keys, *settings.admin_keys]):
            tenant = settings.api_keys.get(key, settings.tenant)
            self._keys.append((key.encode(), Caller(tenant, key in admin)))
        self.open = not self._keys

    def caller(self, authorization: str | None) -> Caller:
        """The caller of a request with this ``Authorization`` header; raises 401."""
        if self.open:
            return Caller(self.default_tenant, admin=True)
        if not authorization:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise APIError(
                401,
                "malformed Authorization header: use 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        given = key.encode()
        found = None
        for known, caller in self._keys:  # compare with every key: no timing hint of a match
            if hmac.compare_digest(known, given) and found is None:
                found = caller
        if found is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return found


class AuthMiddleware:
    """Puts the :class:`Caller` into ``scope["state"]["caller"]`` for protected paths, or answers
    401 in the OpenAI error shape."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            caller = self.auth.caller(header)
        except APIError as exc:
            body = json.dumps(exc.body(), separators=(",", ":")).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": exc.status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)
