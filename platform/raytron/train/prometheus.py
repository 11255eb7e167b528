"""Training metrics as Prometheus series through ``ray.util.metrics`` (scraped from every Ray node's
metrics port; names are listed in README)."""

from __future__ import annotations

import threading
import time

from ray.util.metrics import Gauge

SERIES = {
    "loss": "raytron_train_loss",
    "lr": "raytron_train_learning_rate",
    "grad_norm": "raytron_train_grad_norm",
    "tokens_per_s": "raytron_train_tokens_per_second",
    "tflops_per_worker": "raytron_train_tflops_per_worker",
    "mfu": "raytron_train_mfu",
    "step_time_s": "raytron_train_step_time_seconds",
    "data_wait_share": "raytron_train_data_wait_share",
    "checkpoint_time_s": "raytron_train_checkpoint_time_seconds",
    "val_loss": "raytron_train_validation_loss",
    "step": "raytron_train_step",
}


class TrainingGauges:
    """Every gauge keeps showing its last value while the run lives. Ray's metrics agent drops a gauge
    value that was not set again within two export intervals (20 s by default; Ray 2.60's
    open_telemetry_metric_recorder), so series set only on eval or checkpoint steps -- or every step of a
    model whose steps take longer than that -- vanished from Prometheus between their updates. A thread
    sets the last values again every REFRESH_S."""

    REFRESH_S = 5.0

    def __init__(self, run_name: str):
        self.tags = {"run": run_name}
        self.gauges = {key: Gauge(name, description=f"raytron training {key}", tag_keys=("run",))
                       for key, name in SERIES.items()}
        self.last: dict[str, float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._refresh, name="raytron-gauges", daemon=True).start()

    def publish(self, metrics: dict) -> None:
        with self._lock:
            for key, value in metrics.items():
                if key in self.gauges and isinstance(value, (int, float)):
                    self.last[key] = float(value)
                    self.gauges[key].set(float(value), tags=self.tags)

    def _refresh(self) -> None:
        while True:
            time.sleep(self.REFRESH_S)
            with self._lock:
                for key, value in self.last.items():
                    self.gauges[key].set(value, tags=self.tags)
