"""``raytron eval``'s model work on a Ray Data actor pool: each actor loads the model once and scores
whatever rows its batches hold.

The driver tokenizes (cheap) and sends one dataset of uniform rows ``{kind, index, choice, ids,
split}``:

- ``block``: a packed block of ``seq_len + 1`` ids -> ``value`` = summed cross-entropy of its
  ``seq_len`` targets (one forward pass over a batch of blocks);
- ``choice``: context + choice ids, the context's length in ``split`` -> ``value`` = the choice
  tokens' summed log-likelihood, from the engine's prompt scoring (the numbers ``echo`` returns);
- ``reference``: a prompt's ids -> ``text`` = its greedy completion of ``max_tokens``.

Rows come back with ``kind``, ``index`` and ``choice`` so order does not matter.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F

SCORING_BATCH = 16
"""Rows per actor call, and blocks per forward pass."""
OUTPUT_SCHEMA = pa.schema([("kind", pa.string()), ("index", pa.int64()), ("choice", pa.int64()),
                           ("value", pa.float64()), ("text", pa.string())])


@torch.no_grad()
def block_loss_sums(model, blocks: torch.Tensor) -> list[float]:
    """blocks (N, T+1): inputs [:, :-1] predict targets [:, 1:]; each block's summed cross-entropy."""
    sums = []
    for batch in blocks.split(SCORING_BATCH):
        logits = model(batch[:, :-1])[..., :model.cfg.vocab_size].float()  # (B, T, V)
        losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T)
        sums += losses.double().sum(dim=1).tolist()
    return sums


async def choice_loglik(engine, context: list[int], choice: list[int]) -> float:
    """The summed log-likelihood of ``choice``'s tokens after ``context``'s, by prompt scoring."""
    scored = await engine.complete(context + choice, None, logprobs=0, echo=True)
    return sum(entry.logprob for entry in scored.prompt_logprobs[len(context):])


class EvalWorker:
    """One model and engine in a Ray Data actor."""

    def __init__(self, source: str, tracking_uri: str | None, max_tokens: int, num_cpus: float):
        from raytron.model.sampling import SamplingParams
        from raytron.serve.engine import Engine, EngineLimits
        from raytron.serve.model_source import load_model

        torch.set_num_threads(max(1, int(num_cpus)))
        loaded = load_model(source, tracking_uri)
        self.model, self.eos_id = loaded.model, loaded.eos_id
        context = self.model.cfg.max_position_embeddings
        self.engine = Engine(self.model, loaded.eos_id, loaded.tokenizer.decode,
                             EngineLimits(SCORING_BATCH, SCORING_BATCH * context, context),
                             vocab_size=loaded.tokenizer.get_vocab_size())
        self.greedy = SamplingParams(max_new_tokens=max_tokens, temperature=0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = []
        blocks = [r for r in rows if r["kind"] == "block"]
        if blocks:
            sums = block_loss_sums(self.model, torch.tensor([r["ids"] for r in blocks], dtype=torch.long))
            out += [_result(r, value=s) for r, s in zip(blocks, sums)]
        out += asyncio.run(self._engine_rows([r for r in rows if r["kind"] != "block"]))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    async def _engine_rows(self, rows: list[dict]) -> list[dict]:
        async def one(row: dict) -> dict:
            if row["kind"] == "choice":
                return _result(row, value=await choice_loglik(self.engine, row["ids"][:row["split"]],
                                                              row["ids"][row["split"]:]))
            done = await self.engine.complete(row["ids"], self.greedy)
            return _result(row, text=done.text)
        return list(await asyncio.gather(*(one(r) for r in rows)))


def _result(row: dict, value: float | None = None, text: str | None = None) -> dict:
    return {"kind": row["kind"], "index": row["index"], "choice": row["choice"], "value": value, "text": text}


def row(kind: str, index: int, ids: list[int], choice: int = 0, split: int = 0) -> dict:
    return {"kind": kind, "index": index, "choice": choice, "ids": [int(i) for i in ids], "split": split}


def score_rows(rows: list[dict], source: str, tracking_uri: str | None, max_tokens: int, actors: int,
               num_cpus: float) -> list[dict]:
    """Every row through an actor pool of ``actors`` EvalWorkers (Ray must be connected)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // SCORING_BATCH, 4 * actors)))
    dataset = dataset.map_batches(
        EvalWorker, fn_constructor_kwargs={"source": source, "tracking_uri": tracking_uri, "max_tokens": max_tokens,
                                           "num_cpus": num_cpus},
        batch_size=SCORING_BATCH, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors), num_cpus=num_cpus)
    dataset.context.enable_progress_bars = True  # the pool's bar on the console
    return dataset.take_all()
