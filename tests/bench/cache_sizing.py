"""The verified-token cache at a million users: bytes per entry, and hit rate by size.

    python -m tests.bench.cache_sizing        (`make bench` runs it after the targets)

Bytes per entry: one process compiles a config with one project, then verifies 1,000,000
distinct tokens through the gateway's own `TokenVerifier` into a cache that holds them all;
the growth of its resident memory (VmRSS from /proc/self/status, after a collection) divided
by the count. HS256 tokens, so that a million can be minted and verified in seconds: what an
entry holds (user, expiry, key id) does not depend on the algorithm. Their `exp` values are
spread over an hour of issue times, as a backend minting through the day gives.

Hit rate: a stream of requests from 1,000,000 users whose rates follow Zipf's law (exponents
1.0 and 0.8; see tests/bench/dataset.py), through the gateway's `TokenCache` at each size and,
for comparison, an exact least-recently-used list; counted after the first 2,000,000 requests
so the cache is full. Each user has one token for the whole stream.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import itertools
import json
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from gateway.auth.verified import verified_token
from gateway.auth.verify import TokenCache
from gateway.base.clock import Clock
from gateway.config.compiled import compile_config
from gateway.config.settings import parse_settings
from gateway.tools.cli import installed_build

USERS = 1_000_000
SIZES = (10_000, 50_000, 100_000, 250_000, 500_000, 1_000_000)
EXPONENTS = (1.0, 0.8)
WARM_REQUESTS = 2_000_000
COUNTED_REQUESTS = 4_000_000
SECRET = "bench-secret-" + "s" * 40
SEED = 20261205


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_tokens(count: int, now: int) -> Iterator[str]:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    for index in range(count):
        claims = {
            "sub": {"key": "uid", "value": f"zipf-{index:07d}"},
            "iat": now,
            "exp": now + 3600 + index % 3600,
        }
        signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
        mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        yield f"{signing_input}.{_b64(mac)}"


def bytes_per_entry(count: int = USERS) -> tuple[float, float, float]:
    """(bytes per entry, RSS before in MiB, RSS after in MiB) for `count` verified tokens."""
    raw = {
        "listen": "127.0.0.1:0",
        "upstream": {"url": "http://127.0.0.1:9"},
        "verified_token_cache": {"max_entries": count + 2},
        "projects": {
            "bench": {
                "mode": "required",
                "algorithms": ["HS256"],
                "subject": {"claim": "sub", "format": "key_value", "key": "uid"},
                "keys": [{"id": "k1", "secret": SECRET}],
            }
        },
        "routes": [
            {
                "name": "events",
                "methods": ["POST"],
                "path": "/track/{project}",
                "auth": ["sdk_jwt"],
                "identity": [{"header": "X-User-Id"}],
                "token": [{"header": "Authorization", "scheme": "Bearer"}],
            }
        ],
    }
    compiled = compile_config(parse_settings(raw, Path("bench.yaml"), {}), Clock())
    verifier = compiled.projects["bench"].verifier
    assert verifier is not None
    now = int(time.time())
    gc.collect()
    before = rss_bytes()
    for token in hs256_tokens(count, now):
        verifier.verify(token)
    gc.collect()
    after = rss_bytes()
    assert len(compiled.token_cache) == count
    return (after - before) / count, before / 2**20, after / 2**20


def zipf_stream(exponent: float, length: int) -> list[int]:
    cumulative = list(itertools.accumulate(1 / r**exponent for r in range(1, USERS + 1)))
    draw = random.Random(SEED)  # noqa: S311 — a reproducible draw, not a secret
    return draw.choices(range(USERS), cum_weights=cumulative, k=length)


def two_generation_hits(stream: list[int], size: int) -> float:
    cache, token, hits = TokenCache(size), verified_token("u", 0.0, "k"), 0
    for index, user in enumerate(stream):
        if cache.get(user) is None:
            cache.put(user, token)
        elif index >= WARM_REQUESTS:
            hits += 1
    return hits / (len(stream) - WARM_REQUESTS)


def exact_lru_hits(stream: list[int], size: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for index, user in enumerate(stream):
        if user in cache:
            cache.move_to_end(user)
            hits += index >= WARM_REQUESTS
        else:
            cache[user] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits / (len(stream) - WARM_REQUESTS)


def hit_rate_table() -> list[str]:
    lines = [
        f"{'cache size':>12}  "
        + "  ".join(f"Zipf {e}: two-generation  exact LRU" for e in EXPONENTS)
    ]
    streams = {e: zipf_stream(e, WARM_REQUESTS + COUNTED_REQUESTS) for e in EXPONENTS}
    for size in SIZES:
        cells = []
        for exponent in EXPONENTS:
            stream = streams[exponent]
            generational, lru = two_generation_hits(stream, size), exact_lru_hits(stream, size)
            cells.append(f"{generational:>24.1%}  {lru:>9.1%}")
        lines.append(f"{size:>12,}  " + "  ".join(cells))
    return lines


def main() -> int:
    started = time.monotonic()
    per_entry, before, after = bytes_per_entry()
    build = installed_build()
    print(
        f"verified-token cache ({build} build), {USERS:,} entries: {per_entry:.0f} bytes each; "
        f"process RSS {before:.0f} MiB -> {after:.0f} MiB"
    )
    print(
        f"hit rate by size, {USERS:,} users, after {WARM_REQUESTS:,} requests, "
        f"over {COUNTED_REQUESTS:,}:"
    )
    print("\n".join(hit_rate_table()))
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
