"""CORS for web SDKs: preflights answered without auth, and every answer to a listed
origin — the gateway's own errors included, so a browser SDK can read `token_expired` — carries
the headers that let the page see it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

EXPOSED = "X-Request-Id, X-Auth-Warning, X-Auth-Token-Expires-In, Retry-After"
# Headers an SDK sends with every event besides the route's own sources.
ALWAYS_ALLOWED = ("content-type", "content-encoding", "x-request-id")


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    origins: frozenset[str]
    allow_methods: str
    allow_headers: str
    max_age: str

    @classmethod
    def build(
        cls, origins: Iterable[str], methods: Iterable[str], headers: Iterable[str], max_age: int
    ) -> CorsPolicy:
        return cls(
            origins=frozenset(origins),
            allow_methods=", ".join(sorted(methods)),
            allow_headers=", ".join(sorted({*headers, *ALWAYS_ALLOWED})),
            max_age=str(max_age),
        )

    def answer_headers(self, origin: str | None) -> dict[str, str] | None:
        if origin is None or origin not in self.origins:
            return None
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED,
            "Vary": "Origin",
        }

    def preflight_headers(self, origin: str) -> dict[str, str]:
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": self.allow_methods,
            "Access-Control-Allow-Headers": self.allow_headers,
            "Access-Control-Max-Age": self.max_age,
            "Vary": "Origin",
        }
