"""Serving metrics through ``ray.util.metrics``; Ray exports each as ``ray_<name>``.

The names are the ones the Grafana serving dashboard reads (dashboards/grafana/raytron-serving.json;
listed in README). Every series carries the label ``model`` (the served model name).
"""

from __future__ import annotations

import threading
import time
import weakref

from ray.util.metrics import Counter, Gauge, Histogram

# seconds; CPU decode steps take 10-500 ms, a queued first token can take many seconds
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
GAUGE_REFRESH_S = 5.0
"""Ray's metrics agent drops a gauge value not set again within two export intervals (20 s; see
train/prometheus.py): an idle replica's engine takes no steps, so its batch size is set again this often."""


def _keep_setting(metrics: weakref.ref) -> None:
    """Re-set the running batch size until the ServeMetrics is gone (the replica's whole life)."""
    while True:
        time.sleep(GAUGE_REFRESH_S)
        alive = metrics()
        if alive is None:
            return
        alive.running_batch_size.set(alive.last_batch_size, tags=alive.tags)
        alive.tp_ranks.set(alive.last_ranks_alive, tags=alive.replica_tags)
        del alive


class ServeMetrics:
    def __init__(self, model_name: str, replica: str = "", tensor_parallel: int = 1):
        self.tags = {"model": model_name}
        self.replica_tags = {**self.tags, "replica": replica}
        self.tp_ranks = Gauge("raytron_serve_tp_ranks", description="tensor-parallel ranks alive in a replica",
                              tag_keys=("model", "replica"))
        self.last_ranks_alive = tensor_parallel
        self.tp_ranks.set(tensor_parallel, tags=self.replica_tags)
        self.requests = Counter("raytron_serve_requests_total", description="HTTP requests received",
                                tag_keys=("model",))
        self.errors = Counter("raytron_serve_errors_total", description="requests answered with an error, by HTTP code",
                              tag_keys=("model", "code"))
        self.time_to_first_token = Histogram(
            "raytron_serve_time_to_first_token_seconds", description="submission to first generated token",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("model",))
        self.inter_token_latency = Histogram(
            "raytron_serve_inter_token_latency_seconds", description="time between two tokens of one sequence",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("model",))
        self.generated_tokens = Counter("raytron_serve_generated_tokens_total", description="tokens generated",
                                        tag_keys=("model",))
        self.prompt_tokens = Counter("raytron_serve_prompt_tokens_total", description="prompt tokens prefilled",
                                     tag_keys=("model",))
        self.logprob_requests = Counter("raytron_serve_logprob_requests_total",
                                        description="requests asking for log-probabilities (logprobs or echo)",
                                        tag_keys=("model",))
        self.queue_time = Histogram("raytron_serve_queue_time_seconds",
                                    description="submission to admission into the running batch",
                                    boundaries=LATENCY_BOUNDARIES, tag_keys=("model",))
        self.running_batch_size = Gauge("raytron_serve_running_batch_size",
                                        description="sequences in the running batch", tag_keys=("model",))
        self.last_batch_size = 0
        self.running_batch_size.set(0, tags=self.tags)
        threading.Thread(target=_keep_setting, args=(weakref.ref(self),), name="raytron-serve-gauge",
                         daemon=True).start()

    def request(self) -> None:
        self.requests.inc(1, tags=self.tags)

    def error(self, code: int) -> None:
        self.errors.inc(1, tags={**self.tags, "code": str(code)})

    def step(self, first_token_latencies: list[float], inter_token_latencies: list[float], batch_size: int) -> None:
        """One engine step: the latencies of the tokens it produced and the batch it leaves running."""
        for seconds in first_token_latencies:
            self.time_to_first_token.observe(seconds, tags=self.tags)
        for seconds in inter_token_latencies:
            self.inter_token_latency.observe(seconds, tags=self.tags)
        produced = len(first_token_latencies) + len(inter_token_latencies)
        if produced:
            self.generated_tokens.inc(produced, tags=self.tags)
        self.last_batch_size = batch_size
        self.running_batch_size.set(batch_size, tags=self.tags)

    def ranks_alive(self, count: int) -> None:
        """The replica's health check counted ``count`` tensor-parallel ranks answering."""
        self.last_ranks_alive = count
        self.tp_ranks.set(count, tags=self.replica_tags)

    def logprob_request(self) -> None:
        self.logprob_requests.inc(1, tags=self.tags)

    def admitted(self, queue_times: list[float], prompt_tokens: int) -> None:
        """Requests admitted in one iteration: how long each waited, and the prompt tokens they prefill."""
        for seconds in queue_times:
            self.queue_time.observe(seconds, tags=self.tags)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags=self.tags)
