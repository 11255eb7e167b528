"""``raytron generate CONFIG``: prompts or chats in JSONL or Parquet files (local or ``s3://``)
become completions, offline, through a Ray Data actor pool of engines (no HTTP).

Each actor holds one engine (continuous batching inside it) and turns every record into the
request the server would get: the config's ``request`` parameters, then the record's ``prompt``
or ``messages`` (and its own ``seed`` when it has one), parsed, prepared and sampled by the very
code the server runs (``protocol``, ``prepare``, the chat template), so a seed gives the same text
as the server. Input files are done one by one, each into an output file of the same stem; a file
whose output exists is skipped, so a rerun after a kill resumes where it stopped (outputs are
written whole once their file is done). A record the server would refuse follows
``on_bad_record``: 'fail' stops naming the file and record, 'skip' writes its error instead.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, PositiveInt

from raytron.config import Section
from raytron.serve.settings import Limits, ModelSource, SamplingDefaults, ServeConfig, load_section

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")


class GenerateConfig(Section):
    model: ModelSource
    """What generates (as in a serve config)."""
    input: str
    """A JSONL or Parquet file, or a folder of them (local or s3://); records hold `prompt` or `messages`, optionally `seed`."""
    output: str
    """Folder for one output file per input file (same stem); existing ones are skipped."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """Output format: the input's fields plus text, finish_reason, completion_tokens, error."""
    request: dict[str, Any] = {}
    """OpenAI completion parameters for every record (max_tokens, temperature, seed, stop, ...), as a request body sends them."""
    limits: Limits = Limits()
    """Engine limits per actor (as in a serve config)."""
    sampling: SamplingDefaults = SamplingDefaults()
    """Defaults for parameters `request` leaves out."""
    actors: PositiveInt = 1
    """Engines in the actor pool."""
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    """CPUs per actor (also its torch threads)."""
    on_bad_record: Literal["fail", "skip"] = "fail"
    """A record the server would refuse: 'fail' names the file and record; 'skip' writes its error."""


def load_generate_config(path: str, overrides: list[str] = ()) -> GenerateConfig:
    return load_section(GenerateConfig, path, "generate config", overrides)


class GenerationWorker:
    """One engine in a Ray Data actor; ``__call__`` completes a batch of records (pyarrow)."""

    def __init__(self, config: dict[str, Any], source_file: str):
        import torch

        from raytron.serve.engine import Engine, EngineLimits
        from raytron.serve.model_source import load_model

        self.cfg = GenerateConfig.model_validate(config)
        self.serve_cfg = ServeConfig(model=self.cfg.model, limits=self.cfg.limits, sampling=self.cfg.sampling)
        self.source_file = source_file
        torch.set_num_threads(max(1, int(self.cfg.num_cpus_per_actor)))
        loaded = load_model(self.cfg.model.source, self.cfg.model.tracking_uri)
        self.tokenizer, self.eos_id, self.chat = loaded.tokenizer, loaded.eos_id, loaded.chat
        self.vocab_size = min(self.tokenizer.get_vocab_size(), loaded.model.cfg.vocab_size)
        context = self.cfg.limits.context or loaded.model.cfg.max_position_embeddings
        self.engine = Engine(loaded.model, loaded.eos_id, self.tokenizer.decode,
                             EngineLimits(self.cfg.limits.max_batch_size, self.cfg.limits.max_tokens_in_flight, context),
                             vocab_size=self.vocab_size, end_ids=loaded.end_ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        return pa.Table.from_pylist(asyncio.run(self._complete_all(rows)))

    async def _complete_all(self, rows: list[dict]) -> list[dict]:
        return await asyncio.gather(*(self._complete(row) for row in rows))

    async def _complete(self, row: dict) -> dict:
        from raytron.serve.prepare import prepare_choices, prompt_ids
        from raytron.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_request

        given = {key: row[key] for key in ("prompt", "messages", "seed") if row.get(key) is not None}
        body = {**self.cfg.request, **given, "model": self.cfg.model.name}
        try:
            if "messages" in body:
                request = parse_request(ChatCompletionRequest, body)
                ids = [prompt_ids(self.chat.encode(self.tokenizer, request.messages),
                                  self.tokenizer, self.vocab_size, "messages", self.eos_id)]
                stops = self.chat.stops
            else:
                request = parse_request(CompletionRequest, body)
                ids = [prompt_ids(p, self.tokenizer, self.vocab_size, "prompt", self.eos_id) for p in request.prompts()]
                stops = ()
            choices = prepare_choices(request, ids, self.engine, self.serve_cfg, self.vocab_size, "prompt", stops)
        except ApiError as error:
            if self.cfg.on_bad_record == "fail":
                raise ValueError(f"{self.source_file}: record {row}: {error.message}") from None
            return {**row, "text": None, "finish_reason": None, "completion_tokens": 0, "error": error.message}
        done = await asyncio.gather(*(self.engine.complete(c.ids, c.params) for c in choices))
        return {**row, "text": done[0].text if len(done) == 1 else None, "texts": [d.text for d in done],
                "finish_reason": done[0].finish_reason, "completion_tokens": sum(d.completion_tokens for d in done),
                "error": None}


def input_files(url: str) -> list[str]:
    """The JSONL / Parquet files at ``url`` (a file, or a folder searched recursively), sorted."""
    from raytron.storage import filesystem_for, is_remote

    fs, path = filesystem_for(url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input: {url} does not exist")
    found = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = sorted(i.path for i in found if i.type == pafs.FileType.File and i.path.endswith(INPUT_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"input: no .jsonl/.json/.parquet files at {url}")
    return [f"s3://{name}" if is_remote(url) else name for name in names]


def output_for(cfg: GenerateConfig, source: str) -> str:
    from raytron.storage import join_url

    return join_url(cfg.output, PurePosixPath(source).stem + (".jsonl" if cfg.format == "jsonl" else ".parquet"))


def _write(cfg: GenerateConfig, url: str, rows: list[dict]) -> None:
    from raytron.storage import write_bytes

    if cfg.format == "jsonl":
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        data = buffer.getvalue()
    write_bytes(url, data)


def run_generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Generate for every input file without an output yet (Ray must be connected); one summary row
    per input file."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from raytron.storage import filesystem_for

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # outputs in input order
    summary = []
    for source in input_files(cfg.input):
        target = output_for(cfg, source)
        fs, path = filesystem_for(target)
        if fs.get_file_info(path).type == pafs.FileType.File:
            summary.append({"input": source, "output": target, "records": None, "tokens": None, "status": "done before"})
            continue
        fs_in, path_in = filesystem_for(source)
        reader = ray.data.read_parquet if source.endswith(".parquet") else ray.data.read_json
        dataset = reader(path_in, filesystem=fs_in).map_batches(
            GenerationWorker, fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "source_file": source},
            batch_size=2 * cfg.limits.max_batch_size, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.num_cpus_per_actor)
        rows = dataset.take_all()
        _write(cfg, target, rows)
        summary.append({"input": source, "output": target, "records": len(rows),
                        "tokens": sum(r["completion_tokens"] for r in rows),
                        "status": f"written ({sum(r['error'] is not None for r in rows)} bad records)"})
    return summary
