"""A fake autoscaling Ray cluster on 127.0.0.1 for tests: a `ray start --head` whose autoscaler
"launches" worker nodes as extra raylets of this machine (Ray's `fake_multinode` provider).

Built from cluster/local-fake.yaml (the wheel lacks the example file `AutoscalingCluster` opens),
on free ports and a temp dir of its own, and stopped by its process group, never by name (Ray's CLI stop
kills every Ray process on the machine). Fake nodes share one IP: tell them apart by node id.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from tests.servers import HOST, free_port

REPO = Path(__file__).resolve().parents[1]
LOCAL_FAKE_YAML = REPO / "cluster" / "local-fake.yaml"
RAY = Path(sys.executable).parent / "ray"


@dataclass
class FakeCluster:
    address: str
    """GCS address (host:port) to give RAY_ADDRESS."""
    temp_dir: Path
    """The head's --temp-dir (session_latest/ holds logs and metrics config)."""
    env: dict[str, str]
    """Environment for a driver of this cluster (address, token auth, where the autoscaling config is)."""
    config_path: Path
    """The autoscaling config the head runs with."""
    head_pid: int
    """`ray start --head --block`: every process of the cluster, the fake nodes' too, descends from it."""

    def driver(self, code: str, timeout: float = 240, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``code`` in a fresh Python process connected to this cluster (a test process may already
        hold another Ray session, and one process drives one cluster)."""
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(extra_env or {})}, cwd=REPO)


def autoscaling_config(gcs_address: str, head_cpus: int, worker_types: dict[str, dict],
                       idle_timeout_minutes: float = 0.1) -> dict:
    """cluster/local-fake.yaml with this head's GCS address and the given worker node types
    ({name: {"resources": {...}, "max_workers": n}})."""
    config = yaml.safe_load(LOCAL_FAKE_YAML.read_text())
    config["provider"]["gcs_address"] = gcs_address
    config["idle_timeout_minutes"] = idle_timeout_minutes
    head = config["available_node_types"]["ray.head.default"]
    head["resources"] = {"CPU": head_cpus}
    config["available_node_types"] = {"ray.head.default": head}
    for name, spec in worker_types.items():
        config["available_node_types"][name] = {"min_workers": 0, "max_workers": spec["max_workers"],
                                                "resources": spec["resources"], "node_config": {}}
    config["max_workers"] = sum(spec["max_workers"] for spec in worker_types.values())
    return config


@contextmanager
def fake_autoscaling_cluster(worker_types: dict[str, dict], head_cpus: int = 2, idle_timeout_minutes: float = 0.1,
                             dashboard: bool = False) -> Iterator[FakeCluster]:
    """``dashboard``: start Ray's dashboard (on 127.0.0.1), which also writes the Prometheus target file."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-fake-", dir="/tmp"))  # short: Ray's socket paths are limited
    port = free_port()
    address = f"{HOST}:{port}"
    config_path = temp_dir / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(autoscaling_config(address, head_cpus, worker_types, idle_timeout_minutes)))
    # token auth (Ray 2.60's default for `ray start`) with a token of this cluster's own, given to every
    # process through the environment rather than ~/.ray/auth_token, which other clusters here share
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # the autoscaler's and the dashboard's metrics ports are fixed by default: other clusters here use them
           "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port()),
           # Ray Data's executors ask the autoscaler (request_resources, through the detached AutoscalingCoordinator)
           # for resources that expire after 180 s; an executor a Train worker never shuts down (its process is
           # killed at the end) leaves its request behind, and v1 keeps every node that request binpacks onto
           # (autoscaler.py, _get_nodes_needed_for_request_resources). Expire them within a few idle timeouts.
           "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "15"}
    # the cluster's own processes (e.g. Ray Train's PlacementGroupCleaner) look the cluster up by address;
    # without one they find every Ray instance on the machine and give up
    env["RAY_ADDRESS"] = address
    command = [str(RAY), "start", "--head", "--block", "--node-ip-address", HOST, "--port", str(port),
               f"--num-cpus={head_cpus}", f"--autoscaling-config={config_path}", f"--temp-dir={temp_dir}",
               f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host", HOST,
               "--dashboard-port", str(free_port()), "--disable-usage-stats",
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log_file:
        # a session of its own: the head's processes and the fake nodes its autoscaler starts go together
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    # the v1 autoscaler publishes no node types: raytron reads the launcher YAML, as it would on a `ray up` head
    driver_env = {**env, "RAY_ADDRESS": address, "PYTHONPATH": _pythonpath(),
                  "RAYTRON_AUTOSCALING_CONFIG": str(config_path)}
    cluster = FakeCluster(address, temp_dir, driver_env, config_path, process.pid)
    try:
        _wait_until_up(cluster, process, log_path)
        yield cluster
    finally:
        _stop_group(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _pythonpath() -> str:
    parts = [str(REPO / "platform"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(part for part in parts if part)


def _wait_until_up(cluster: FakeCluster, process: subprocess.Popen, log_path: Path, deadline_s: float = 240) -> None:
    probe = "import ray; ray.init(); print(ray.cluster_resources().get('CPU', 0))"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if cluster.driver(probe, timeout=120).returncode == 0:
                return
        except subprocess.TimeoutExpired:  # a loaded machine: the head may still be starting
            pass
        time.sleep(1)
    raise RuntimeError(f"fake cluster at {cluster.address} not up after {deadline_s:.0f} s:\n"
                       f"{log_path.read_text()[-4000:]}")


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                process.wait()
                return
            time.sleep(0.2)
    process.wait()


def node_ids_alive(cluster: FakeCluster) -> list[str]:
    """Node ids of the live nodes, read by a driver process."""
    out = cluster.driver("import json, ray; ray.init(); "
                         "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))", timeout=60)
    return printed_json(out.stdout)


def printed_json(stdout: str):
    """The last JSON line a driver printed. Ray interleaves its own lines with the driver's stdout (the
    autoscaler's "(autoscaler +0s) Resized to 4 CPUs." can come after the script's last print), so the
    last line is not necessarily the script's."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise AssertionError(f"the driver printed no JSON line; its stdout ends:\n{stdout[-2000:]}")
