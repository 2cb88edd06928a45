"""Client of a running server's controller API (``/cache/*``), for scripts and the CLI.

In-process code can call the same operations on the engine directly (``llm.engine_for(tenant)``:
``lookup_per_tier``, ``pin``, ``unpin``, ``clear_tenant``, ``stats``).
"""

from __future__ import annotations

from typing import Any

import httpx

from kvcellar.errors import KvcellarError


class ControllerError(KvcellarError):
    """The server refused a controller call or could not be reached."""


class CacheController:
    """``CacheController("http://127.0.0.1:8000", api_key="...")``."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ControllerError(f"cannot reach {self._http.base_url}{path}: {exc}") from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": {"message": resp.text[:500]}}
        if resp.status_code >= 400:
            msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
            raise ControllerError(f"{method} {path} failed ({resp.status_code}): {msg or data}")
        return data

    @staticmethod
    def _prompt(
        text: str | None, messages: list[dict[str, Any]] | None, tokens: list[int] | None
    ) -> dict[str, Any]:
        given = {
            k: v
            for k, v in (("text", text), ("messages", messages), ("tokens", tokens))
            if v is not None
        }
        if len(given) != 1:
            raise ValueError("give exactly one of text, messages or tokens")
        return given

    def lookup(self, text=None, messages=None, tokens=None) -> dict[str, Any]:
        """Cached prefix length, overall and per tier, of a prompt."""
        return self._call("POST", "/cache/lookup", self._prompt(text, messages, tokens))

    def pin(
        self, text=None, messages=None, tokens=None, ttl_s: float | None = None
    ) -> dict[str, Any]:
        """Keep a prompt's cached prefix from eviction for ``ttl_s`` seconds (None: until unpin)."""
        return self._call(
            "POST", "/cache/pin", {**self._prompt(text, messages, tokens), "ttl_s": ttl_s}
        )

    def unpin(self, text=None, messages=None, tokens=None) -> dict[str, Any]:
        return self._call("POST", "/cache/unpin", self._prompt(text, messages, tokens))

    def clear(
        self, tenant: str | None = None, tier: str | None = None, everything: bool = False
    ) -> dict[str, Any]:
        """Clear the caller's tenant (default), another tenant or a tier (admin), or everything
        (admin)."""
        return self._call(
            "POST", "/cache/clear", {"tenant": tenant, "tier": tier, "all": everything}
        )

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/cache/stats")

    def close(self) -> None:
        self._http.close()
