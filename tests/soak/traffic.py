"""The soak's load: a paced mix of valid, invalid, anonymous and hostile requests, each answer
classified against what the contract says that kind of request must get.

An answer is labelled `"<status>"` for a 2xx, `"<status> <CODE>"` for the gateway's own errors
(`"429 AUTH_FAILURE_LIMIT/<cause>"` for the session limit), or one of CLOSED (the connection
ended without an answer), TIMEOUT, NOT_READ (the client left on purpose before any answer),
`"<status> non-contract body"` / `"<status> wrong request id"` when the answer breaks §5.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key

EVENTS = "/track/v2/projects/app/customers/events"
CLOSED = "closed"
TIMEOUT = "timeout"
NOT_READ = "not read"
RAW_TIMEOUT_SECONDS = 5.0
MAX_EXAMPLES = 20


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    weight: int  # out of 100
    expected: frozenset[str]
    forwarded: bool = False  # should reach the tracking API (and be answered 2xx)


def _rejected(code: str) -> frozenset[str]:
    return frozenset({f"401 {code}", f"429 AUTH_FAILURE_LIMIT/{code}"})


CATEGORIES = (
    Category("valid", 48, frozenset({"200"}), forwarded=True),
    Category("anonymous", 15, frozenset({"200"}), forwarded=True),
    Category("expired", 6, _rejected("TOKEN_EXPIRED")),
    Category("bad_signature", 6, _rejected("TOKEN_REJECTED")),
    Category("wrong_user", 6, _rejected("TOKEN_REJECTED")),
    Category("malformed_json", 3, frozenset({"400 BAD_REQUEST"})),
    Category("duplicate_keys", 3, frozenset({"400 BAD_REQUEST"})),
    Category("form_body", 2, frozenset({"415 UNSUPPORTED_MEDIA_TYPE"})),
    # The gateway answers 413 and closes without reading the rest: the client may see the close.
    Category("oversized", 2, frozenset({"413 PAYLOAD_TOO_LARGE", CLOSED})),
    Category("path_dot_segment", 2, frozenset({"400 BAD_REQUEST"})),
    Category("path_percent", 2, frozenset({"400 BAD_REQUEST"})),
    Category("unknown_route", 1, frozenset({"404 ROUTE_NOT_FOUND"})),
    Category("wrong_method", 1, frozenset({"405 METHOD_NOT_ALLOWED"})),
    Category("garbage_bytes", 2, frozenset({"400 BAD_REQUEST", CLOSED})),
    Category("truncated_body", 1, frozenset({NOT_READ})),
)
BY_NAME = {c.name: c for c in CATEGORIES}
assert sum(c.weight for c in CATEGORIES) == 100


@dataclass(frozen=True, slots=True)
class TokenPools:
    """Valid tokens for `users` (reused), and invalid ones with the user each names."""

    users: list[str]
    valid: list[str]
    expired: list[tuple[str, str]]
    forged: list[tuple[str, str]]  # right kid, signed by another key

    @classmethod
    def mint(
        cls, private_pem: bytes, other_pem: bytes, kid: str, users: int, lifetime: float
    ) -> TokenPools:
        # Keys loaded once: loading a PEM checks the RSA key, which costs more than signing.
        key, other = (load_pem_private_key(pem, password=None) for pem in (private_pem, other_pem))
        now = int(time.time())

        def token(user: str, signer: Any, iat: int, exp: int) -> str:
            claims = {"sub": {"key": "uid", "value": user}, "iat": iat, "exp": exp}
            return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": kid, "typ": "JWT"})

        names = [f"soak-user-{i:04d}" for i in range(users)]
        valid = [token(u, key, now, now + int(lifetime)) for u in names]
        invalid = names[:200]
        expired = [(u, token(u, key, now - 3720, now - 120)) for u in invalid]
        forged = [(u, token(u, other, now, now + 3600)) for u in invalid]
        return cls(names, valid, expired, forged)


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    answers: dict[str, Counter[str]] = field(default_factory=dict)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # forwarded categories, answered 2xx
    max_lag: float = 0.0  # how far behind its schedule a request was sent

    def record(self, category: Category, label: str, request_id: str, latency: float) -> None:
        self.answers.setdefault(category.name, Counter())[label] += 1
        if label not in category.expected:
            self.unexpected[f"{category.name}: {label}"] += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{request_id} {category.name}: {label}")
        elif category.forwarded:
            self.latencies.append(latency)

    def answered(self, label: str) -> int:
        return sum(c[label] for c in self.answers.values())

    def by_status(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for counts in self.answers.values():
            for label, count in counts.items():
                totals[label.split(" ", 1)[0] if label[:1].isdigit() else label] += count
        return totals


def label_answer(status: int, headers: Mapping[str, str], body: bytes, request_id: str) -> str:
    """The answer as the contract sees it (see the module docstring)."""
    if 200 <= status < 300:
        return str(status)
    try:
        document = json.loads(body)
        error = document["error"]
        code, cause = error["code"], error.get("cause")
        lead = next(iter(document)) == "token_expired"
    except (ValueError, KeyError, TypeError, StopIteration):
        return f"{status} non-contract body"
    if not lead or not str(headers.get("Content-Type", "")).startswith("application/json"):
        return f"{status} non-contract body"
    if request_id and (
        headers.get("X-Request-Id") != request_id or error.get("request_id") != request_id
    ):
        return f"{status} wrong request id"
    return f"{status} {code}/{cause}" if cause else f"{status} {code}"


def _parse_raw(response: bytes) -> tuple[int, dict[str, str], bytes] | None:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().title()] = value.strip()
    return status, headers, body


class Traffic:
    """`rate` requests a second for `seconds`, from `concurrency` clients; it ends by itself."""

    def __init__(
        self,
        host: str,
        port: int,
        pools: TokenPools,
        *,
        rate: float,
        seconds: float,
        concurrency: int,
        max_body_bytes: int,
    ) -> None:
        self.host, self.port = host, port
        self.base = f"http://{host}:{port}"
        self.pools = pools
        self.rate, self.seconds, self.concurrency = rate, seconds, concurrency
        self.max_body_bytes = max_body_bytes
        shuffle = random.Random(20240601)  # noqa: S311 — a fixed mix, not a secret
        self.cycle = [c for c in CATEGORIES for _ in range(c.weight)]
        shuffle.shuffle(self.cycle)
        self.tally = Tally()
        self.at_end: Callable[[], None] = lambda: None  # called when the last answer is in
        self.started = 0.0
        self.running = asyncio.Event()  # set when the first request is due
        self.finished = 0.0
        self._next = 0
        self._valid_next = 0

    async def run(self) -> Tally:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            self.started = time.monotonic()
            self.running.set()
            await asyncio.gather(*(self._client(session) for _ in range(self.concurrency)))
            self.finished = time.monotonic()
            self.at_end()  # before the clients' connections close
        return self.tally

    async def _client(self, session: aiohttp.ClientSession) -> None:
        end = self.started + self.seconds
        while True:
            index, self._next = self._next, self._next + 1
            due = self.started + index / self.rate
            if due >= end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing
            else:
                self.tally.max_lag = max(self.tally.max_lag, -delay)
            category = self.cycle[index % len(self.cycle)]
            request_id = f"soak-{index}"
            self.tally.sent[category.name] += 1
            started = time.monotonic()
            label = await self._send(session, category, index, request_id)
            self.tally.record(category, label, request_id, time.monotonic() - started)

    # --- building and sending ------------------------------------------------------------------

    async def _send(
        self, session: aiohttp.ClientSession, category: Category, index: int, request_id: str
    ) -> str:
        name = category.name
        if name in ("path_dot_segment", "path_percent", "unknown_route", "wrong_method"):
            return await self._raw(self._bad_path(name, request_id), read=True)
        if name == "garbage_bytes":
            garbage = os.urandom(64 + index % 512).replace(b"\r", b"").replace(b"\n", b"")
            return await self._raw(garbage + b"\r\n\r\n", read=True)
        if name == "truncated_body":
            head = (
                f"POST {EVENTS} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000\r\nX-Request-Id: {request_id}\r\n\r\n"
            )
            return await self._raw(head.encode() + b'{"customer_ids": {"regis', read=False)
        headers, body = self._http_request(name, index, request_id)
        data: bytes | AsyncIterator[bytes] = body
        if name == "oversized" and index % 2:
            data = _chunks(body)  # no Content-Length: refused once the limit is read
        try:
            async with session.post(self.base + EVENTS, data=data, headers=headers) as response:
                payload = await response.read()
        except TimeoutError:
            return TIMEOUT
        except (aiohttp.ClientError, OSError):
            return CLOSED
        return label_answer(response.status, response.headers, payload, request_id)

    def _http_request(self, name: str, index: int, request_id: str) -> tuple[dict[str, str], bytes]:
        pools = self.pools
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        event = {"type": "soak", "n": index}
        if name == "valid":
            slot = self._valid_next % len(pools.users)  # every user in turn: all reused
            self._valid_next += 1
            user = pools.users[slot]
            headers |= {"X-Sdk-Auth-Token": pools.valid[slot], "X-Session-Id": f"s-{user}"}
            return headers, _json({"customer_ids": {"registered": user}, "event": event})
        if name == "anonymous":
            return headers, _json({"customer_ids": {"cookie": f"c-{index}"}, "event": event})
        if name in ("expired", "bad_signature", "wrong_user"):
            if name == "wrong_user":
                slot = index % len(pools.users)
                user, token = pools.users[(slot + 1) % len(pools.users)], pools.valid[slot]
            else:
                pool = pools.expired if name == "expired" else pools.forged
                user, token = pool[index % len(pool)]
            headers |= {"X-Sdk-Auth-Token": token, "X-Session-Id": f"bad-{index % 100}"}
            return headers, _json({"customer_ids": {"registered": user}, "event": event})
        if name == "malformed_json":
            return headers, b'{"customer_ids": {"registered": "soak-user-0001"'
        if name == "duplicate_keys":
            return headers, (
                b'{"customer_ids": {"registered": "soak-user-0001", '
                b'"registered": "soak-user-0002"}}'
            )
        if name == "form_body":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return headers, b"customer_ids.registered=soak-user-0001"
        if name == "oversized":
            filler = "x" * (self.max_body_bytes + 1024)
            return headers, _json({"customer_ids": {"cookie": "c"}, "filler": filler})
        raise AssertionError(f"no HTTP request for {name}")

    def _bad_path(self, name: str, request_id: str) -> bytes:
        method, path = {
            "path_dot_segment": ("POST", "/track/v2/projects/app/customers/../customers/events"),
            "path_percent": ("POST", "/track/v2/projects/app/customers/%65vents"),
            "unknown_route": ("POST", "/track/v9/nowhere"),
            "wrong_method": ("GET", EVENTS),
        }[name]
        body = b'{"customer_ids": {"cookie": "c"}}'
        return (
            f"{method} {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body

    async def _raw(self, data: bytes, *, read: bool) -> str:
        """Bytes on a fresh socket; the answer read to EOF, or none when `read` is False."""
        request_id = ""
        marker = data.find(b"X-Request-Id: ")
        if marker >= 0:
            request_id = data[marker + 14 : data.find(b"\r\n", marker)].decode()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return CLOSED
        try:
            writer.write(data)
            await writer.drain()
            if not read:
                return NOT_READ
            async with asyncio.timeout(RAW_TIMEOUT_SECONDS):
                response = await reader.read()
        except TimeoutError:
            return TIMEOUT
        except OSError:
            return CLOSED
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        parsed = _parse_raw(response)
        if parsed is None:
            return CLOSED if not response else "unparsable answer"
        status, headers, body = parsed
        return label_answer(status, headers, body, request_id)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


async def _chunks(body: bytes, size: int = 8192) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]
