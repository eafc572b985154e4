"""Who may open a socket: the API key, the browser origin allow-list, the subprotocol.

Checked in the opening handshake, before the upgrade: a missing or wrong key is HTTP 401, a browser
page from an origin not allowed is HTTP 403. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import NegotiationError

from streampage.server.protocol import SUBPROTOCOL

# Browsers cannot set headers on a WebSocket: they offer the key as a second subprotocol instead.
KEY_SUBPROTOCOL_PREFIX = "bearer."
ANY_ORIGIN = "*"


class HandshakeGuard:
    def __init__(self, api_key: str | None, allowed_origins: Sequence[str]) -> None:
        self._key = api_key.encode() if api_key is not None else None
        self._origins = frozenset(origin.rstrip("/") for origin in allowed_origins)

    def refusal(self, headers: Headers) -> tuple[HTTPStatus, str] | None:
        """Why this handshake must be refused (status, reason), or None to let it through."""
        if not self._origin_allowed(headers):
            return HTTPStatus.FORBIDDEN, "origin not allowed"
        if not self._key_matches(headers):
            return HTTPStatus.UNAUTHORIZED, "missing or wrong API key"
        return None

    def _key_matches(self, headers: Headers) -> bool:
        if self._key is None:
            return True
        candidates = [value[len("Bearer "):] for value in headers.get_all("Authorization")
                      if value[:len("Bearer ")].lower() == "bearer "]
        candidates += [p[len(KEY_SUBPROTOCOL_PREFIX):] for p in offered_subprotocols(headers)
                       if p.startswith(KEY_SUBPROTOCOL_PREFIX)]
        # Compare every candidate so timing does not tell which one was checked.
        matches = [hmac.compare_digest(c.strip().encode(), self._key) for c in candidates]
        return any(matches)

    def _origin_allowed(self, headers: Headers) -> bool:
        origin = headers.get("Origin")
        if origin is None or ANY_ORIGIN in self._origins:
            return True  # not a browser, or any origin allowed
        origin = origin.rstrip("/")
        if origin in self._origins:
            return True
        # The page this server hands out talks to the server it came from.
        return urlsplit(origin).netloc.lower() == headers.get("Host", "").lower()


def offered_subprotocols(headers: Headers) -> list[str]:
    return [p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",")]


def select_subprotocol(offered: Sequence[str]) -> str:
    """Answer only `streampage.v1`, never the key; a client that does not offer it gets HTTP 400."""
    if SUBPROTOCOL not in offered:
        raise NegotiationError(f"offer the subprotocol {SUBPROTOCOL}")
    return SUBPROTOCOL
