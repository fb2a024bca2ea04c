"""Paths that end in `/`: a route matches one only when its own template ends in `/`, through a
running gateway, and check-config refuses a template no request path could ever match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.base.clock import ManualClock
from gateway.config.compiled import compile_config
from gateway.config.settings import ConfigError, load_settings
from tests.conftest import (
    NOW,
    GatewayFactory,
    KeyPair,
    RawResponse,
    RunningGateway,
    Upstream,
    base_config,
    raw_request,
    write_config,
)

ANONYMOUS = b'{"customer_ids":{"cookie":"c-1"}}'


def post(target: str) -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(ANONYMOUS), ANONYMOUS)


def route(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "methods": ["POST"], "path": path, "auth": ["sdk_jwt"]}


def with_routes(*routes: dict[str, Any]) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["routes"] = list(routes)

    return edit


async def routed(gateway: RunningGateway, count: int) -> list[str | None]:
    """The `route` of each of the first `count` access-log lines, once they are written."""
    return [line.get("route") for line in (await gateway.access_log(count))[:count]]


def error_reason(answer: RawResponse) -> str:
    reason: str = json.loads(answer.body)["error"]["reason"]
    return reason


async def test_each_path_reaches_the_route_with_its_own_ending(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(
        with_routes(
            route("batch", "/ph/{project}/batch"),
            route("batch-slash", "/ph/{project}/batch/"),
            route("capture-slash", "/ph/{project}/capture/"),
        )
    )
    for target in ("/ph/app/batch/", "/ph/app/batch", "/ph/app/capture/"):
        answer = await raw_request(gateway.port, post(target))
        assert answer.status == 200, (target, answer.body)
    assert [r.path_qs for r in upstream.received] == [
        "/ph/app/batch/",
        "/ph/app/batch",
        "/ph/app/capture/",
    ]
    assert await routed(gateway, 3) == ["batch-slash", "batch", "capture-slash"]


@pytest.mark.parametrize(
    ("template", "target"),
    [
        pytest.param("/ph/{project}/batch/", "/ph/app/batch", id="slash_route_plain_path"),
        pytest.param("/ph/{project}/batch", "/ph/app/batch/", id="plain_route_slash_path"),
        pytest.param("/ph/{project}/{rest:.*}", "/ph/app/batch/", id="open_regex_slash_path"),
        pytest.param("/ph/{project}/{rest:.*}/", "/ph/app/batch", id="open_regex_plain_path"),
    ],
)
async def test_a_route_never_matches_the_other_ending(
    make_gateway: GatewayFactory, upstream: Upstream, template: str, target: str
) -> None:
    gateway = await make_gateway(with_routes(route("only", template)))
    answer = await raw_request(gateway.port, post(target))
    assert answer.status == 404, answer.body
    assert error_reason(answer) == "route_not_found"
    assert upstream.received == []


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("//", id="root_double_slash"),
        pytest.param("/ph/app/batch//", id="double_trailing_slash"),
        pytest.param("/ph//app/batch/", id="empty_segment"),
        pytest.param("/ph/app/./batch/", id="dot_segment"),
        pytest.param("/ph/app/batch/./", id="dot_before_the_slash"),
        pytest.param("/ph/app/x/../batch/", id="dot_dot_segment"),
        pytest.param("/ph/app/batch/..", id="trailing_dot_dot"),
    ],
)
async def test_a_trailing_slash_allows_no_other_empty_or_dot_segment(
    make_gateway: GatewayFactory, upstream: Upstream, target: str
) -> None:
    gateway = await make_gateway(with_routes(route("batch-slash", "/ph/{project}/batch/")))
    answer = await raw_request(gateway.port, post(target))
    assert answer.status == 400, answer.body
    assert error_reason(answer) == "path_invalid"
    assert upstream.received == []


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("/ph/{project}/./batch/", "has a . or .. segment"),
        ("/ph/{project}/../batch", "has a . or .. segment"),
        ("/ph/{project}/batch//", "has an empty segment"),
    ],
)
def test_check_config_refuses_a_template_no_path_can_match(
    tmp_path: Path, key_a: KeyPair, template: str, message: str
) -> None:
    config = base_config("http://127.0.0.1:9")
    config["routes"][0]["path"] = template
    path = write_config(tmp_path, config, {"a.pem": key_a})
    with pytest.raises(ConfigError) as refused:
        compile_config(load_settings(path, env={}), ManualClock(NOW))
    assert [str(p) for p in refused.value.problems] == [
        f"routes[0].path: {message} (got {template!r})"
    ]
