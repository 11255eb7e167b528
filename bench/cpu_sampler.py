"""CPU seconds (user + system) per kind of process -- Ray's GCS, raylet, dashboard, agents, and the
worker processes Ray names after their actor class -- sampled in the background. Unlike wall
time, these sums hardly move with other users' load on a shared machine."""

from __future__ import annotations

import threading
import time

import psutil

KINDS = ("gcs_server", "raylet", "log_monitor", "DashboardAgent", "RuntimeEnvAgent", "ray-dashboard",
         "dashboard.py", "TrainController", "RayTrainWorker")


class CpuSampler(threading.Thread):
    """Every `period` s, the CPU seconds of each process in the trees under `roots`."""

    def __init__(self, roots: list[int], driver: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.roots, self.driver, self.period = roots, driver, period
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.running = True

    def _kind(self, process: psutil.Process) -> str:
        words = " ".join(process.cmdline())
        for key in KINDS:
            if key in words:
                return "dashboard" if key in ("ray-dashboard", "dashboard.py") else key
        if words.startswith("ray::"):  # an actor or task process: Ray names it after its class
            return words.split()[0]
        return "driver" if process.pid == self.driver else process.name()

    def run(self) -> None:
        while self.running:
            sample = {}
            for root in self.roots:
                try:
                    top = psutil.Process(root)
                    tree = [top, *top.children(recursive=True)]
                except psutil.Error:
                    continue
                for process in tree:
                    try:
                        with process.oneshot():
                            times = process.cpu_times()
                            sample[process.pid] = (self._kind(process), times.user + times.system)
                    except psutil.Error:
                        continue
            self.samples.append((time.time(), sample))
            time.sleep(self.period)

    def cpu_by_kind(self, since: float, until: float) -> dict[str, float]:
        """CPU seconds per kind of process used between the samples nearest `since` and `until`
        (a process keeps the last kind it showed; one that started later counts from zero)."""
        start = max([stamp for stamp, _ in self.samples if stamp <= since], default=float("-inf"))
        baseline = {pid: cpu for stamp, sample in self.samples if stamp == start for pid, (_, cpu) in sample.items()}
        kinds, seconds = {}, {}
        for stamp, sample in self.samples:
            if stamp < start:  # processes that ended before the span do not count
                continue
            if stamp > until:
                break
            for pid, (kind, cpu) in sample.items():
                kinds[pid], seconds[pid] = kind, cpu - baseline.get(pid, 0.0)
        totals: dict[str, float] = {}
        for pid, cpu in seconds.items():
            totals[kinds[pid]] = totals.get(kinds[pid], 0.0) + cpu
        return totals
