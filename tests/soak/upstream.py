"""The soak's tracking API: answers every request 200 and counts what it accepted, by the
`X-Auth-Status` the gateway forwarded. `GET /_soak/stats` answers the counts.

    python -m tests.soak.upstream --port PORT
"""

from __future__ import annotations

import argparse
from collections import Counter

from aiohttp import web

STATS_PATH = "/_soak/stats"


class Accepted:
    def __init__(self) -> None:
        self.by_auth_status: Counter[str] = Counter()


ACCEPTED_KEY = web.AppKey("accepted", Accepted)


async def _track(request: web.Request) -> web.Response:
    await request.read()
    request.app[ACCEPTED_KEY].by_auth_status[request.headers.get("X-Auth-Status", "none")] += 1
    return web.json_response({"success": True})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(dict(request.app[ACCEPTED_KEY].by_auth_status))


def make_app() -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[ACCEPTED_KEY] = Accepted()
    app.router.add_get(STATS_PATH, _stats)
    app.router.add_route("*", "/{tail:.*}", _track)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
