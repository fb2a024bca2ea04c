"""A project's keys as they stand: the config's (`keys`, `jwks_file`) plus, with `jwks_url`, the
last good copy fetched from the customer's JWKS endpoint.

Fetches are bounded (5 s, 256 KiB, no redirect to another origin) and validated like config; a
bad or failed fetch keeps the last good copy. A token naming an unknown `kid` triggers at most
one refetch per `jwks_min_refetch_seconds`, and concurrent ones share it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.auth.keys import MAX_JWKS_BYTES, KeyProblem, KeySet, VerificationKey, parse_jwks
from gateway.auth.verify import Policy, TokenCache, TokenVerifier
from gateway.base.clock import Clock

log = logging.getLogger("gateway.jwks")

FETCH_TIMEOUT_SECONDS = 5.0
MAX_REDIRECTS = 3


@dataclass(frozen=True, slots=True)
class JwksUrl:
    url: str
    refresh_seconds: int
    min_refetch_seconds: int


class JwksError(Exception):
    """A fetch that brought no usable key set; the message never quotes the document."""


class ProjectKeys:
    def __init__(
        self,
        *,
        static: tuple[VerificationKey, ...],
        policy: Policy,
        identity: bytes,
        cache: TokenCache,
        clock: Clock,
        jwks: JwksUrl | None,
    ) -> None:
        self.static = static
        self.jwks = jwks
        self._policy = policy
        self._identity = identity  # the project and its policy, for the verifier generation
        self._cache = cache
        self._clock = clock
        self.fetched: tuple[VerificationKey, ...] = ()
        self.fetched_once = jwks is None
        self._document: bytes | None = None
        self._last_attempt = -float("inf")
        self._in_flight: asyncio.Task[bool] | None = None
        self.verifier = self._build()

    @property
    def all_keys(self) -> tuple[VerificationKey, ...]:
        return self.static + self.fetched

    def _build(self) -> TokenVerifier | None:
        keys = self.all_keys
        if not keys:
            return None
        generation = hashlib.sha256(
            repr(
                (self._identity, [(k.kid, k.material, sorted(k.algorithms)) for k in keys])
            ).encode()
        ).digest()
        return TokenVerifier(KeySet(keys), self._policy, generation, self._cache, self._clock)

    def install(self, document: bytes) -> None:
        """Validate a JWKS document and, if good, verify with its keys from now on."""
        try:
            fetched = parse_jwks(document, self._policy.algorithms, allow_secrets=False)
        except KeyProblem as exc:
            raise JwksError(str(exc)) from None
        clashes = {k.kid for k in fetched} & {k.kid for k in self.static}
        if clashes:
            raise JwksError(f"kid {sorted(clashes)[0]!r} is also a configured key's id")
        self.fetched, self._document, self.fetched_once = tuple(fetched), document, True
        self.verifier = self._build()

    def adopt(self, previous: ProjectKeys) -> None:
        """Carry the last good copy over a reload, re-validated under the new policy."""
        if previous._document is not None:
            try:
                self.install(previous._document)
            except JwksError:
                return
            self._last_attempt = previous._last_attempt

    async def fetch(self, session: aiohttp.ClientSession) -> None:
        assert self.jwks is not None
        self._last_attempt = time.monotonic()
        self.install(await _download(session, self.jwks.url))

    async def refetch_for_unknown_kid(
        self, session: aiohttp.ClientSession, on_result: Callable[[bool], None]
    ) -> bool:
        """True when a refetch brought a new key set; rate-limited and shared by callers."""
        if self.jwks is None:
            return False
        if self._in_flight is None:
            if time.monotonic() - self._last_attempt < self.jwks.min_refetch_seconds:
                return False
            self._in_flight = asyncio.ensure_future(self._refetch(session, on_result))
            self._in_flight.add_done_callback(lambda _: setattr(self, "_in_flight", None))
        return await asyncio.shield(self._in_flight)

    async def _refetch(
        self, session: aiohttp.ClientSession, on_result: Callable[[bool], None]
    ) -> bool:
        before = self.verifier
        try:
            await self.fetch(session)
        except JwksError as exc:
            on_result(False)
            log.warning("jwks refetch failed", extra={"fields": {"error": str(exc)}})
            return False
        on_result(True)
        return self.verifier is not before


async def _download(session: aiohttp.ClientSession, url: str) -> bytes:
    """GET with a deadline and a size limit, following redirects only within one origin."""
    target = URL(url)
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_SECONDS):
            for _ in range(MAX_REDIRECTS + 1):
                async with session.get(target, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        following = target.join(URL(response.headers.get("Location", "")))
                        if following.origin() != target.origin():
                            raise JwksError("redirected to another origin")
                        target = following
                        continue
                    if response.status != 200:
                        raise JwksError(f"answered {response.status}")
                    body = bytearray()
                    while chunk := await response.content.read(MAX_JWKS_BYTES + 1 - len(body)):
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
                    return bytes(body)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise JwksError(type(exc).__name__) from None
    raise JwksError("too many redirects")


class JwksRefresher:
    """Keeps every `jwks_url` project's keys fresh, across reloads, with one HTTP client."""

    def __init__(self, on_result: Callable[[str, bool], None]) -> None:
        self._on_result = on_result  # (project label, success)
        self._session: aiohttp.ClientSession | None = None
        self._watched: dict[str, ProjectKeys] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def ready(self) -> bool:
        """Every JWKS URL has been fetched once (readiness waits for it)."""
        return all(keys.fetched_once for keys in self._watched.values())

    def watch(self, projects: dict[str, ProjectKeys]) -> None:
        """Refresh these projects' URLs from now on; a project whose URL did not change keeps
        its last good copy."""
        previous, self._watched = (
            self._watched,
            {label: keys for label, keys in projects.items() if keys.jwks is not None},
        )
        for task in self._tasks.values():
            task.cancel()
        self._tasks = {}
        for label, keys in self._watched.items():
            old = previous.get(label)
            if old is not None and _same_url(old, keys):
                keys.adopt(old)
            self._tasks[label] = asyncio.ensure_future(self._refresh(label, keys))

    async def refetch(self, label: str, keys: ProjectKeys) -> bool:
        """After a token named an unknown kid: True if the key set changed."""
        session = self._client()
        return await keys.refetch_for_unknown_kid(session, lambda ok: self._on_result(label, ok))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _refresh(self, label: str, keys: ProjectKeys) -> None:
        assert keys.jwks is not None
        while True:
            try:
                await keys.fetch(self._client())
            except JwksError as exc:
                self._on_result(label, False)
                log.warning(
                    "jwks fetch failed; the last good copy stays",
                    extra={"fields": {"project": label, "error": str(exc)}},
                )
                await asyncio.sleep(min(keys.jwks.min_refetch_seconds, keys.jwks.refresh_seconds))
                continue
            self._on_result(label, True)
            await asyncio.sleep(keys.jwks.refresh_seconds)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks = {}
        if self._session is not None:
            await self._session.close()


def _same_url(old: ProjectKeys, new: ProjectKeys) -> bool:
    return old.jwks is not None and new.jwks is not None and old.jwks.url == new.jwks.url
