"""A tracking API on the standard library: `http.server`, `json.loads`, `urllib.parse.parse_qs`.

Read the way such a service reads: `json.loads` on the body whatever its Content-Type (the last
of duplicate keys wins), the first value of a query parameter, the first of a repeated header.
Like most `http.server` handlers, only POST reads a body: a GET, DELETE or OPTIONS leaves its
body on the connection, where the next request is read from.

Usage: python -m tests.differential.python_json ROUTES_JSON   (prints its port, then serves)
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.differential.common import Records, route_for, walk

ROUTES: dict[str, dict[str, Any]] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
RECORDS = Records()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._answer(self.rfile.read(length))

    def do_GET(self) -> None:
        if self.path == "/__records":
            self._send(RECORDS.dump())
            return
        self._answer(b"")

    do_DELETE = do_GET
    do_OPTIONS = do_GET

    def _answer(self, body: bytes) -> None:
        target = urlsplit(self.path)
        route = route_for(ROUTES, target.path) or {}
        readings: dict[str, list[Any]] = {}
        note = None
        if route.get("json") and body:
            try:
                document = json.loads(body)
            except ValueError as exc:
                note = f"json.loads: {exc}"
            else:
                for path in route["json"]:
                    readings[f"json {path}"] = walk(document, path)
        query = parse_qs(target.query)
        for name in route.get("query", ()):
            readings[f"query {name}"] = query.get(name, [])[:1]
        for name in route.get("header", ()):
            value = self.headers.get(name)
            readings[f"header {name}"] = [] if value is None else [value]
        RECORDS.add(
            {
                "request_id": self.headers.get("X-Request-Id"),
                "method": self.command,
                "path": target.path,
                "auth_status": self.headers.get("X-Auth-Status"),
                "authenticated_user": self.headers.get("X-Authenticated-User"),
                "readings": readings,
                "note": note,
            }
        )
        self._send(b'{"success":true}')

    def _send(self, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
