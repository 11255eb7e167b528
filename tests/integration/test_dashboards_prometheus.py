"""Both Grafana dashboards against a real Prometheus (issue 15, test e): Debian's Prometheus on 127.0.0.1
scrapes a fake autoscaling Ray cluster (targets from the file Ray's dashboard writes, rewritten to
127.0.0.1) while a tiny model trains with eval_every and checkpoint_every and a served model (one
replica of 2 tensor-parallel ranks) streams to three clients. Every expression of both boards, with the
Grafana variables substituted as Grafana would, must return data through /api/v1/query at one moment,
and the TP-ranks panel shows the replica's 2 ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.fake_cluster import REPO, fake_autoscaling_cluster
from tests.integration.dashboard_load import TENSOR_PARALLEL
from tests.servers import PROMETHEUS, prometheus_server
from tests.unit.test_dashboards import SERVING, TRAINING, expressions, load

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PROMETHEUS.is_file(), reason=f"no Prometheus at {PROMETHEUS} (`make test` unpacks it)")]

# The one panel with nothing to show here, skipped by name: MFU needs a GPU's peak FLOP/s (none is defined
# for CPUs). The served replica spans 2 TP ranks (dashboard_load.TENSOR_PARALLEL), so its panel is checked too.
NOT_YET_EXPORTED = {"MFU"}
TP_RANKS_PANEL = "TP ranks per replica"
POLL_S = 1
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval gives for a 1 s scrape with a short range
STARTUP_S = 600
DEADLINE_S = 120


def scrape_config(cluster) -> dict:
    """The shipped prometheus.yml, pointed at this cluster's target file, scraping every second, with
    targets rewritten to 127.0.0.1: Ray advertises the machine's address, which fake nodes share."""
    config = yaml.safe_load((REPO / "dashboards/prometheus/prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job["file_sd_configs"][0] |= {"files": [str(cluster.temp_dir / "prom_metrics_service_discovery.json")],
                                  "refresh_interval": "1s"}
    job["relabel_configs"] = [{"source_labels": ["__address__"], "regex": r"[^:]+:(\d+)",
                               "target_label": "__address__", "replacement": "127.0.0.1:$1"}]
    return config


def substituted(expr: str, prometheus) -> str:
    """Grafana's substitution: a query variable's values as a regex alternation, $__rate_interval."""
    for board in (load(TRAINING), load(SERVING)):
        for variable in board["templating"]["list"]:
            if variable["type"] != "query" or f"${variable['name']}" not in expr:
                continue
            values = variable_values(variable["definition"], prometheus) or ["<none>"]
            # a regex inside a PromQL string literal: its backslashes are escaped once more
            alternation = "(" + "|".join(re.escape(value).replace("\\", "\\\\") for value in values) + ")"
            expr = expr.replace(f"${variable['name']}", alternation)
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def variable_values(definition: str, prometheus) -> list[str]:
    """What Grafana lists for a `label_values(series, label)` variable (Prometheus' label values API)."""
    series, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition).groups()
    return prometheus.label_values(label, series)


def has_data(title: str, expr: str, prometheus) -> bool:
    if title.startswith("variable "):
        return bool(variable_values(expr, prometheus))
    return bool(prometheus.query(substituted(expr, prometheus)))


def tp_ranks_shown(prometheus) -> list[int]:
    """The values of the TP-ranks panel, one per replica."""
    (expr,) = [expr for title, expr in expressions(load(SERVING)) if title == TP_RANKS_PANEL]
    return [int(float(sample["value"][1])) for sample in prometheus.query(substituted(expr, prometheus))]


def empty_expressions(prometheus) -> list[str]:
    return [f"{title}: {expr}" for board in (load(TRAINING), load(SERVING)) for title, expr in expressions(board)
            if title not in NOT_YET_EXPORTED and not has_data(title, expr, prometheus)]


@pytest.fixture(scope="module")
def cluster():
    workers = {"fake.cpu": {"resources": {"CPU": 2, "spare": 1}, "max_workers": 1}}
    with fake_autoscaling_cluster(workers, head_cpus=6, dashboard=True) as running:
        yield running


@pytest.mark.timeout(1200)
def test_every_dashboard_expression_returns_data(cluster, tmp_path):
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log_file:
        load_driver = subprocess.Popen([sys.executable, "-m", "tests.integration.dashboard_load", str(tmp_path)],
                                       env=cluster.env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    try:
        with prometheus_server(scrape_config(cluster), tmp_path / "prometheus") as prometheus:
            while "READY" not in log_path.read_text():
                if load_driver.poll() is not None:
                    pytest.fail(f"the load driver ended before training and serving ran:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            # DeepSpeed's start-up (and its JIT-built comm op on a fresh machine) comes before the first step
            started = time.monotonic() + STARTUP_S
            while not prometheus.query("ray_raytron_train_step") and time.monotonic() < started:
                time.sleep(POLL_S)
            deadline = time.monotonic() + DEADLINE_S
            empty = empty_expressions(prometheus)
            while empty and time.monotonic() < deadline:
                time.sleep(POLL_S)
                empty = empty_expressions(prometheus)
            assert empty == [], f"expressions without data after {DEADLINE_S} s: {empty}"
            assert tp_ranks_shown(prometheus) == [TENSOR_PARALLEL], "the TP-ranks panel must show the replica's 2 ranks"
            # and still so a few scrapes later: rarely updated series must not vanish between updates
            time.sleep(5)
            assert empty_expressions(prometheus) == []
    finally:
        os.killpg(load_driver.pid, signal.SIGTERM)
        load_driver.wait(timeout=60)
