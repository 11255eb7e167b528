"""jobs/serve.py as `ray job submit` runs it: a driver process joining a running cluster, serving
until `ray job stop` sends it SIGTERM, which must remove the app (Serve apps outlive their driver).

The job submission itself was run by hand against a `ray start` cluster (README, Serving on Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
import yaml
from ray import serve

from tests.integration.test_serve_api import MODEL_NAME, health, post, serve_config, tiny_export
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]


def test_job_entrypoint_serves_and_sigterm_removes_the_app(ray_cluster, tmp_path):
    folder = tiny_export(tmp_path)
    config = serve_config(str(folder), free_port())
    config["app_name"] = "job"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "jobs/serve.py", "--config", str(tmp_path / "serve.yaml")], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, lines = time.monotonic() + 120, []
        while not (lines and lines[-1].startswith("serving ")):
            assert driver.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(driver.stdout.readline())
        url = lines[-1].split(" at ")[1].split()[0].removesuffix("/v1")
        reply = post(f"{url}/v1/completions", {"model": MODEL_NAME, "prompt": "Return the", "max_tokens": 4,
                                                  "ignore_eos": True})  # a random model may sample its EOS
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        assert health(url)["status"] == "ok"

        driver.send_signal(signal.SIGTERM)  # what `ray job stop` sends
        assert driver.wait(timeout=60) == 0
        assert "job" not in serve.status().applications
    finally:
        driver.kill()
        serve.shutdown()
