"""Packaging checks: the compose file, the files it mounts and builds from, the gateway configs it
ships, and the Grafana dashboard's queries against the metrics `gateway.metrics` exports.

`docker-compose config -q` needs the docker-compose binary (Debian's v1 validates without a Docker
engine: `apt-get install -y docker-compose`); under CI=true its absence is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import load_catalog
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_DIR = ROOT / "deploy" / "compose"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "plateforme.json"
DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "plateforme.yaml"
CONFIGS = {"default": COMPOSE_DIR / "config.yaml", "dev": COMPOSE_DIR / "config.dev.yaml"}
# The compose variables an operator sets, per documented way of starting the stack.
COMPOSE_ENVS = {
    "default": {},
    "dev": {"PLATEFORME_COMPOSE_CONFIG": "./deploy/compose/config.dev.yaml"},
}
APT_HINT = "apt-get update && apt-get install -y docker-compose"
DUMMY_ADMIN_TOKEN = "compose-validation-token-0123456789"

# Labels Prometheus adds at scrape time, and `pid` (multiprocess "liveall" gauges).
SCRAPE_LABELS = frozenset({"instance", "job"})
PROMQL_FUNCTIONS = frozenset({
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev",
    "rate", "irate", "increase", "delta", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "round", "vector", "scalar", "time", "label_replace", "sum_over_time",
    "avg_over_time", "max_over_time", "min_over_time", "absent",
})
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})
PROMQL_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_TOKEN = re.compile(
    r'"(?:\\.|[^"\\])*"|\{[^}]*\}|\[[^\]]*\]|[A-Za-z_:][A-Za-z0-9_:]*'
    r"|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|\S"
)
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"(?:\\.|[^"\\])*"\s*,?')
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- what the gateway exports -------------------------------------------------------------------

def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the gateway can expose, with the labels each may carry.

    Built from a live `Metrics.create()` registry, so a renamed or removed metric breaks the
    dashboard test instead of a panel silently showing "No data".
    """
    metrics = Metrics.create()
    labels_by_family: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        # prometheus-client has no public accessor for a metric's label names.
        names = getattr(value, "_labelnames", None)
        family = getattr(value, "_name", None)
        if names is not None and family is not None:
            labels_by_family[family] = frozenset(names)
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        base = labels_by_family[family.name] | SCRAPE_LABELS
        if family.type == "counter":
            series[f"{family.name}_total"] = base
            series[f"{family.name}_created"] = base
        elif family.type == "histogram":
            series[f"{family.name}_bucket"] = base | {"le"}
            series[f"{family.name}_count"] = base
            series[f"{family.name}_sum"] = base
        elif family.type == "gauge":
            series[family.name] = base | {"pid"}
        else:
            series[family.name] = base
    return series


def test_exported_series_cover_suffix_forms() -> None:
    series = exported_series()
    assert "plateforme_requests_total" in series
    assert "plateforme_request_duration_seconds_bucket" in series
    assert "le" in series["plateforme_request_duration_seconds_bucket"]
    assert "plateforme_store_up" in series
    assert "plateforme_requests" not in series  # a counter's bare family name is not a series


# --- PromQL -------------------------------------------------------------------------------------

@dataclass
class Query:
    """What a PromQL expression references: metric selectors with their matcher labels, the
    labels named in by/without/on/ignoring clauses, and the functions called."""

    selectors: list[tuple[str, list[str]]] = field(default_factory=list)
    grouping: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)


def parse_promql(expr: str) -> Query:
    tokens = _TOKEN.findall(expr)
    query = Query()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in PROMQL_GROUPING:
            if nxt == "(":
                i += 2
                while i < len(tokens) and tokens[i] != ")":
                    if tokens[i] != ",":
                        query.grouping.append(tokens[i])
                    i += 1
        elif re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", token) and token not in PROMQL_KEYWORDS:
            if nxt == "(" or nxt in PROMQL_GROUPING:  # a call, or `sum by (...) (...)`
                query.functions.append(token)
            else:
                matchers: list[str] = []
                if nxt.startswith("{"):
                    body = nxt[1:-1]
                    matched = _MATCHER.findall(body)
                    assert "".join(m.group(0) for m in _MATCHER.finditer(body)).strip() == \
                        body.strip(), f"unparsed label matchers {nxt!r} in {expr!r}"
                    matchers = [name for name, _ in matched]
                    i += 1
                query.selectors.append((token, matchers))
        elif token.startswith("{"):
            raise AssertionError(f"selector without a metric name in {expr!r}")
        i += 1
    return query


def test_parse_promql() -> None:
    q = parse_promql('histogram_quantile(0.9, sum by (le, model) (rate(a_bucket{model=~"$m", '
                     'x="y"}[$__rate_interval]))) / on (model) b')
    assert q.selectors == [("a_bucket", ["model", "x"]), ("b", [])]
    assert q.grouping == ["le", "model", "model"]
    assert q.functions == ["histogram_quantile", "sum", "rate"]


# --- the dashboard ------------------------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def panel_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(panel["title"], target["expr"])
            for panel in all_panels(load_dashboard()) if panel["type"] != "row"
            for target in panel.get("targets", [])]


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    datasource_uids = {ds["uid"] for ds in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = set()
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] not in titles, f"duplicate panel title {panel['title']!r}"
        titles.add(panel["title"])
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] in datasource_uids, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in datasource_uids, panel["title"]
            assert target["expr"].strip(), panel["title"]
    # The panels: traffic, errors, latency, TTFT, tokens, rate limits, replica health.
    joined = " ".join(expr for _, expr in panel_exprs())
    for needed in ("plateforme_requests_total", 'status_class="5xx"',
                   "plateforme_request_duration_seconds_bucket",
                   "plateforme_time_to_first_token_seconds_bucket", "plateforme_tokens_total",
                   "plateforme_rate_limited_total", "plateforme_replica_healthy",
                   "plateforme_replica_outstanding_requests", "plateforme_store_up",
                   "plateforme_store_latency_seconds_bucket"):
        assert needed in joined, f"no dashboard panel queries {needed}"


@pytest.mark.parametrize(("title", "expr"), [
    pytest.param(title, expr, id=f"{title}:{i}") for i, (title, expr) in enumerate(panel_exprs())])
def test_dashboard_queries_name_exported_metrics(title: str, expr: str) -> None:
    series = exported_series()
    query = parse_promql(expr)
    assert query.selectors, f"{title!r}: no metric in {expr!r}"
    used_labels: set[str] = set()
    for name, matchers in query.selectors:
        assert name in series, (
            f"panel {title!r} queries {name!r}, which gateway/metrics.py does not export "
            f"(exported: {sorted(series)})")
        unknown = set(matchers) - series[name]
        assert not unknown, f"panel {title!r}: {name} has no label(s) {sorted(unknown)}"
        used_labels |= series[name]
    unknown_grouping = set(query.grouping) - used_labels
    assert not unknown_grouping, f"panel {title!r} groups by unknown {sorted(unknown_grouping)}"
    unknown_functions = set(query.functions) - PROMQL_FUNCTIONS
    assert not unknown_functions, f"panel {title!r} calls unknown {sorted(unknown_functions)}"


def test_dashboard_variables_use_exported_metrics() -> None:
    series = exported_series()
    for variable in load_dashboard()["templating"]["list"]:
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
        assert match, f"variable {variable['name']}: unexpected query {text!r}"
        assert match[1] in series and match[2] in series[match[1]], text


def test_dashboard_promql_parses_with_promtool(tmp_path: Path) -> None:
    """Syntax check by Prometheus itself, where promtool is installed (Debian `prometheus`)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    rules = [{"record": f"plateforme:check:{i}",
              "expr": expr.replace("$__rate_interval", "1m").replace("$model", ".*")}
             for i, (_, expr) in enumerate(panel_exprs())]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    for args in (["check", "rules", str(rules_file)],
                 ["check", "config", "--syntax-only", str(COMPOSE_DIR / "prometheus.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


# --- the compose file ---------------------------------------------------------------------------

def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR:?message}` with the given variables."""
    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return "<required>"
        return ""
    return _INTERPOLATION.sub(one, text)


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    data = yaml.safe_load(interpolate(COMPOSE_FILE.read_text(encoding="utf-8"), env))
    assert isinstance(data, dict)
    return data


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                yield volume["source"], volume["target"]
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/", "~")):
            yield source, target


def dockerfile_sources(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    sources: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0].upper() in ("COPY", "ADD"):
            args = [w for w in words[1:] if not w.startswith("--")]
            if any(w.startswith("--from") for w in words[1:]):
                continue
            sources.extend(args[:-1])
    return sources


@pytest.mark.parametrize("variant", sorted(COMPOSE_ENVS))
def test_compose_mounts_and_build_contexts_exist(variant: str) -> None:
    compose = load_compose(COMPOSE_ENVS[variant])
    checked = 0
    for name, service in compose["services"].items():
        for source, target in bind_mounts(service):
            path = (ROOT / source).resolve()
            assert path.exists(), f"service {name} mounts {source} ({path}), which is missing"
            assert ROOT in path.parents, f"service {name} mounts {source} from outside the repo"
            checked += 1
        build = service.get("build")
        if build is None:
            continue
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"service {name} builds from missing {dockerfile}"
        for source in dockerfile_sources(dockerfile):
            assert (context / source).exists(), f"{dockerfile.name} copies missing {source}"
        checked += 1
    assert checked >= 5


def test_compose_wiring() -> None:
    """The cross-references a typo would break at run time, not at `docker-compose config`."""
    compose = load_compose(COMPOSE_ENVS["default"])
    services = compose["services"]
    profiles = {name: set(s.get("profiles", [])) for name, s in services.items()}
    for name in ("redis", "gateway", "prometheus", "grafana"):
        assert not profiles[name], f"{name} must start without a profile"
    assert {"sim-tiny", "sim-small"} <= {n for n, p in profiles.items() if "dev" in p}
    assert any("gpu" in p for p in profiles.values())

    assert "--appendonly" in services["redis"]["command"]
    gateway = services["gateway"]
    assert gateway["environment"]["PLATEFORME_STORE"].startswith("redis://redis:")
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in gateway
    assert "${PLATEFORME_ADMIN_TOKEN:?" in COMPOSE_FILE.read_text()

    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert "gateway:8000" in targets
    for ds in yaml.safe_load(DATASOURCES.read_text())["datasources"]:
        assert urlsplit(ds["url"]).hostname in services, ds["url"]
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    grafana_targets = {target for _, target in bind_mounts(services["grafana"])}
    for provider in providers:
        assert provider["options"]["path"] in grafana_targets, provider["options"]["path"]


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_compose_configs_pass_gateway_validation(variant: str) -> None:
    catalog = load_catalog(CONFIGS[variant])
    assert catalog.models and catalog.plans
    services = load_compose(COMPOSE_ENVS[variant])["services"]
    gateway_env = services["gateway"]["environment"]
    for name, model in catalog.models.items():
        if model.replica_api_key_env:  # the gateway refuses to start without it
            assert model.replica_api_key_env in gateway_env, model.replica_api_key_env
        for replica in model.replicas:
            host = urlsplit(replica).hostname
            assert host in services, f"{variant}: {name} replica {replica} is not a service"
            if variant == "dev":
                assert "dev" in services[host].get("profiles", []), replica


def docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        message = f"docker-compose is not installed; install it with: {APT_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def run_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A clean environment: an operator's own COMPOSE_* or PLATEFORME_* must not leak in.
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    return subprocess.run(
        [docker_compose(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("variant", sorted(COMPOSE_ENVS))
def test_compose_file_validates(variant: str) -> None:
    env = {**COMPOSE_ENVS[variant], "PLATEFORME_ADMIN_TOKEN": DUMMY_ADMIN_TOKEN}
    done = run_compose("config", "-q", env=env)
    assert done.returncode == 0, f"docker-compose config -q:\n{done.stderr}"
    done = run_compose("--profile", "dev", "--profile", "gpu", "config", env=env)
    assert done.returncode == 0, f"docker-compose --profile dev --profile gpu:\n{done.stderr}"
    resolved = yaml.safe_load(done.stdout)
    assert {"sim-tiny", "sim-small", "vllm-tiny"} <= set(resolved["services"])
    gateway_mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
                      for v in resolved["services"]["gateway"]["volumes"]]
    expected = "config.dev.yaml" if variant == "dev" else "config.yaml"
    assert any(m.split(":")[0].endswith(f"deploy/compose/{expected}") for m in gateway_mounts)


def test_compose_requires_admin_token() -> None:
    done = run_compose("config", "-q", env={})
    assert done.returncode != 0
    assert "PLATEFORME_ADMIN_TOKEN" in done.stderr


# --- the image ----------------------------------------------------------------------------------

def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim|^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r"^HEALTHCHECK .*?/health", text, re.M | re.S)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert '"gateway", "serve", "--config", "/etc/plateforme/config.yaml"' in text
    assert "[dev]" not in text and "skypilot" not in text.lower().replace("no skypilot", "")
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignored or ".venv" in ignored or ".venv/" in ignored
