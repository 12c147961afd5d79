"""A small synchronous client for the gateway's admin API, used by the CLI and the deployer.

Reads `PLATEFORME_URL` and `PLATEFORME_ADMIN_TOKEN` when not given; every failure becomes an
`AdminError` whose message is the server's own (or says the gateway is unreachable).
"""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
ADMIN_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class AdminError(Exception):
    """An admin API call failed; `status` is the HTTP status (0 when unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    def __init__(self, base_url: str | None = None, token: str | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = (base_url or os.environ.get("PLATEFORME_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("PLATEFORME_ADMIN_TOKEN")
        if not token:
            raise AdminError("PLATEFORME_ADMIN_TOKEN is not set: the admin API needs it")
        self._http = httpx.Client(
            base_url=self.base_url, timeout=ADMIN_TIMEOUT, transport=transport,
            headers={"authorization": f"Bearer {token}", "user-agent": "plateforme-cli"},
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the gateway at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200] or response.reason_phrase
            raise AdminError(f"{response.status_code}: {message}", response.status_code)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # keys -------------------------------------------------------------------------------
    def create_key(self, owner: str, plan: str, **overrides: Any) -> dict[str, Any]:
        body = {"owner": owner, "plan": plan, **{k: v for k, v in overrides.items()
                                                if v is not None}}
        result: dict[str, Any] = self._call("POST", "/admin/v1/keys", json=body)
        return result

    def list_keys(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/admin/v1/keys")["data"]
        return result

    def get_key(self, key_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/keys/{key_id}")
        return result

    def update_key(self, key_id: str, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PATCH", f"/admin/v1/keys/{key_id}", json=changes)
        return result

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/admin/v1/keys/{key_id}")
        return result

    # usage ------------------------------------------------------------------------------
    def usage(self, key_id: str | None = None, since: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("key_id", key_id), ("since", since)) if v}
        result: list[dict[str, Any]] = self._call("GET", "/admin/v1/usage", params=params)["data"]
        return result

    # replicas ---------------------------------------------------------------------------
    def list_replicas(self, model: str) -> list[str]:
        data = self._call("GET", f"/admin/v1/models/{model}/replicas")["data"]
        return [item["url"] for item in data]

    def register_replica(self, model: str, url: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/admin/v1/models/{model}/replicas", json={"url": url})
        return result

    def deregister_replica(self, model: str, url: str) -> None:
        self._call("DELETE", f"/admin/v1/models/{model}/replicas", params={"url": url})
