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
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from raytron.config import Section
from raytron.serve.settings import ModelSource, load_section

SCORING_BATCH = 16


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


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean cross-entropy) of blocks (N, T+1): inputs [:, :-1] predict targets [:, 1:]."""
    total, count = 0.0, 0
    for batch in blocks.split(SCORING_BATCH):
        logits = model(batch[:, :-1])  # (B, T, V')
        losses = F.cross_entropy(logits[..., :model.cfg.vocab_size].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                 reduction="sum")
        total, count = total + losses.item(), count + batch[:, 1:].numel()
    return math.exp(total / count)


async def choice_logliks(engine, tokenizer, items: list[dict]) -> list[list[float]]:
    """Summed log-likelihood of each choice's tokens after its context's, per item."""
    async def one(context: list[int], choice: list[int]) -> float:
        scored = await engine.complete(context + choice, None, logprobs=0, echo=True)
        return sum(entry.logprob for entry in scored.prompt_logprobs[len(context):])

    work = [[one(tokenizer.encode(item["context"]).ids, tokenizer.encode(choice).ids) for choice in item["choices"]]
            for item in items]
    flat = await asyncio.gather(*(c for row in work for c in row))
    out, at = [], 0
    for row in work:
        out.append(list(flat[at:at + len(row)]))
        at += len(row)
    return out


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


def run_eval(cfg: EvalConfig) -> tuple[dict[str, float], str | None]:
    """Every metric the config asks for, and the MLflow run id they were logged to."""
    from raytron.data.tokenizer import pack_documents
    from raytron.model.sampling import SamplingParams
    from raytron.serve.engine import Engine, EngineLimits
    from raytron.serve.model_source import load_model

    loaded = load_model(cfg.model.source, cfg.model.tracking_uri)
    model, tokenizer = loaded.model, loaded.tokenizer
    context = model.cfg.max_position_embeddings
    engine = Engine(model, loaded.eos_id, tokenizer.decode, EngineLimits(SCORING_BATCH, SCORING_BATCH * context, context),
                    vocab_size=tokenizer.get_vocab_size())
    metrics: dict[str, float] = {}
    if cfg.corpus:
        texts = [r["text"] for r in read_records(cfg.corpus, ("text",))]
        blocks = pack_documents([tokenizer.encode(t).ids for t in texts], cfg.seq_len, loaded.eos_id or 0)
        if not len(blocks):
            raise ValueError(f"corpus: {cfg.corpus} holds fewer than seq_len + 1 = {cfg.seq_len + 1} tokens")
        metrics["perplexity"] = perplexity(model, torch.from_numpy(blocks).long())

    async def engine_work() -> None:
        if cfg.multiple_choice:
            items = read_records(cfg.multiple_choice, ("context", "choices", "label"))
            metrics.update(multiple_choice_scores(items, await choice_logliks(engine, tokenizer, items)))
        if cfg.references:
            pairs = read_records(cfg.references, ("prompt", "reference"))
            greedy = SamplingParams(max_new_tokens=cfg.max_tokens, temperature=0)
            done = await asyncio.gather(*(engine.complete(tokenizer.encode(p["prompt"]).ids or [loaded.eos_id or 0],
                                                          greedy) for p in pairs))
            metrics.update(reference_scores([d.text for d in done], [p["reference"] for p in pairs]))

    asyncio.run(engine_work())
    engine.close()
    return metrics, log_eval_run(cfg, metrics)


def log_eval_run(cfg: EvalConfig, metrics: dict[str, float]) -> str:
    """One MLflow run holding the metrics, tagged with the model source (and its registered name and
    version, which link it to the model version)."""
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
    return run.info.run_id
