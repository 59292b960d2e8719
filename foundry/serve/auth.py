"""API keys: `Authorization: Bearer KEY`, compared in constant time; keys never reach a log."""

from __future__ import annotations

import hmac

from fastapi import Request

from foundry.serve.errors import APIError


def key_matches(given: str, keys: list[str]) -> bool:
    """Whether `given` is one of `keys`; every key is compared in full, so timing reveals nothing."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8"))
    return found


def require_key(request: Request) -> None:
    """FastAPI dependency: a 401 in OpenAI's shape unless the request carries one of the server's keys."""
    keys: list[str] = request.app.state.config.api_keys
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                       "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not key_matches(given.strip(), keys):
        raise APIError(401, "the API key given is not one this server accepts", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
