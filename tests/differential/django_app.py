"""A tracking API on Django, served by Django's own threaded WSGI server (`runserver`'s).

The view reads the way a Django view does: `request.POST` when Django parsed the body as a form
(it decides by `request.content_type`, which it lower-cases and strips of whitespace, NBSP
included, and only for POST), else `json.loads(request.body)`; `request.GET` for the query
(its `get` returns the last of repeated names); `request.headers` for headers, which the WSGI
server has joined with commas when repeated (and, like runserver, drops when the name has `_`).
A form field is read under the identity path's full dotted name.

Usage: python -m tests.differential.django_app ROUTES_JSON   (prints its port, then serves)
"""

from __future__ import annotations

import json
import sys
from typing import Any

import django
from django.conf import settings

from tests.differential.common import Records, route_for, walk

ROUTES: dict[str, dict[str, Any]] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
RECORDS = Records()
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="differential-test-only",
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    LOGGING_CONFIG=None,
    USE_TZ=True,
)
django.setup()

from django.core.servers.basehttp import (  # noqa: E402
    ThreadedWSGIServer,
    WSGIRequestHandler,
)
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import re_path  # noqa: E402


def records(request: HttpRequest) -> HttpResponse:
    return HttpResponse(RECORDS.dump(), content_type="application/json")


def track(request: HttpRequest) -> HttpResponse:
    route = route_for(ROUTES, request.path) or {}
    readings: dict[str, list[Any]] = {}
    note = None
    if route.get("json"):
        try:
            if request.content_type in FORM_TYPES:
                for path in route["json"]:
                    value = request.POST.get(path)
                    readings[f"json {path}"] = [] if value is None else [value]
            elif request.body:
                document = json.loads(request.body)
                for path in route["json"]:
                    readings[f"json {path}"] = walk(document, path)
        except Exception as exc:  # what the view cannot read, it reads as no one
            note = f"{type(exc).__name__}: {exc}"
    for name in route.get("query", ()):
        value = request.GET.get(name)
        readings[f"query {name}"] = [] if value is None else [value]
    for name in route.get("header", ()):
        value = request.headers.get(name)
        readings[f"header {name}"] = [] if value is None else [value]
    RECORDS.add(
        {
            "request_id": request.headers.get("X-Request-Id"),
            "method": request.method,
            "path": request.path,
            "auth_status": request.headers.get("X-Auth-Status"),
            "authenticated_user": request.headers.get("X-Authenticated-User"),
            "readings": readings,
            "note": note,
        }
    )
    return HttpResponse(b'{"success":true}', content_type="application/json")


urlpatterns = [re_path(r"^__records$", records), re_path(r"", track)]


class QuietHandler(WSGIRequestHandler):  # type: ignore[misc]
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    server = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler, ipv6=False)
    server.set_app(get_wsgi_application())
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
