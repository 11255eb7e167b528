"""Grafana dashboards and the Prometheus config: they parse, and every PromQL expression names only
series that raytron exports. Ray exports a ray.util.metrics series `name` as `ray_name` (checked against
a real Ray 2.60 metrics port: `raytron_train_loss` -> `ray_raytron_train_loss`, with labels run,
SessionName, NodeAddress, WorkerId, Component, Version)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

from raytron.train.prometheus import SERIES

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
TRAINING = DASHBOARDS / "grafana" / "raytron-training.json"
SERVING = DASHBOARDS / "grafana" / "raytron-serving.json"
RAY_PREFIX = "ray_"

# Fixed by the serving dashboard for the serving work: (name, kind).
SERVE_SERIES = {
    "raytron_serve_requests_total": "counter",
    "raytron_serve_errors_total": "counter",
    "raytron_serve_time_to_first_token_seconds": "histogram",
    "raytron_serve_inter_token_latency_seconds": "histogram",
    "raytron_serve_generated_tokens_total": "counter",
    "raytron_serve_running_batch_size": "gauge",
    "raytron_serve_tp_ranks": "gauge",
    "raytron_serve_prompt_tokens_total": "counter",
    "raytron_serve_logprob_requests_total": "counter",
    "raytron_serve_queue_time_seconds": "histogram",
}
# Ray's own series on the cluster panels (names as Ray 2.60 exports them): the autoscaler's, Serve's replicas.
CLUSTER_SERIES = {"autoscaler_active_nodes", "autoscaler_pending_nodes", "autoscaler_pending_resources"}
REPLICA_SERIES = {"ray_serve_deployment_replica_healthy"}
CLUSTER_PANELS = {"Nodes up", "Pending resources"}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "inf", "nan",
}


def exported(name: str, kind: str = "gauge") -> set[str]:
    base = RAY_PREFIX + name
    return {base + suffix for suffix in ("_bucket", "_sum", "_count")} if kind == "histogram" else {base}


def series_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, groupings and functions removed)."""
    expr = re.sub(r"\"(?:[^\"\\]|\\.)*\"", '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*\s*\(", "(", expr)
    expr = re.sub(r"(?<![A-Za-z0-9_])\d+(\.\d+)?([eE][+-]?\d+)?", " ", expr)
    return {name for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if name.lower() not in PROMQL_WORDS}


def panels(board: dict) -> list[dict]:
    flat = []
    for panel in board["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return [panel for panel in flat if panel["type"] != "row"]


def expressions(board: dict) -> list[tuple[str, str]]:
    found = [(panel["title"], target["expr"]) for panel in panels(board) for target in panel["targets"]]
    found += [(f"variable {var['name']}", var["definition"]) for var in board["templating"]["list"]
              if var["type"] == "query"]
    return found


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_series_parser():
    assert series_in('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"$y"}[$__rate_interval])))') == {
        "a_bucket"}
    assert series_in("sum(rate(a_total[1m])) / on (run) b * 1e-12") == {"a_total", "b"}
    assert series_in("label_values(ray_raytron_train_step, run)") == {"ray_raytron_train_step", "run"}


@pytest.mark.parametrize("path", [TRAINING, SERVING], ids=lambda path: path.name)
def test_dashboard_is_grafana_json(path):
    board = load(path)
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
    assert any(var["type"] == "datasource" and var["query"] == "prometheus" for var in board["templating"]["list"])


def test_training_dashboard_uses_only_raytron_training_series():
    board = load(TRAINING)
    allowed = {RAY_PREFIX + name for name in SERIES.values()} | CLUSTER_SERIES
    for title, expr in expressions(board):
        names = series_in(expr) - {"run"}  # `run` is the label in label_values(..., run)
        assert names and names <= allowed, f"{title}: {expr} names {sorted(names - allowed)}"


def test_every_training_series_is_on_a_panel():
    used = set()
    for panel in panels(load(TRAINING)):
        for target in panel["targets"]:
            used |= series_in(target["expr"])
    missing = {key: name for key, name in SERIES.items() if RAY_PREFIX + name not in used}
    assert not missing


def test_training_dashboard_filters_on_the_run_variable():
    board = load(TRAINING)
    run_var = next(var for var in board["templating"]["list"] if var["name"] == "run")
    assert re.fullmatch(r"label_values\(\w+, run\)", run_var["definition"])
    for title, expr in expressions(board):
        if not title.startswith("variable") and title not in CLUSTER_PANELS:  # cluster series carry no run
            assert 'run=~"$run"' in expr, title


def test_serving_dashboard_uses_only_the_fixed_serving_series():
    board = load(SERVING)
    assert board["description"].startswith("For the serving issue; metric names fixed here")
    allowed = set().union(*(exported(name, kind) for name, kind in SERVE_SERIES.items())) | REPLICA_SERIES
    used = set()
    for title, expr in expressions(board):
        names = series_in(expr) - {"SessionName"}
        assert names and names <= allowed, f"{title}: {expr} names {sorted(names - allowed)}"
        used |= names
    assert REPLICA_SERIES <= used
    for name, kind in SERVE_SERIES.items():
        assert exported(name, kind) & used, name
        assert name in board["description"], name
    errors = [expr for _, expr in expressions(board) if "errors_total" in expr]
    assert any("by (code)" in expr for expr in errors)


def test_prometheus_config_reads_rays_service_discovery_file():
    config = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    files = [file for sd in job["file_sd_configs"] for file in sd["files"]]
    assert files == [f"/tmp/ray/session_latest/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]


def test_readme_lists_every_metric_name():
    readme = (DASHBOARDS / "README.md").read_text()
    for name in [*SERIES.values(), *SERVE_SERIES]:
        assert f"`{RAY_PREFIX}{name}`" in readme, name
