"""What a person sees at the end of a sweep: the ranked trials and where the best one is in MLflow."""

from __future__ import annotations

from typing import Any

from raytron.tune.sweep import SweepResult


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def ranked_table(result: SweepResult, metric: str) -> list[tuple[str, ...]]:
    """Header + one row per trial, best first: rank, trial, swept values, status, step, metric."""
    swept = [key for key in (result.rows[0] if result.rows else {})
             if key not in ("trial_id", "status", "step", metric, "best_step", "run_id")]
    rows = [("RANK", "TRIAL", *(key.upper() for key in swept), "STATUS", "STEP", f"BEST {metric.upper()}")]
    for rank, row in enumerate(result.rows, 1):
        rows.append((str(rank), row["trial_id"], *(_cell(row.get(key)) for key in swept), row["status"],
                     str(row["step"]), _cell(row[metric])))
    return rows


def run_url(tracking_uri: str, run_id: str | None) -> str | None:
    """The MLflow UI page of a run when the store is a server; None for a local store (see `make mlflow-ui`)."""
    if run_id is None or not tracking_uri.startswith(("http://", "https://")):
        return None
    from mlflow import MlflowClient

    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def summary(result: SweepResult, metric: str) -> dict[str, Any]:
    """The sweep's last word: where it is, the best trial, its metric and its MLflow page."""
    best = result.best or {}
    return {"sweep": result.name, "experiment": result.experiment_url, "parent_run_id": result.parent_run_id,
            "best_trial": best.get("trial_id"), f"best_{metric}": best.get(metric),
            "best_run": run_url(result.tracking_uri, best.get("run_id")) or best.get("run_id")}
