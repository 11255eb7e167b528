"""Serve autoscaling with the delays exposed in the serve config (issue 15, test c): replicas go from 1
to 2 under concurrent streams and back to 1 after them, and every request answers 200 with no
error event, through both changes (the scale-down under one client's streams)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from ray import serve

from raytron.serve.app import run_app
from raytron.serve.settings import build_serve_config
from tests.integration.test_serve_api import MODEL_NAME, tiny_export
from tests.servers import free_port

CLIENTS = 6
APP = "autoscaled"


def running_replicas() -> int:
    deployments = serve.status().applications[APP].deployments
    return sum(d.replica_states.get("RUNNING", 0) for d in deployments.values())


def wait_for(replicas: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if running_replicas() == replicas:
            return True
        time.sleep(0.2)
    return False


def stream_until(url: str, stop: threading.Event, outcomes: list) -> None:
    """Send streams one after another until ``stop``; record each one's status and whether it ended cleanly."""
    body = json.dumps({"model": MODEL_NAME, "prompt": "The quick brown", "max_tokens": 40, "ignore_eos": True,
                       "stream": True}).encode()
    while not stop.is_set():
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                events = [line[6:].strip() for line in response if line.startswith(b"data: ")]
                outcomes.append((response.status, events[-1] == b"[DONE]" and b'"error"' not in b"".join(events)))
        except Exception as error:  # an HTTP error status or a dropped connection: a failure to report
            outcomes.append((getattr(error, "code", repr(error)), False))


@pytest.fixture(scope="module")
def autoscaled(ray_cluster, tmp_path_factory):
    folder = tiny_export(tmp_path_factory.mktemp("autoscale-model"))
    cfg = build_serve_config({
        "app_name": APP, "model": {"source": str(folder), "name": MODEL_NAME},
        "limits": {"max_batch_size": 4, "max_tokens": 64, "context": 128},
        "deployment": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 8,
                       "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                              "upscale_delay_s": 0, "downscale_delay_s": 2,
                                              "metrics_interval_s": 0.2, "look_back_period_s": 0.5}},
        "http": {"host": "127.0.0.1", "port": free_port(), "route_prefix": "/autoscaled", "stream_interval_s": 0}})
    yield run_app(cfg)
    serve.shutdown()


def test_replicas_follow_the_load_without_errors(autoscaled):
    assert running_replicas() == 1
    stop, outcomes = threading.Event(), []
    clients = [threading.Thread(target=stream_until, args=(autoscaled, stop, outcomes)) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        scaled_up = wait_for(2, 90)
        time.sleep(2)  # keep the load on the new replica for a while
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert scaled_up, "no second replica under load"
    # one client keeps streaming while the load no longer needs two replicas: the scale-down is under traffic
    stop.clear()
    light = threading.Thread(target=stream_until, args=(autoscaled, stop, outcomes))
    light.start()
    try:
        scaled_down = wait_for(1, 90)
        time.sleep(1)
    finally:
        stop.set()
        light.join()
    assert scaled_down, "the second replica was not removed after the load"
    assert outcomes and all(outcome == (200, True) for outcome in outcomes), \
        [outcome for outcome in outcomes if outcome != (200, True)][:5]
    # a request after the scale-down is answered too
    with urllib.request.urlopen(urllib.request.Request(
            f"{autoscaled}/v1/completions", json.dumps({"model": MODEL_NAME, "prompt": "Return", "max_tokens": 4}).encode(),
            {"Content-Type": "application/json"}), timeout=60) as response:
        assert response.status == 200
