"""Real inputs for the stage tests: requests built the way the HTTP layer builds them, a config
compiled from YAML text the way `gateway run` compiles it, and the metrics bound to it the way
the pipeline binds them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.auth.extract import RequestParts, collect_headers
from gateway.base.clock import ManualClock
from gateway.config.compiled import CompiledConfig, compile_config
from gateway.config.settings import load_settings
from gateway.http.messages import Request
from gateway.pipeline import JWKS_URL_KID
from gateway.stages.authenticate import CheckInputs
from gateway.stages.body import body_at_hand, read_body, read_json
from gateway.stages.project import project_id
from gateway.stages.target import read_target
from gateway.telemetry.metrics import BoundMetrics, Metrics
from tests.conftest import KeyPair

PEER = "198.51.100.7"  # the address a request comes from, unless a test says otherwise
EVENTS = "/track/v2/projects/app/customers/events"
ORIGIN = "https://shop.example"

# The config the stage tests read: `app` enforces tokens, `watch` only watches, `keyed` takes
# an API key, `rotating` has nothing but a JWKS URL nobody fetched; every project shares key-a.
CONFIG = """\
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
upstream:
  url: http://127.0.0.1:9
  timeout_seconds: 5
limits:
  max_body_bytes: 4096
  max_decompressed_bytes: 8192
  body_timeout_seconds: 0.05
failure_counter:
  threshold: 2
  session_ttl_seconds: 600
trusted_proxies: [10.0.0.0/8]
projects:
  app:
    mode: required
    keys: [{id: key-a, pem_file: keys/a.pem}]
  watch:
    mode: monitor
    keys: [{id: key-a, pem_file: keys/a.pem}]
  keyed:
    mode: disabled
    api_keys: [sdk-secret-1]
  rotating:
    mode: required
    jwks_url: https://keys.example/jwks.json
identity:
  - json: customer_ids.registered
  - header: X-User-Id
token:
  - header: X-Sdk-Auth-Token
  - header: Authorization
    scheme: Bearer
session:
  - header: X-Session-Id
routes:
  - name: track-events
    methods: [POST]
    path: /track/v2/projects/{project}/customers/events
    auth: [sdk_jwt]
    cors:
      origins: ["https://shop.example"]
  - name: pixel
    methods: [GET]
    path: /track/v2/projects/{project}/pixel
    auth: [sdk_jwt]
    identity: [{query: uid}]
    token: [{query: token}]
    error_format: bloomreach
  - name: sdk-config
    methods: [GET]
    path: /v2/sdkconfig
    project: {header: X-App-Id}
    auth: [none]
  - name: keyed-events
    methods: [POST]
    path: /keyed/{project:keyed}/events
    auth: [api_key]
  - name: fixed-events
    methods: [POST]
    path: /fixed/events
    project: {id: app}
    auth: [sdk_jwt]
"""


class RecordingChannel:
    """The connection as a request sees it: counts the `100 Continue`s it was asked for."""

    def __init__(self) -> None:
        self.continues = 0

    def send_continue(self) -> None:
        self.continues += 1


def make_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = b"",
    *,
    remote: str | None = PEER,
    body_limit: int = 4096,
    channel: RecordingChannel | None = None,
) -> Request:
    """A request as the parser hands it over: `Content-Length` and `Expect: 100-continue` read
    from `headers`; `body` received whole, or None for a body still on its way."""
    raw = [(name.encode(), value.encode()) for name, value in headers]
    lengths = [int(v) for n, v in headers if n.lower() == "content-length"]
    expects = any(n.lower() == "expect" and v.strip().lower() == "100-continue" for n, v in headers)
    request = Request(
        channel or RecordingChannel(),
        method,
        target,
        "1.1",
        raw,
        remote,
        keep_alive=True,
        content_length=lengths[0] if lengths else None,
        expects_continue=expects,
        body_limit=body_limit,
    )
    if body is not None:
        if body:
            request.receive(body)
        request.complete()
    return request


def json_post(
    path: str, body: bytes, headers: Sequence[tuple[str, str]] = (), *, remote: str | None = PEER
) -> Request:
    """A POST of a JSON body with its `Content-Type` and `Content-Length`."""
    head = [
        ("Host", "gateway.test"),
        ("Content-Type", "application/json"),
        *headers,
        ("Content-Length", str(len(body))),
    ]
    return make_request("POST", path, head, body, remote=remote)


def compile_yaml(
    tmp_path: Path, text: str, clock: ManualClock, keys: dict[str, KeyPair]
) -> CompiledConfig:
    """`text` written as gateway.yaml beside `keys/<name>` public keys, loaded and compiled."""
    (tmp_path / "keys").mkdir(exist_ok=True)
    for name, pair in keys.items():
        (tmp_path / "keys" / name).write_text(pair.public_pem)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return compile_config(load_settings(path, env={}), clock)


def bind(metrics: Metrics, config: CompiledConfig, backend: str = "memory") -> BoundMetrics:
    """The children one config's requests touch, bound as the pipeline binds them."""
    projects = (*config.projects.values(), config.other_projects)
    return metrics.bind(
        [entry.route.name for entry in config.router.entries],
        {p.label: p.mode for p in projects},
        {
            p.label: [k.kid for k in p.keys.static] + ([JWKS_URL_KID] if p.keys.jwks else [])
            for p in projects
        },
        backend,
    )


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    """One exported sample after a flush; 0 when the child was never touched."""
    metrics.flush()
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def check_inputs(config: CompiledConfig, request: Request) -> CheckInputs:
    """What `check` reads for `request`, gathered by the earlier stages in the pipeline's
    order: target, route, project, body, and the JSON reading where the mode needs one."""
    target = read_target(request)
    route, params = config.router.match(request.method, target.path)
    headers = collect_headers(request.header_keys(), request.raw_headers, route.watched_headers)
    parts = RequestParts(headers, {})
    project = config.project(project_id(route, params, parts))
    limits = config.settings.limits
    body = body_at_hand(request, limits)
    if body is None:
        body = await read_body(request, limits)
    mode = project.mode if route.sdk_jwt else "disabled"
    reading = None
    if mode != "disabled" and route.reads_json and body:
        reading = await read_json(request, route, body, limits)
    return route, project, parts, target, body, reading, limits, mode
