"""Per-step training metrics: throughput, achieved TFLOP/s and MFU, time split."""

from __future__ import annotations

import time

import torch

from raytron.config import RaytronConfig
from raytron.model.flops import flops_per_token, mfu, peak_bf16_flops


class StepMeter:
    def __init__(self, cfg: RaytronConfig):
        self.world_size = cfg.world_size
        self.tokens_per_step = cfg.global_batch_size * cfg.train.seq_len
        self.flops_per_token = flops_per_token(cfg)
        gpu = torch.cuda.get_device_name() if cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available() else None
        self.peak_flops = peak_bf16_flops(gpu)
        self._started = time.perf_counter()

    def start(self) -> None:
        self._started = time.perf_counter()

    def finish(self, step: int, loss: float, lr: float, grad_norm: float | None, data_wait: float) -> dict[str, float]:
        seconds = time.perf_counter() - self._started
        tokens_per_s = self.tokens_per_step / seconds
        per_worker = tokens_per_s / self.world_size
        metrics = {
            "step": step, "loss": loss, "lr": lr, "step_time_s": seconds,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_worker": per_worker,
            "tflops_per_worker": per_worker * self.flops_per_token / 1e12,
            "data_wait_share": data_wait / seconds,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if self.peak_flops:
            metrics["mfu"] = mfu(per_worker, self.flops_per_token, self.peak_flops)
        return metrics
