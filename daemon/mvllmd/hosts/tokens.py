"""The tokens a peer gives coordinators for its per-instance routes (/i/NAME/...).

A coordinator gets one when it joins (FleetService.JoinFleet, over mutual TLS, with a host
certificate); joining again replaces it. Tokens live in memory only: a restarted daemon issues new
ones, and its coordinators join again when their watch of it breaks.
"""

from __future__ import annotations

import hmac
import secrets


class RouteTokens:
    def __init__(self) -> None:
        self._by_host: dict[str, bytes] = {}

    def issue(self, host: str) -> str:
        token = secrets.token_urlsafe(32)
        self._by_host[host] = token.encode()
        return token

    def valid(self, offered: str) -> bool:
        """Whether `offered` is a token issued here; every token is compared, whatever matches."""
        given = offered.encode()
        matches = [hmac.compare_digest(given, token) for token in self._by_host.values()]
        return any(matches)
