"""A small client for the daemon's API over its unix socket (httpx)."""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    """The daemon answered with an error, or could not be reached."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


class Client:
    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=socket_path), base_url="http://symbiontd", timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        try:
            r = self._http.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach symbiontd at {self.socket_path}: {exc}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # pydantic validation errors
                detail = "; ".join(
                    f"{'.'.join(str(x) for x in d.get('loc', []) if x != 'body')}: {d.get('msg')}" for d in detail
                )
            raise ApiError(r.status_code, str(detail))
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params or None)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, json=body)

    def put(self, path: str, body: Any) -> Any:
        return self.call("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)
