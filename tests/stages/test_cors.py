"""CORS: `preflight` answers a browser's preflight for a listed origin with a 204 and no auth,
and gives None for every other OPTIONS (which is then routed like any method); `cors_headers`
are what every answer to a listed origin carries, so a page can read the gateway's errors."""

from __future__ import annotations

from pathlib import Path

from gateway.auth.target import parse_target
from gateway.base.clock import ManualClock
from gateway.config.compiled import CompiledConfig
from gateway.http.messages import Response
from gateway.stages.cors import cors_headers, preflight
from tests.conftest import KeyPair
from tests.stages.support import CONFIG, EVENTS, ORIGIN, compile_yaml, make_request

ASKS_POST = ("Access-Control-Request-Method", "POST")


def ask(config: CompiledConfig, path: str, *headers: tuple[str, str]) -> Response | None:
    request = make_request("OPTIONS", path, list(headers))
    return preflight(request, config.router, parse_target(path))


def test_a_preflight_from_a_listed_origin_is_answered_204(config: CompiledConfig) -> None:
    answered = ask(config, EVENTS, ("Origin", ORIGIN), ASKS_POST)
    assert answered is not None
    assert answered.status == 204
    assert answered.body == b""
    assert not answered.close
    lines = answered.headers
    assert b"Access-Control-Allow-Origin: https://shop.example" in lines
    assert b"Access-Control-Allow-Methods: POST" in lines
    assert b"Access-Control-Max-Age: 600" in lines
    assert b"Vary: Origin" in lines
    assert any(line.startswith(b"Date: ") for line in lines)


def test_a_preflight_allows_the_routes_own_headers_and_the_sdks_usual_ones(
    config: CompiledConfig,
) -> None:
    """The route's token, identity and session headers, plus Content-Type, Content-Encoding
    and X-Request-Id, sorted: a browser SDK can send every header the route reads."""
    answered = ask(config, EVENTS, ("Origin", ORIGIN), ASKS_POST)
    assert answered is not None
    allowed = [line for line in answered.headers if line.startswith(b"Access-Control-Allow-H")]
    assert allowed == [
        b"Access-Control-Allow-Headers: authorization, content-encoding, content-type, "
        b"x-request-id, x-sdk-auth-token, x-session-id, x-user-id"
    ]


def test_a_preflight_from_an_unlisted_origin_is_left_to_routing(config: CompiledConfig) -> None:
    assert ask(config, EVENTS, ("Origin", "https://evil.example"), ASKS_POST) is None


def test_an_origin_differing_only_in_scheme_is_not_listed(config: CompiledConfig) -> None:
    assert ask(config, EVENTS, ("Origin", "http://shop.example"), ASKS_POST) is None


def test_an_options_without_a_requested_method_is_no_preflight(config: CompiledConfig) -> None:
    assert ask(config, EVENTS, ("Origin", ORIGIN)) is None


def test_an_options_without_an_origin_is_no_preflight(config: CompiledConfig) -> None:
    assert ask(config, EVENTS, ASKS_POST) is None


def test_a_preflight_for_a_route_without_cors_is_left_to_routing(config: CompiledConfig) -> None:
    assert ask(config, "/v2/sdkconfig", ("Origin", ORIGIN), ASKS_POST) is None


def test_a_preflight_for_a_path_no_route_matches_is_left_to_routing(
    config: CompiledConfig,
) -> None:
    assert ask(config, "/nowhere", ("Origin", ORIGIN), ASKS_POST) is None


def test_answers_to_a_listed_origin_expose_the_gateways_headers(config: CompiledConfig) -> None:
    route, _ = config.router.match("POST", EVENTS)
    request = make_request("POST", EVENTS, [("Origin", ORIGIN)])
    assert cors_headers(route, request) == {
        "Access-Control-Allow-Origin": ORIGIN,
        "Access-Control-Expose-Headers": (
            "X-Request-Id, X-Auth-Warning, X-Auth-Token-Expires-In, Retry-After"
        ),
        "Vary": "Origin",
    }


def test_answers_to_an_unlisted_origin_get_no_cors_headers(config: CompiledConfig) -> None:
    route, _ = config.router.match("POST", EVENTS)
    request = make_request("POST", EVENTS, [("Origin", "https://evil.example")])
    assert cors_headers(route, request) is None


def test_answers_without_an_origin_get_no_cors_headers(config: CompiledConfig) -> None:
    route, _ = config.router.match("POST", EVENTS)
    assert cors_headers(route, make_request("POST", EVENTS)) is None


def test_a_route_without_cors_adds_nothing_even_for_a_listed_origin(
    config: CompiledConfig,
) -> None:
    route, _ = config.router.match("GET", "/v2/sdkconfig")
    request = make_request("GET", "/v2/sdkconfig", [("Origin", ORIGIN)])
    assert cors_headers(route, request) is None


def test_a_preflight_is_about_the_route_the_asked_method_reaches(
    tmp_path: Path, clock: ManualClock, key_a: KeyPair
) -> None:
    """A GET route without `cors` first on the same path must not hide the POST route that
    lists the origin: the preflight asks about POST."""
    text = CONFIG.replace(
        "routes:\n",
        "routes:\n"
        "  - name: events-readback\n"
        "    methods: [GET]\n"
        "    path: /track/v2/projects/{project}/customers/events\n"
        "    auth: [none]\n",
        1,
    )
    config = compile_yaml(tmp_path, text, clock, {"a.pem": key_a})
    answered = ask(config, EVENTS, ("Origin", ORIGIN), ASKS_POST)
    assert answered is not None
    assert answered.status == 204
    asks_get = ("Access-Control-Request-Method", "GET")
    assert ask(config, EVENTS, ("Origin", ORIGIN), asks_get) is None  # that route lists none
