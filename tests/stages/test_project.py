"""`project_id`: which project a request is for — the `{project}` placeholder of its path,
a header (400 when it is missing, blank or sent twice: two readers could pick two projects),
or the route's fixed id."""

from __future__ import annotations

import pytest

from gateway.auth.extract import RequestParts, collect_headers
from gateway.config.compiled import CompiledConfig
from gateway.refusals.reasons import Reason, Rejected
from gateway.stages.project import project_id
from tests.stages.support import make_request

SDK_CONFIG = "/v2/sdkconfig"


def project_of(config: CompiledConfig, method: str, path: str, *headers: tuple[str, str]) -> str:
    route, params = config.router.match(method, path)
    request = make_request(method, path, list(headers))
    parts = RequestParts(
        collect_headers(request.header_keys(), request.raw_headers, route.watched_headers), {}
    )
    return project_id(route, params, parts)


def test_the_project_is_the_paths_placeholder(config: CompiledConfig) -> None:
    assert project_of(config, "POST", "/track/v2/projects/Shop-1/customers/events") == "Shop-1"


def test_a_project_header_is_read_without_surrounding_spaces(config: CompiledConfig) -> None:
    assert project_of(config, "GET", SDK_CONFIG, ("X-App-Id", "  watch ")) == "watch"


def test_the_project_header_is_read_under_any_spelling_of_its_name(
    config: CompiledConfig,
) -> None:
    assert project_of(config, "GET", SDK_CONFIG, ("x_app_id", "app")) == "app"


def test_a_missing_project_header_is_refused(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as refused:
        project_of(config, "GET", SDK_CONFIG)
    assert refused.value.reason is Reason.PROJECT_HEADER_MISSING


def test_a_blank_project_header_is_refused_as_missing(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as refused:
        project_of(config, "GET", SDK_CONFIG, ("X-App-Id", "   "))
    assert refused.value.reason is Reason.PROJECT_HEADER_MISSING


def test_a_project_header_sent_twice_is_refused(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as refused:
        project_of(config, "GET", SDK_CONFIG, ("X-App-Id", "app"), ("X-App-Id", "watch"))
    assert refused.value.reason is Reason.PROJECT_HEADER_DUPLICATE


def test_a_project_header_sent_twice_with_one_value_is_still_refused(
    config: CompiledConfig,
) -> None:
    with pytest.raises(Rejected) as refused:
        project_of(config, "GET", SDK_CONFIG, ("X-App-Id", "app"), ("X-App-Id", "app"))
    assert refused.value.reason is Reason.PROJECT_HEADER_DUPLICATE


def test_a_fixed_project_ignores_what_the_request_says(config: CompiledConfig) -> None:
    assert project_of(config, "POST", "/fixed/events", ("X-App-Id", "watch")) == "app"
