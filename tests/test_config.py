"""Config: loading, substitution and validation, with every message pinned by an anchored regex.

Each test writes YAML to `tmp_path`, loads it with an explicit environment, compiles it, and
compares the problem strings (`path: message`) against patterns that must match them whole.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.base.clock import ManualClock
from gateway.config.compiled import CompiledConfig, compile_config, load_and_compile
from gateway.config.settings import ConfigError, LoadedConfig, Problem, load_settings
from tests.conftest import NOW, KeyPair, base_config, write_config

UPSTREAM = "http://127.0.0.1:9"
SHA256_OF_TEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


# --- helpers -----------------------------------------------------------------------------------


def config(**overrides: Any) -> dict[str, Any]:
    """The shared base config (project `app`, required, key `key-a` from keys/a.pem)."""
    out = copy.deepcopy(base_config(UPSTREAM))
    out.update(overrides)
    return out


def write(tmp_path: Path, cfg: dict[str, Any], key_a: KeyPair) -> Path:
    return write_config(tmp_path, cfg, {"a.pem": key_a})


def write_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def compile_file(path: Path, env: dict[str, str] | None = None) -> CompiledConfig:
    return compile_config(load_settings(path, env=env or {}), ManualClock(NOW))


def load_file(path: Path, env: dict[str, str] | None = None) -> LoadedConfig:
    return load_settings(path, env=env or {})


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        compile_file(path, env)
    return [str(p) for p in caught.value.problems]


def assert_problems(found: list[str], *patterns: str) -> None:
    """Every pattern matches one whole problem, and every problem is matched by one pattern."""
    remaining = list(found)
    for pattern in patterns:
        hit = next((p for p in remaining if re.fullmatch(pattern, p, re.DOTALL)), None)
        assert hit is not None, f"no problem matches {pattern!r}; problems: {found}"
        remaining.remove(hit)
    assert not remaining, f"problems no pattern expected: {remaining}"


def small_rsa_public_pem() -> str:
    """A 1024-bit key: the weak key an operator might paste, which the gateway must refuse."""
    return public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))


def public_pem(private: rsa.RSAPrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def expected_fingerprint(pair: KeyPair) -> str:
    der = pair.private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def pem_body(pem: str) -> str:
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


def project_with_key(pem: str) -> dict[str, Any]:
    return {"mode": "required", "keys": [{"id": "k1", "pem": pem}]}


# --- the config that loads ---------------------------------------------------------------------


def test_base_config_compiles_with_its_key(tmp_path: Path, key_a: KeyPair) -> None:
    compiled = compile_file(write(tmp_path, config(), key_a))
    assert compiled.warnings == ()
    assert compiled.key_fingerprints["app"] == (("key-a", expected_fingerprint(key_a)),)
    assert compiled.project("APP").id == "app"  # project ids are matched case-insensitively
    assert compiled.project("elsewhere").label == "_other"


def test_problem_str_is_path_colon_message(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["mode"] = "enforcing"
    with pytest.raises(ConfigError) as caught:
        compile_file(write(tmp_path, cfg, key_a))
    [problem] = caught.value.problems
    assert isinstance(problem, Problem)
    assert problem.path == "projects.app.mode"
    assert str(problem) == f"{problem.path}: {problem.message}"
    assert str(caught.value) == str(problem)


# --- ${NAME} substitution ----------------------------------------------------------------------


def test_variables_are_substituted_in_string_values(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["upstream"] = {"url": "${UPSTREAM_URL}", "timeout_seconds": "${TIMEOUT:-7}"}
    cfg["projects"]["app"]["audience"] = "${AUD:-default-audience}"
    cfg["projects"]["app"]["issuer"] = "https://${ISSUER_HOST}/"
    env = {"UPSTREAM_URL": "http://127.0.0.1:8123", "ISSUER_HOST": "auth.example"}
    settings = load_file(write(tmp_path, cfg, key_a), env).settings
    assert settings.upstream.url == "http://127.0.0.1:8123"
    assert settings.upstream.timeout_seconds == 7.0  # a default, then typed by the schema
    assert settings.projects["app"].audience == "default-audience"
    assert settings.projects["app"].issuer == "https://auth.example/"


def test_a_set_variable_wins_over_its_default(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["audience"] = "${AUD:-default-audience}"
    path = write(tmp_path, cfg, key_a)
    assert load_file(path, {"AUD": "from-env"}).settings.projects["app"].audience == "from-env"


def test_default_applies_to_a_variable_set_but_empty(tmp_path: Path, key_a: KeyPair) -> None:
    # `${NAME:-default}` is the shell's (and Compose's) form: the default replaces an unset *or
    # empty* variable; `REDIS_URL=` exported empty must not become an empty redis_url.
    cfg = config()
    cfg["projects"]["app"]["audience"] = "${AUD:-default-audience}"
    path = write(tmp_path, cfg, key_a)
    assert load_file(path, {"AUD": ""}).settings.projects["app"].audience == "default-audience"


def test_an_empty_default_is_allowed(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["issuer"] = "${ISSUER:-}"
    assert load_file(write(tmp_path, cfg, key_a)).settings.projects["app"].issuer == ""


def test_unset_variable_without_default_names_path_and_variable(
    tmp_path: Path, key_a: KeyPair
) -> None:
    cfg = config()
    cfg["projects"]["app"]["audience"] = "${APP_AUDIENCE}"
    cfg["projects"]["app"]["api_keys"] = [f"sha256:{SHA256_OF_TEST}", "${APP_PROD_API_KEY}"]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.app\.audience: environment variable APP_AUDIENCE is not set",
        r"projects\.app\.api_keys\[1\]: environment variable APP_PROD_API_KEY is not set",
    )


def test_a_variable_value_never_adds_structure(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["audience"] = "${AUD}"
    injected = "aud\nissuer: evil\nmode: disabled\nkeys: []"
    settings = load_file(write(tmp_path, cfg, key_a), {"AUD": injected}).settings
    project = settings.projects["app"]
    assert project.audience == injected
    assert project.issuer is None
    assert project.mode == "required"
    assert [k.id for k in project.keys] == ["key-a"]


def test_a_variable_cannot_stand_in_for_a_mapping(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(projects="${PROJECTS}")
    path = write(tmp_path, cfg, key_a)
    assert_problems(
        problems(path, {"PROJECTS": "{app: {mode: disabled}}"}),
        r"projects: .*dictionary.*",
    )


def test_a_variable_value_is_not_substituted_again(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["audience"] = "${AUD}"
    settings = load_file(write(tmp_path, cfg, key_a), {"AUD": "${NOT_SET}-$$"}).settings
    assert settings.projects["app"].audience == "${NOT_SET}-$$"


def test_double_dollar_is_a_literal_dollar(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["audience"] = "pa$$word"
    cfg["projects"]["app"]["issuer"] = "$${NOT_SET}"
    project = load_file(write(tmp_path, cfg, key_a)).settings.projects["app"]
    assert project.audience == "pa$word"
    assert project.issuer == "${NOT_SET}"  # escaped, so not a variable and not an error


# --- YAML and schema ---------------------------------------------------------------------------


def test_unknown_keys_are_refused_with_their_path(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(listne="127.0.0.1:8080")
    cfg["upstream"]["ur"] = "http://127.0.0.1:1"
    cfg["projects"]["app"]["keyz"] = [{"id": "key-b", "pem_file": "keys/b.pem"}]
    cfg["routes"][0]["methdos"] = ["POST"]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"listne: unknown key(?: \(got .*\))?",
        r"upstream\.ur: unknown key(?: \(got .*\))?",
        r"projects\.app\.keyz: unknown key(?: \(got .*\))?",
        r"routes\[0\]\.methdos: unknown key(?: \(got .*\))?",
    )


def test_an_unknown_key_never_echoes_its_value(tmp_path: Path, key_a: KeyPair) -> None:
    # A misspelt key is often a misspelt secret (`api_key:` for `api_keys:`, `pme:` for `pem:`,
    # `redis_uri:` for `redis_url:`); its value is what the operator meant to keep secret.
    cfg = config()
    cfg["projects"]["app"]["api_key"] = "plain-api-key-0123456789"
    cfg["projects"]["app"]["keyz"] = [{"id": "key-b", "pem": key_a.public_pem}]
    cfg["failure_counter"] = {"redis_uri": "redis://:hunter2-password@10.0.0.1:6379/0"}
    with pytest.raises(ConfigError) as caught:
        compile_file(write(tmp_path, cfg, key_a))
    assert_problems(
        [str(p) for p in caught.value.problems],
        r"projects\.app\.api_key: unknown key",
        r"projects\.app\.keyz: unknown key",
        r"failure_counter\.redis_uri: unknown key",
    )
    text = str(caught.value)
    assert "plain-api-key-0123456789" not in text
    assert "hunter2-password" not in text
    assert pem_body(key_a.public_pem)[:40] not in text


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = write_text(
        tmp_path,
        "routes: []\nprojects:\n  app:\n    mode: required\n    mode: disabled\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    [problem] = [str(p) for p in caught.value.problems]
    assert re.fullmatch(
        rf"{re.escape(str(path))}: invalid YAML at line 5, column 5: duplicate key 'mode'",
        problem,
    ), problem


def test_an_unhashable_yaml_key_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = write_text(tmp_path, "projects:\n  ? [app, shop]\n  : {mode: disabled}\nroutes: []\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    [problem] = [str(p) for p in caught.value.problems]
    assert re.fullmatch(
        rf"{re.escape(str(path))}: invalid YAML at line \d+, column \d+: .+", problem
    )


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_file(write_text(tmp_path, "- listen: 127.0.0.1:8080\n"))
    assert [str(p) for p in caught.value.problems] == ["the config must be a YAML mapping"]


def test_bad_enum_values_name_the_value(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["mode"] = "requird"
    cfg["projects"]["app"]["algorithms"] = ["RS256", "none"]
    cfg["failure_counter"] = {"backend": "memcached"}
    cfg["routes"][0]["auth"] = ["sdk_jwt", "jwt"]
    cfg["routes"][0]["methods"] = ["POST", "FETCH"]
    cfg["routes"][0]["error_format"] = "braze"
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.app\.mode: .*'disabled', 'monitor' or 'required'.* \(got 'requird'\)",
        r"projects\.app\.algorithms\[1\]: .*'RS256'.* \(got 'none'\)",
        r"failure_counter\.backend: .*'memory' or 'redis'.* \(got 'memcached'\)",
        r"routes\[0\]\.auth\[1\]: .*'none', 'api_key' or 'sdk_jwt'.* \(got 'jwt'\)",
        r"routes\[0\]\.methods\[1\]: .*'GET'.* \(got 'FETCH'\)",
        r"routes\[0\]\.error_format: .*'standard' or 'bloomreach'.* \(got 'braze'\)",
    )


def test_a_bad_item_of_a_one_item_list_is_one_problem(tmp_path: Path, key_a: KeyPair) -> None:
    # `methods: [FETCH]` has one item, and it is wrong; "should have at least 1 item ... not 0"
    # would be a second, false, problem.
    cfg = config()
    cfg["routes"][0]["methods"] = ["FETCH"]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"routes\[0\]\.methods\[0\]: .*'GET'.* \(got 'FETCH'\)",
    )


@pytest.mark.parametrize("workers", [0, "many"])
def test_a_bad_workers_value_is_one_problem_at_its_yaml_path(
    tmp_path: Path, key_a: KeyPair, workers: int | str
) -> None:
    # `workers` is an integer or "auto": one problem at `workers`, not one per union member at
    # paths such as `workers.constrained-int` that appear nowhere in the YAML.
    cfg = config(workers=workers)
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        rf"workers: .*1 to 256, or auto \(got {re.escape(repr(workers))}\)",
    )


def test_every_schema_problem_is_reported_at_once(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(listen="127.0.0.1", limits={"max_token_bytes": 100})
    cfg["upstream"] = {"url": "ftp://tracking.example"}
    cfg["projects"]["app"]["mode"] = "strict"
    cfg["projects"]["app"]["audience"] = "${APP_AUDIENCE}"
    cfg["projects"]["app"]["leeway_seconds"] = 301
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"listen: expected HOST:PORT \(got '127\.0\.0\.1'\)",
        r"limits\.max_token_bytes: .*256.* \(got 100\)",
        r"upstream\.url: expected http\(s\)://.* \(got 'ftp://tracking\.example'\)",
        r"projects\.app\.mode: .* \(got 'strict'\)",
        r"projects\.app\.audience: environment variable APP_AUDIENCE is not set",
        r"projects\.app\.leeway_seconds: .*300.* \(got 301\)",
    )


def test_every_cross_field_problem_is_reported_at_once(tmp_path: Path, key_a: KeyPair) -> None:
    small = small_rsa_public_pem()
    cfg = config()
    cfg["projects"]["p1"] = project_with_key(small)
    cfg["projects"]["app"]["keys"].append({"id": "key-b", "pem_file": "keys/b.pem"})
    cfg["routes"][1]["name"] = "track-events"
    cfg["routes"][2]["path"] = "v2/sdkconfig"
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.p1\.keys\[0\]\.pem: RSA key is 1024 bits; at least 2048 required",
        r"projects\.app\.keys\[1\]\.pem_file: keys/b\.pem: no such file",
        r"routes\[0\]\.name: 'track-events' names two routes",
        r"routes\[1\]\.name: 'track-events' names two routes",
        r"routes\[2\]\.path: must start with / \(got 'v2/sdkconfig'\)",
    )


def test_schema_problems_do_not_hide_the_checks_after_the_schema(
    tmp_path: Path, key_a: KeyPair
) -> None:
    """An unknown key and a bad value elsewhere no longer hide a 1024-bit key: the config
    without the refused keys is checked too, and what that finds is reported with them."""
    cfg = config(listn="0.0.0.0:8080")
    cfg["projects"]["p1"] = project_with_key(small_rsa_public_pem())
    cfg["projects"]["app"]["leeway_seconds"] = 301
    cfg["routes"][1]["name"] = "track-events"
    with pytest.raises(ConfigError) as refused:
        load_and_compile(write(tmp_path, cfg, key_a), ManualClock(NOW))
    assert_problems(
        [str(p) for p in refused.value.problems],
        r"listn: .*",
        r"projects\.app\.leeway_seconds: .*300.* \(got 301\)",
        r"projects\.p1\.keys\[0\]\.pem: RSA key is 1024 bits; at least 2048 required",
        r"routes\[0\]\.name: 'track-events' names two routes",
        r"routes\[1\]\.name: 'track-events' names two routes",
    )


def test_a_refused_required_key_still_reports_the_schema_problems(
    tmp_path: Path, key_a: KeyPair
) -> None:
    cfg = config()
    cfg["routes"][0]["path"] = 42
    with pytest.raises(ConfigError) as refused:
        load_and_compile(write(tmp_path, cfg, key_a), ManualClock(NOW))
    assert_problems([str(p) for p in refused.value.problems], r"routes\[0\]\.path: .*")


# --- keys --------------------------------------------------------------------------------------


def test_rsa_key_under_2048_bits_is_refused(tmp_path: Path, key_a: KeyPair) -> None:
    small = small_rsa_public_pem()
    cfg = config()
    cfg["projects"]["p1"] = project_with_key(small)
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.p1\.keys\[0\]\.pem: RSA key is 1024 bits; at least 2048 required",
    )


@pytest.mark.parametrize(
    "private_format",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
    ids=["pkcs8", "pkcs1"],
)
def test_a_private_key_pasted_by_mistake_is_refused_without_echo(
    tmp_path: Path, key_a: KeyPair, private_format: serialization.PrivateFormat
) -> None:
    private_pem = key_a.private.private_bytes(
        serialization.Encoding.PEM, private_format, serialization.NoEncryption()
    ).decode()
    cfg = config()
    cfg["projects"]["p1"] = project_with_key(private_pem)
    with pytest.raises(ConfigError) as caught:
        compile_file(write(tmp_path, cfg, key_a))
    assert_problems(
        [str(p) for p in caught.value.problems],
        r"projects\.p1\.keys\[0\]\.pem: this is a private key; configure the public key only.*",
    )
    body = pem_body(private_pem)
    text = str(caught.value)
    assert all(body[i : i + 24] not in text for i in range(0, len(body) - 24, 24))


def test_a_pem_with_an_empty_body_is_refused(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["p1"] = project_with_key(
        "-----BEGIN PUBLIC KEY-----\n\n-----END PUBLIC KEY-----\n"
    )
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.p1\.keys\[0\]\.pem: the PEM body is empty",
    )


def test_garbage_pem_is_refused_without_echo(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["p1"] = project_with_key(
        "-----BEGIN PUBLIC KEY-----\nR2FyYmFnZUdhcmJhZ2VHYXJiYWdl\n-----END PUBLIC KEY-----\n"
    )
    cfg["projects"]["p2"] = project_with_key("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 ops@host")
    found = problems(write(tmp_path, cfg, key_a))
    assert_problems(
        found,
        r"projects\.p1\.keys\[0\]\.pem: the PUBLIC KEY PEM block does not parse",
        r"projects\.p2\.keys\[0\]\.pem: not a PEM block \(expected -----BEGIN PUBLIC KEY-----\)",
    )
    assert not any("R2FyYmFnZU" in p or "AAAAB3Nza" in p for p in found)


def test_a_missing_pem_file_is_named(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["keys"] = [{"id": "key-b", "pem_file": "keys/b.pem"}]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.app\.keys\[0\]\.pem_file: keys/b\.pem: no such file",
    )


def test_pem_file_is_relative_to_the_config_file(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = write(config_dir, config(), key_a)
    # The working directory holds a keys/a.pem too, with another key: it must not be read.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keys").mkdir(parents=True)
    (elsewhere / "keys" / "a.pem").write_text(key_b.public_pem)
    monkeypatch.chdir(elsewhere)
    compiled = compile_file(Path("..") / "etc" / path.name)
    assert compiled.key_fingerprints["app"] == (("key-a", expected_fingerprint(key_a)),)


def test_two_keys_of_one_project_never_share_an_id(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair
) -> None:
    cfg = config()
    cfg["projects"]["app"]["keys"] = [
        {"id": "key-a", "pem_file": "keys/a.pem"},
        {"id": "key-b", "pem": key_b.public_pem},
        {"id": "key-a", "pem": key_b.public_pem},
    ]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.app\.keys\[2\]\.id: 'key-a' is already the id of keys\[0\]",
    )


@pytest.mark.parametrize("mode", ["monitor", "required"])
def test_an_enforcing_project_needs_a_key_source(tmp_path: Path, key_a: KeyPair, mode: str) -> None:
    cfg = config()
    cfg["projects"]["p1"] = {"mode": mode}
    cfg["defaults"] = {"mode": mode}
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        rf"projects\.p1\.keys: mode {mode} needs at least one key source \(keys, jwks_\w+, .*\)",
        rf"defaults\.keys: mode {mode} needs at least one key source \(keys, jwks_\w+, .*\)",
    )


def test_a_disabled_project_needs_no_keys(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["p1"] = {"mode": "disabled"}
    compiled = compile_file(write(tmp_path, cfg, key_a))
    assert compiled.project("p1").mode == "disabled"


# --- routes ------------------------------------------------------------------------------------


def test_sdk_jwt_route_needs_identity_and_token_sources(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(identity=[], token=[])  # the defaults the first route falls back on
    cfg["routes"][1]["token"] = []
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"routes\[0\]\.identity: sdk_jwt needs at least one identity source",
        r"routes\[0\]\.token: sdk_jwt needs at least one token source",
        r"routes\[1\]\.token: sdk_jwt needs at least one token source",
    )


def test_a_token_is_never_read_from_json(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["routes"][0]["token"] = [{"json": "auth.token"}]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"routes\[0\]\.token\[0\]: a token is read from a header or query, not json",
        r"routes\[0\]\.token: sdk_jwt needs at least one token source",
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("track/{project}", r"must start with /"),
        ("/track/{project", r"unclosed \{ at offset 7"),
        ("/track/project}", r"unbalanced \} at offset 14"),
        ("/track/{1st}", r"placeholder name '1st' is not an identifier"),
        ("/track/{project}/{project}", r"placeholder 'project' appears twice"),
        ("/track//{project}", r"has an empty segment"),
        ("/track/%7B{project}", r"character '%' can never match a valid path"),
        ("/track/{project:[a-z}", r"placeholder regex does not compile: .*"),
    ],
)
def test_bad_path_templates_are_refused(
    tmp_path: Path, key_a: KeyPair, template: str, message: str
) -> None:
    cfg = config()
    cfg["routes"][0]["path"] = template
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        rf"routes\[0\]\.path: {message} \(got {re.escape(repr(template))}\)",
    )


def test_a_route_without_a_project_is_refused(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["routes"][0]["path"] = "/track/events"
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"routes\[0\]: no project: add \{project\} to the path, or a project: \{header\|id\} block",
    )


def test_route_names_are_unique(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["routes"][2]["name"] = "track-batch"
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"routes\[1\]\.name: 'track-batch' names two routes",
        r"routes\[2\]\.name: 'track-batch' names two routes",
    )


def test_project_ids_never_differ_only_by_case(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["App"] = copy.deepcopy(cfg["projects"]["app"])
    cfg["projects"]["App"]["audience"] = "a"
    cfg["projects"]["app"]["audience"] = "b"
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.app: another project id differs only by case",
        r"projects\.App: another project id differs only by case",
    )


def test_no_header_serves_two_roles(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    # `X_User_Id` is `X-User-Id` to servers that read `_` as `-`.
    cfg["routes"][0]["session"] = [{"header": "X_User_Id"}]
    cfg["routes"][1]["token"] = [{"header": "X-App-Id"}]
    cfg["routes"][1]["project"] = {"header": "x-app-id"}
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"routes\[0\]: header x-user-id serves two roles: identity, session",
        r"routes\[1\]: header x-app-id serves two roles: project, token",
    )


def test_api_key_route_needs_projects_with_api_keys(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["routes"][0]["auth"] = ["api_key", "sdk_jwt"]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"routes\[0\]\.auth: api_key reaches defaults, which has no api_keys",
        r"routes\[0\]\.auth: api_key reaches projects\.app, which has no api_keys",
    )


def test_api_keys_accept_sha256_and_plain_entries(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(defaults={"mode": "disabled", "api_keys": ["${DEFAULT_API_KEY}"]})
    cfg["projects"]["app"]["api_keys"] = [f"sha256:{SHA256_OF_TEST.upper()}"]
    cfg["routes"][0]["auth"] = ["api_key", "sdk_jwt"]
    compiled = compile_file(write(tmp_path, cfg, key_a), {"DEFAULT_API_KEY": "fallback-key"})
    assert compiled.project("app").api_key_matches("test")
    assert not compiled.project("app").api_key_matches("tesT")
    assert compiled.project("other").api_key_matches("fallback-key")
    assert not compiled.project("other").api_key_matches("")


@pytest.mark.parametrize(
    "entry",
    [
        "sha256:abcd",  # hex, too short
        "sha256:" + SHA256_OF_TEST + "00",  # hex, too long
        "sha256:" + "g" * 64,  # 64 digits, not hexadecimal
        "sha256:" + SHA256_OF_TEST[:-1] + " ",  # a stray space
        "sha256:not-hex",
    ],
)
def test_an_invalid_sha256_api_key_is_refused(tmp_path: Path, key_a: KeyPair, entry: str) -> None:
    cfg = config()
    cfg["projects"]["app"]["api_keys"] = [f"sha256:{SHA256_OF_TEST}", entry]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.app\.api_keys\[1\]: sha256: needs 64 hexadecimal digits",
    )


def test_an_empty_api_key_is_refused(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["api_keys"] = ["${APP_API_KEY:-}"]
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"projects\.app\.api_keys\[0\]: an API key is empty",
    )


def test_trusted_proxies_must_be_cidrs(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(trusted_proxies=["10.0.0.0/8", "proxy.internal", "::1/128", "192.168.1.0/33"])
    found = problems(write(tmp_path, cfg, key_a))
    # Both bad entries are problems; `listing every problem` means neither hides the other.
    assert_problems(
        found,
        r"trusted_proxies\[1\]: not a CIDR .* \(got 'proxy\.internal'\)",
        r"trusted_proxies\[3\]: not a CIDR .* \(got '192\.168\.1\.0/33'\)",
    )


def test_valid_trusted_proxies_compile(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(trusted_proxies=["10.0.0.0/8", "::1/128", "192.168.1.7"])
    compiled = compile_file(write(tmp_path, cfg, key_a))
    assert [str(n) for n in compiled.trusted_proxies] == ["10.0.0.0/8", "::1/128", "192.168.1.7/32"]


@pytest.mark.parametrize(
    "url",
    [
        "ws://tracking.example",
        "ftp://127.0.0.1:8000",
        "127.0.0.1:8000",
        "http://127.0.0.1:8000/track?x=1",
        "http://127.0.0.1:8000/#frag",
    ],
)
def test_upstream_url_must_be_http_or_https(tmp_path: Path, key_a: KeyPair, url: str) -> None:
    cfg = config(upstream={"url": url})
    assert_problems(
        problems(write(tmp_path, cfg, key_a)),
        r"upstream\.url: expected http\(s\)://HOST\[:PORT\]\[/PREFIX\] with no query or fragment"
        rf" \(got {re.escape(repr(url))}\)",
    )


def test_upstream_url_loses_a_trailing_slash(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(upstream={"url": "http://127.0.0.1:8000/api/"})
    assert load_file(write(tmp_path, cfg, key_a)).settings.upstream.url == (
        "http://127.0.0.1:8000/api"
    )


def test_secret_bearing_values_are_never_echoed(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["api_keys"] = "plain-api-key-0123456789"  # a string, not a list
    cfg["projects"]["app"]["keys"] = [
        {"id": "key-a", "pem": ["-----BEGIN PUBLIC KEY-----", "c2VjcmV0LXBlbS1ib2R5"]},
    ]
    cfg["failure_counter"] = {"redis_url": ["redis://:hunter2-password@10.0.0.1:6379/0"]}
    with pytest.raises(ConfigError) as caught:
        compile_file(write(tmp_path, cfg, key_a))
    found = [str(p) for p in caught.value.problems]
    assert_problems(
        found,
        r"projects\.app\.api_keys: [^(]*",
        r"projects\.app\.keys\[0\]\.pem: [^(]*",
        r"failure_counter\.redis_url: [^(]*",
    )
    text = str(caught.value)
    assert "plain-api-key-0123456789" not in text
    assert "c2VjcmV0LXBlbS1ib2R5" not in text
    assert "hunter2-password" not in text


def test_a_short_hmac_secret_is_refused_without_echo(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["hs"] = {
        "mode": "required",
        "algorithms": ["HS256"],
        "keys": [{"id": "s1", "secret": "${HS_SECRET}"}],
    }
    found = problems(write(tmp_path, cfg, key_a), {"HS_SECRET": "short-hmac-secret"})
    assert_problems(
        found,
        r"projects\.hs\.keys\[0\]\.secret: HMAC secret is 17 bytes; HS256 needs at least 32",
    )
    assert not any("short-hmac-secret" in p for p in found)


# --- warnings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, "auto"])
def test_memory_counter_with_several_workers_warns(
    tmp_path: Path, key_a: KeyPair, workers: int | str
) -> None:
    compiled = compile_file(write(tmp_path, config(workers=workers), key_a))
    assert [str(w) for w in compiled.warnings] == [
        "failure_counter.backend: memory with more than one worker: "
        "each worker counts its sessions alone"
    ]


def test_one_worker_does_not_warn(tmp_path: Path, key_a: KeyPair) -> None:
    assert compile_file(write(tmp_path, config(workers=1), key_a)).warnings == ()


def test_projects_sharing_a_key_without_audience_or_issuer_warn(
    tmp_path: Path, key_a: KeyPair
) -> None:
    cfg = config()
    cfg["projects"]["shop"] = {"mode": "monitor", "keys": [{"id": "k", "pem": key_a.public_pem}]}
    compiled = compile_file(write(tmp_path, cfg, key_a))
    [warning] = [str(w) for w in compiled.warnings]
    fp = re.escape(expected_fingerprint(key_a))
    assert re.fullmatch(
        rf"projects: projects app, shop share key .*{fp}.* and app, shop set no audience or "
        r"issuer: each accepts the other's tokens",
        warning,
    ), warning


def test_projects_sharing_a_key_with_audiences_do_not_warn(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config()
    cfg["projects"]["app"]["audience"] = "app"
    cfg["projects"]["shop"] = {
        "mode": "monitor",
        "audience": "shop",
        "keys": [{"id": "k", "pem": key_a.public_pem}],
    }
    assert compile_file(write(tmp_path, cfg, key_a)).warnings == ()


def test_one_key_under_two_ids_of_one_project_is_not_a_shared_key(
    tmp_path: Path, key_a: KeyPair
) -> None:
    cfg = config()
    cfg["projects"]["app"]["keys"].append({"id": "key-a-again", "pem": key_a.public_pem})
    compiled = compile_file(write(tmp_path, cfg, key_a))
    assert not any("share key" in str(w) for w in compiled.warnings), compiled.warnings


@pytest.mark.parametrize(("seconds", "warns"), [(1, True), (9, True), (10, False)])
def test_jwks_refresh_below_ten_seconds_is_accepted_with_a_warning(
    tmp_path: Path, key_a: KeyPair, seconds: int, warns: bool
) -> None:
    cfg = config()
    cfg["projects"]["app"].update(
        jwks_url="https://auth.example.com/jwks.json", jwks_refresh_seconds=seconds
    )
    warnings = [str(w) for w in compile_file(write(tmp_path, cfg, key_a)).warnings]
    expected = (
        f"projects.app.jwks_refresh_seconds: {seconds} s: every replica fetches the JWKS this "
        "often; identity providers may rate-limit below 10 s"
    )
    assert warnings == ([expected] if warns else [])


def test_warnings_do_not_fail_the_config(tmp_path: Path, key_a: KeyPair) -> None:
    cfg = config(workers=2)
    cfg["projects"]["shop"] = {"mode": "monitor", "keys": [{"id": "k", "pem": key_a.public_pem}]}
    compiled = compile_file(write(tmp_path, cfg, key_a))
    assert len(compiled.warnings) == 2
    assert compiled.project("shop").mode == "monitor"
    assert compiled.settings.workers == 2
