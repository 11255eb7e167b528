"""Training metrics as Prometheus series through ``ray.util.metrics`` (scraped from every Ray node's
metrics port; names are listed in README)."""

from __future__ import annotations

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
    def __init__(self, run_name: str):
        self.tags = {"run": run_name}
        self.gauges = {key: Gauge(name, description=f"raytron training {key}", tag_keys=("run",))
                       for key, name in SERIES.items()}

    def publish(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if key in self.gauges and isinstance(value, (int, float)):
                self.gauges[key].set(float(value), tags=self.tags)
