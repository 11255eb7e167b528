"""``raytron eval CONFIG``: a model's perplexity on a corpus, multiple-choice accuracy and generation
quality against references, logged to MLflow as one run linked to the model.

- perplexity: the corpus's texts (JSONL ``{"text"}``, local or s3://) tokenized and packed as
  training packs them (each text followed by EOS, cut into blocks of ``seq_len + 1``), then
  exp(mean token cross-entropy) over every block's targets;
- multiple choice (JSONL ``{"context", "choices", "label"}``): each choice's summed log-likelihood
  given the context (context tokens + choice tokens, scored by the engine's prompt scoring: the
  numbers ``echo`` returns); the highest wins (``accuracy``), and divided by the choice's length in
  bytes (``accuracy_norm``, as evaluation harnesses normalise);
- references (JSONL ``{"prompt", "reference"}``): greedy completions of ``max_tokens`` scored with
  sacrebleu's corpus BLEU and rouge-score's ROUGE-L F-measure (mean), the metrics the field reports.

The driver reads and tokenizes; the forward passes, prompt scoring and generation run on a Ray Data
actor pool (serve/eval_pool.py), each actor holding the model once.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from pydantic import Field, PositiveInt

from raytron.config import Section
from raytron.serve.eval_pool import choice_loglik, row, score_rows
from raytron.serve.settings import ModelSource, load_section


class EvalConfig(Section):
    model: ModelSource
    """What is evaluated (as in a serve config)."""
    corpus: str | None = None
    """JSONL of {"text"} for perplexity (local or s3://)."""
    seq_len: PositiveInt = 128
    """Block length for perplexity (as training's data.seq_len)."""
    multiple_choice: str | None = None
    """JSONL of {"context", "choices", "label"}."""
    references: str | None = None
    """JSONL of {"prompt", "reference"} for BLEU and ROUGE-L."""
    max_tokens: PositiveInt = 32
    """Greedy completion length for references."""
    experiment: str = "raytron-eval"
    """MLflow experiment of the eval run."""
    run_name: str | None = Field(None, min_length=1)
    """MLflow run name; default eval-<model.name>."""
    actors: PositiveInt = 1
    """Models in the Ray Data actor pool that scores and generates."""
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    """CPUs per actor (also its torch threads)."""


def load_eval_config(path: str, overrides: list[str] = ()) -> EvalConfig:
    return load_section(EvalConfig, path, "eval config", overrides)


def read_records(url: str, fields: tuple[str, ...]) -> list[dict]:
    from raytron.storage import read_bytes

    records = []
    for number, line in enumerate(read_bytes(url).decode().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(f"{url}: line {number}: missing {', '.join(missing)} (expected {', '.join(fields)})")
        records.append(record)
    return records


async def choice_logliks(engine, tokenizer, items: list[dict]) -> list[list[float]]:
    """Summed log-likelihood of each choice's tokens after its context's, per item (in-process)."""
    work = [[choice_loglik(engine, tokenizer.encode(item["context"]).ids, tokenizer.encode(choice).ids)
             for choice in item["choices"]] for item in items]
    flat = iter(await asyncio.gather(*(c for row in work for c in row)))
    return [[next(flat) for _ in row] for row in work]


def multiple_choice_scores(items: list[dict], logliks: list[list[float]]) -> dict[str, float]:
    right = right_norm = 0
    for item, scores in zip(items, logliks):
        normed = [s / max(1, len(c.encode())) for s, c in zip(scores, item["choices"])]
        right += max(range(len(scores)), key=scores.__getitem__) == item["label"]
        right_norm += max(range(len(normed)), key=normed.__getitem__) == item["label"]
    return {"accuracy": right / len(items), "accuracy_norm": right_norm / len(items)}


def reference_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, hypotheses)]
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score, "rouge_l": sum(rouge) / len(rouge)}


def driver_tokenizer(cfg: EvalConfig):
    """The model's tokenizer, in the driver (the weights stay in the actors)."""
    from raytron.config import TrackingConfig
    from raytron.data.tokenizer import load_tokenizer
    from raytron.serve.model_source import MODEL_URI_PREFIX
    from raytron.tracking.mlflow_run import download_model_folder

    folder = (download_model_folder(cfg.model.source, tracking_cfg=TrackingConfig(tracking_uri=cfg.model.tracking_uri))
              if cfg.model.source.startswith(MODEL_URI_PREFIX) else cfg.model.source)
    return load_tokenizer(folder)


def eval_rows(cfg: EvalConfig, tokenizer, eos_id: int | None) -> tuple[list[dict], list[dict], list[dict], int]:
    """The actor pool's rows (eval_pool's kinds), the multiple-choice items, the reference pairs and
    the number of perplexity targets."""
    from raytron.data.tokenizer import pack_documents

    rows: list[dict] = []
    targets = 0
    if cfg.corpus:
        texts = [r["text"] for r in read_records(cfg.corpus, ("text",))]
        blocks = pack_documents([tokenizer.encode(t).ids for t in texts], cfg.seq_len, eos_id or 0)
        if not len(blocks):
            raise ValueError(f"corpus: {cfg.corpus} holds fewer than seq_len + 1 = {cfg.seq_len + 1} tokens")
        rows += [row("block", i, block) for i, block in enumerate(blocks)]
        targets = blocks.shape[0] * cfg.seq_len
    items = read_records(cfg.multiple_choice, ("context", "choices", "label")) if cfg.multiple_choice else []
    for i, item in enumerate(items):
        context = tokenizer.encode(item["context"]).ids
        rows += [row("choice", i, context + tokenizer.encode(c).ids, j, len(context)) for j, c in enumerate(item["choices"])]
    pairs = read_records(cfg.references, ("prompt", "reference")) if cfg.references else []
    rows += [row("reference", i, tokenizer.encode(p["prompt"]).ids or [eos_id or 0]) for i, p in enumerate(pairs)]
    return rows, items, pairs, targets


def run_eval(cfg: EvalConfig) -> tuple[dict[str, float], str | None]:
    """Every metric the config asks for (the model work on a Ray Data actor pool: Ray must be
    connected), and the MLflow run id they were logged to."""
    from raytron.data.tokenizer import special_token_ids

    tokenizer = driver_tokenizer(cfg)
    rows, items, pairs, targets = eval_rows(cfg, tokenizer, special_token_ids(tokenizer).eos)
    results = score_rows(rows, cfg.model.source, cfg.model.tracking_uri, cfg.max_tokens, cfg.actors,
                         cfg.num_cpus_per_actor)
    metrics: dict[str, float] = {}
    if cfg.corpus:
        metrics["perplexity"] = math.exp(sum(r["value"] for r in results if r["kind"] == "block") / targets)
    if items:
        logliks = [[0.0] * len(item["choices"]) for item in items]
        for r in results:
            if r["kind"] == "choice":
                logliks[r["index"]][r["choice"]] = r["value"]
        metrics.update(multiple_choice_scores(items, logliks))
    if pairs:
        texts = {r["index"]: r["text"] for r in results if r["kind"] == "reference"}
        metrics.update(reference_scores([texts[i] for i in range(len(pairs))], [p["reference"] for p in pairs]))
    return metrics, log_eval_run(cfg, metrics)


def log_eval_run(cfg: EvalConfig, metrics: dict[str, float]) -> str:
    """One MLflow run holding the metrics, tagged with the model source; for a registered model also
    its name, version and training run, and the version is tagged with this run's id (both ways linked)."""
    from mlflow import MlflowClient

    from raytron.config import TrackingConfig
    from raytron.serve.model_source import MODEL_URI_PREFIX
    from raytron.tracking.mlflow_run import find_model_version, resolve_tracking_uri

    tracking = TrackingConfig(tracking_uri=cfg.model.tracking_uri)
    client = MlflowClient(resolve_tracking_uri(tracking))
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    tags: dict[str, Any] = {"raytron.model_source": cfg.model.source}
    if cfg.model.source.startswith(MODEL_URI_PREFIX):
        version = find_model_version(cfg.model.source, tracking)
        tags |= {"raytron.model_name": version.name, "raytron.model_version": version.version,
                 "raytron.model_run_id": version.run_id or ""}
    run = client.create_run(experiment_id, run_name=cfg.run_name or f"eval-{cfg.model.name}", tags=tags)
    for name, value in metrics.items():
        client.log_metric(run.info.run_id, name, value)
    client.set_terminated(run.info.run_id)
    if cfg.model.source.startswith(MODEL_URI_PREFIX):  # and the version points back at its newest eval
        client.set_model_version_tag(version.name, version.version, "raytron.eval_run_id", run.info.run_id)
    return run.info.run_id
