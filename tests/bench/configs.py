"""Generated configs: nginx (upstream and bare baseline), HAProxy with jwt_verify, the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.bench.dataset import KID, PROJECT, ROUTE_TEMPLATE, USER_KEY

UPSTREAM_BODY = '{"success":true}'


def nginx_conf(port: int, workdir: Path) -> str:
    """One worker answering every request 200 with a small JSON body, no logging, keep-alive."""
    temp = workdir / "temp"
    temp.mkdir(exist_ok=True)
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{UPSTREAM_BODY}';
        }}
    }}
}}
"""


def haproxy_cfg(
    port: int, upstream_port: int, public_key: Path, tls_pem: Path | None = None
) -> str:
    """HAProxy's own JWT check, as close to the gateway's `required` decision as it gets:

    Bearer token present, alg RS256, signature (jwt_verify), exp in the future, sub.key = uid,
    and sub.value equal to the body's customer_ids.registered. Anything else: 401.
    """
    tls = f" ssl crt {tls_pem} alpn http/1.1" if tls_pem is not None else ""
    return f"""\
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}{tls}
    option http-buffer-request
    http-request set-var(txn.token) http_auth_bearer
    http-request deny deny_status 401 unless {{ var(txn.token) -m found }}
    http-request set-var(txn.alg) var(txn.token),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}
    http-request deny deny_status 401 unless \
{{ var(txn.token),jwt_verify(txn.alg,"{public_key}") -m int 1 }}
    http-request set-var(txn.exp) var(txn.token),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny deny_status 401 unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}
    http-request deny deny_status 401 unless \
{{ var(txn.token),jwt_payload_query('$.sub.key') -m str {USER_KEY} }}
    http-request set-var(txn.sub) var(txn.token),jwt_payload_query('$.sub.value')
    http-request set-var(txn.user) req.body,json_query('$.customer_ids.registered')
    http-request deny deny_status 401 unless \
{{ var(txn.sub) -m found }} {{ var(txn.user) -m found }} {{ var(txn.sub),strcmp(txn.user) eq 0 }}
    default_backend upstream

backend upstream
    server nginx 127.0.0.1:{upstream_port}
"""


def gateway_config(
    *,
    port: int,
    admin_port: int,
    upstream_port: int,
    public_key: Path,
    mode: str,
    redis_port: int | None = None,
    workers: int = 1,
    tls: tuple[Path, Path] | None = None,
    traces_to: str | None = None,
) -> dict[str, Any]:
    """The gateway's settings (gateway/config/settings.py `Settings`): one project, one route."""
    counter: dict[str, Any] = {"backend": "memory"}
    if redis_port is not None:
        counter = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"}
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "failure_counter": counter,
        "workers": workers,
        "projects": {
            PROJECT: {
                "mode": mode,
                "algorithms": ["RS256"],
                "subject": {"claim": "sub", "format": "key_value", "key": USER_KEY},
                "keys": [{"id": KID, "pem_file": str(public_key)}],
            }
        },
        "identity": [{"json": "customer_ids.registered"}],
        "token": [{"header": "Authorization", "scheme": "Bearer"}],
        "session": [{"header": "X-Session-Id"}],
        "routes": [
            {
                "name": "track-events",
                "methods": ["POST"],
                "path": ROUTE_TEMPLATE,
                "auth": ["sdk_jwt"],
            }
        ],
    }
    if tls is not None:
        config["tls"] = {"cert_file": str(tls[0]), "key_file": str(tls[1])}
    if traces_to is not None:
        config["tracing"] = {"otlp_endpoint": traces_to, "sample_ratio": 0.01}
    return config


def write_yaml(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path
