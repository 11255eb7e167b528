"""Real servers on 127.0.0.1 for tests: moto's S3 server (in-process), `mlflow server` and Prometheus."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import boto3
from moto.server import ThreadedMotoServer

HOST = "127.0.0.1"
STARTUP_DEADLINE_S = 90.0


def free_port() -> int:
    """A port nothing listens on right now (also what a "closed port" test points at)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)
    """What a client needs to reach this server: endpoint, dummy keys, region."""

    def create_bucket(self, name: str) -> None:
        boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                     region_name=self.env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)


@contextmanager
def moto_s3_server() -> Iterator[S3Server]:
    """moto's S3 server in a thread, on a port the OS picks (no race for it)."""
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        yield S3Server(endpoint, {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                                  "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    finally:
        server.stop()


@dataclass
class MlflowServer:
    url: str
    log_path: Path
    """The server's stdout and stderr."""


@contextmanager
def mlflow_server(tmp_dir: str | Path) -> Iterator[MlflowServer]:
    """`mlflow server` with a sqlite store and artifacts under ``tmp_dir``; stopped at exit."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{tmp_dir.resolve() / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_dir.resolve() / "artifacts"),
               "--host", HOST, "--port", str(port), "--workers", "1"]
    # The job runner would more than double the server's memory (~0.8 -> ~2.1 GB) for nothing here.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = tmp_dir / "server.log"
    with open(log_path, "wb") as log_file:
        # A session of its own: `mlflow server` starts uvicorn as a child, and both must go.
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        url = f"http://{HOST}:{port}"
        _wait_until_healthy(url, process, log_path)
        yield MlflowServer(url, log_path)
    finally:
        _stop_session(process)


def _wait_until_healthy(url: str, process: subprocess.Popen, log_path: Path, what: str = "mlflow server",
                        path: str = "/health") -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} at {url} not healthy after {STARTUP_DEADLINE_S:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop_session(process: subprocess.Popen) -> None:
    """SIGTERM the process group this module started (the server and its uvicorn worker), wait
    for all of it to go, SIGKILL whatever lingers."""
    _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _group_alive(process) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(process):
        _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def _group_alive(process: subprocess.Popen) -> bool:
    if process.poll() is None:
        return True
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


PROMETHEUS = Path(os.environ.get("RAYTRON_PROMETHEUS") or
                  Path(__file__).resolve().parents[1] / ".tools/prometheus/usr/bin/prometheus")
"""Debian's Prometheus, unpacked by `make test` (never its system service)."""


@dataclass
class PrometheusServer:
    url: str
    log_path: Path

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar as one sample) an expression gives now, through /api/v1/query."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{expr}: {error.read().decode(errors='replace')}") from error
        if body["status"] != "success":
            raise RuntimeError(f"{expr}: {body}")
        data = body["data"]
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def label_values(self, label: str, series: str) -> list[str]:
        url = f"{self.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": series})
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())["data"]


@contextmanager
def prometheus_server(config: dict, tmp_dir: str | Path) -> Iterator[PrometheusServer]:
    """Prometheus on 127.0.0.1 with ``config`` (a prometheus.yml as a dict), data under ``tmp_dir``."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path = tmp_dir / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    command = [str(PROMETHEUS), f"--config.file={config_path}", f"--web.listen-address={HOST}:{port}",
               f"--storage.tsdb.path={tmp_dir / 'data'}"]
    log_path = tmp_dir / "prometheus.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        _wait_until_healthy(url, process, log_path, "prometheus", "/-/ready")
        yield PrometheusServer(url, log_path)
    finally:
        _stop_session(process)
