"""Readers for the deployment files: Dockerfile, docker-compose.yml, deploy/nginx.conf and
deploy/prometheus.yml. No Docker engine runs here, so tests read these files the way Docker,
Compose and nginx would and check them against the code (tests/test_deploy_*.py).

The Dockerfile is read with `dockerfile` (BuildKit's own parser), nginx.conf with `crossplane`
(nginx's config parser), YAML with PyYAML. Compose's `${VAR:-default}` interpolation is done
here: its few forms are simpler than another dependency.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import crossplane
import dockerfile
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOCKERIGNORE = ROOT / ".dockerignore"

# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[dockerfile.Command]]:
    """Each stage's instructions by stage name, in file order (dicts keep it)."""
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] | None = None
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            value = command.value
            assert len(value) == 3 and value[1].upper() == "AS", f"unnamed stage: {command}"
            current = stages.setdefault(value[2], [])
        if current is not None:
            current.append(command)
    return stages


def dockerfile_args() -> dict[str, str]:
    """The global ARGs (before the first FROM) with their defaults."""
    args = {}
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
    return args


def instructions(stage: list[dockerfile.Command], cmd: str) -> list[dockerfile.Command]:
    return [command for command in stage if command.cmd == cmd]


def exec_form(stage: list[dockerfile.Command], cmd: str) -> list[str]:
    """The last ENTRYPOINT / CMD of a stage, which must be in exec (JSON) form: no shell."""
    found = instructions(stage, cmd)
    if not found:
        return []
    assert found[-1].json, f"{cmd} must be in exec form: {found[-1].original}"
    return list(found[-1].value)


def image_command(stage: list[dockerfile.Command]) -> list[str]:
    """What a container of this stage runs: ENTRYPOINT followed by CMD."""
    return exec_form(stage, "ENTRYPOINT") + exec_form(stage, "CMD")


def image_env(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in instructions(stage, "ENV"):
        pairs = command.value
        env.update(zip(pairs[::2], pairs[1::2], strict=True))
    return env


def healthcheck(stage: list[dockerfile.Command]) -> tuple[list[str], tuple[str, ...]]:
    """(the command, the flags) of the stage's HEALTHCHECK, which must be `CMD [exec form]`."""
    (check,) = instructions(stage, "HEALTHCHECK")
    assert check.json and check.value[0] == "CMD", check.original
    return list(check.value[1:]), check.flags


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# -- docker-compose.yml ---------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?-)(?P<default>[^}$]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$`; other forms fail."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op = match["name"], match["op"]
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return match["default"]
        return value or ""

    result = _VARIABLE.sub(replace, text)
    left = _VARIABLE.sub("", text).replace("$$", "")
    assert "$" not in left, f"a compose variable form not understood here: {text!r}"
    return result


def _interpolated(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    return node


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as Compose reads it, variables taken from `env` (default: none set,
    so every `${VAR:-default}` is its default)."""
    return _interpolated(yaml.safe_load(COMPOSE.read_text()), env or {})


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of Compose's forms (mapping or KEY=VALUE list)."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def api_services(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the server image (built from the Dockerfile's `server` stage)."""
    return {
        name: service
        for name, service in spec["services"].items()
        if (service.get("build") or {}).get("target") == "server"
    }


def bind_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to the repo) of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def named_volumes(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> volume name of a service's named volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):
            mounts[target] = source
    return mounts


# -- deploy/nginx.conf ----------------------------------------------------------------------------

BEGIN_UPSTREAMS = "# BEGIN upstream servers"
END_UPSTREAMS = "# END upstream servers"


def nginx_config() -> list[dict[str, Any]]:
    """The parsed directives of deploy/nginx.conf (an http{}-level file, hence no context check;
    the process tests run the real nginx on it)."""
    parsed = crossplane.parse(str(NGINX_CONF), single=True, check_ctx=False)
    assert parsed["status"] == "ok", parsed["errors"]
    return parsed["config"][0]["parsed"]


def block(directives: list[dict[str, Any]], name: str, *args: str) -> list[dict[str, Any]]:
    """The body of the one block `name args... { }` at this level."""
    (found,) = [
        d for d in directives if d["directive"] == name and d["args"][: len(args)] == list(args)
    ]
    return found["block"]


def values(directives: list[dict[str, Any]], name: str) -> list[list[str]]:
    """The arguments of every `name` directive directly in this block."""
    return [d["args"] for d in directives if d["directive"] == name]


def value(directives: list[dict[str, Any]], name: str) -> str:
    (args,) = values(directives, name)
    assert len(args) == 1, args
    return args[0]


_SIZE = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
_TIME = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def nginx_size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", text).groups()
    return int(number) * _SIZE[unit.lower()]


def nginx_seconds(text: str) -> float:
    """An nginx time such as `90s`, `1h30m` or `500ms`."""
    parts = re.findall(r"(\d+)(ms|[smhdw]?)", text)
    assert "".join(n + u for n, u in parts) == text, f"not an nginx time: {text}"
    return sum(int(number) * _TIME[unit] for number, unit in parts)


def render_nginx(upstreams: list[str], listen: str) -> str:
    """deploy/nginx.conf with only the upstream servers (the marked block) and the listen
    address changed, as the process tests run it."""
    text = NGINX_CONF.read_text()
    head, begin, rest = text.partition(BEGIN_UPSTREAMS)
    servers, end, tail = rest.partition(END_UPSTREAMS)
    assert begin and end and text.count(BEGIN_UPSTREAMS) == text.count(END_UPSTREAMS) == 1
    shipped = [line.split() for line in servers.splitlines() if line.strip()]
    assert shipped and all(words[0] == "server" for words in shipped), servers
    (options,) = {tuple(words[2:]) for words in shipped}  # every server has the same options
    indent = head[head.rindex("\n") + 1 :]
    lines = "".join(f"{indent}server {' '.join((address, *options))}\n" for address in upstreams)
    text = f"{head}{begin}\n{lines}{indent}{end}{tail}"
    text, count = re.subn(r"^( *)listen [^;]+;", rf"\g<1>listen {listen};", text, flags=re.M)
    assert count == 1, "one listen line"
    return text


class Nginx:
    """Debian's nginx as an unprivileged child process running a rendered deploy/nginx.conf.

    deploy/nginx.conf is an http{}-level file, as the official image includes it; the main
    file here is the smallest host around it: pid, logs and temp paths in `directory`.
    """

    def __init__(self, binary: str, directory: Path, upstreams: list[str], port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = directory / "nginx.log"
        (directory / "temp").mkdir(parents=True)
        (directory / "site.conf").write_text(render_nginx(upstreams, f"127.0.0.1:{port}"))
        temp = " ".join(
            f"{kind}_temp_path temp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (directory / "nginx.conf").write_text(
            f"pid {directory}/nginx.pid;\n"
            f"error_log {directory}/error.log info;\n"
            "worker_processes 1;\n"
            "events { worker_connections 256; }\n"
            f"http {{ {temp} include {directory}/site.conf; }}\n"
        )
        self.process: subprocess.Popen | None = None

    def command(self, *extra: str) -> list[str]:
        conf = str(self.directory / "nginx.conf")
        return [self.binary, "-p", f"{self.directory}/", "-c", conf, *extra]

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self) -> Nginx:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command("-g", "daemon off;"), stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
