"""``raytron generate CONFIG``: prompts or chats in JSONL or Parquet files (local or ``s3://``)
become completions, offline, through a Ray Data actor pool of engines (no HTTP).

Each actor holds one engine (continuous batching inside it) and turns every record into the
request the server would get: the config's ``request`` parameters, then the record's ``prompt``
or ``messages`` (and its own ``seed`` when it has one), parsed, prepared and sampled by the very
code the server runs (``protocol``, ``prepare``, the chat template), so a seed gives the same text
as the server. All the input files without an output yet go through one Dataset and one actor
pool (each actor loads the model once for the whole run), in file order; each becomes an output
file of the same stem, written whole (under a temporary name, then moved) as soon as its last
record is back, while the later files still run. A file whose output exists is skipped, so a rerun
after a kill redoes only the files that had no output. A record the server would refuse, or a line
that is no JSON object, follows ``on_bad_record``: 'fail' stops naming the file and line (nothing of
that file or any later one is written), 'skip' writes its error instead.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, PositiveInt

from raytron.config import Section
from raytron.data.records import BadRecordError
from raytron.serve.generate_source import SCHEMA, GenerateDatasource
from raytron.serve.settings import Limits, ModelSource, SamplingDefaults, ServeConfig, load_section

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
PARTIAL_SUFFIX = ".partial"


GENERATE_BATCH = 64
"""Generate's decode batch: four times serving's default (16). Offline work is bound by throughput, not
by any one request's latency, so it decodes more sequences per step; in one process on these 2 CPU
cores, 256 requests of the bench model ran 1.08-1.30x faster at 64 than at 32 (bench/README.md,
issue 14). The KV cache grows with it (slots x context): lower it for long contexts on little memory."""


class GenerateLimits(Limits):
    max_batch_size: PositiveInt = GENERATE_BATCH
    """Sequences decoded together per step in each actor (KV-cache slots); serving's default is 16."""


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
    limits: GenerateLimits = GenerateLimits()
    """Engine limits per actor (as in a serve config, but a larger decode batch by default)."""
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
    """One engine in a Ray Data actor; ``__call__`` completes a batch of records (pyarrow).

    ``__call__`` is a coroutine, so Ray Data runs several batches of a block at once on the actor's
    one event loop (its async UDF path, which hands the outputs back in input order): they all queue
    in the same engine, which admits the next batch's records as slots free instead of draining to
    an empty batch at the end of each call."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from raytron.serve.engine import Engine, EngineLimits
        from raytron.serve.model_source import load_model

        self.cfg = GenerateConfig.model_validate(config)
        self.serve_cfg = ServeConfig(model=self.cfg.model, limits=self.cfg.limits, sampling=self.cfg.sampling)
        torch.set_num_threads(max(1, int(self.cfg.num_cpus_per_actor)))
        loaded = load_model(self.cfg.model.source, self.cfg.model.tracking_uri)
        self.tokenizer, self.eos_id, self.chat = loaded.tokenizer, loaded.eos_id, loaded.chat
        self.vocab_size = min(self.tokenizer.get_vocab_size(), loaded.model.cfg.vocab_size)
        context = self.cfg.limits.context or loaded.model.cfg.max_position_embeddings
        self.engine = Engine(loaded.model, loaded.eos_id, self.tokenizer.decode,
                             EngineLimits(self.cfg.limits.max_batch_size, self.cfg.limits.max_tokens_in_flight, context),
                             vocab_size=self.vocab_size, end_ids=loaded.end_ids)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """A batch of the source's columns (generate_source.SCHEMA) -> ``row``, each output row as JSON
        text (records differ in their fields, so no Arrow schema would fit them all), with the
        input's ``file`` and ``last``."""
        entries = list(zip(*(batch.column(n).to_pylist() for n in SCHEMA.names)))
        rows = [self._prepare(record, where, problem) for record, where, problem, _, _ in entries]
        if self.cfg.on_bad_record == "fail":  # the driver stops at the first bad record: nothing after it is needed
            bad = next((n for n, r in enumerate(rows) if isinstance(r, dict)), len(rows))
            entries, rows = entries[:bad + 1], rows[:bad + 1]
        done = await self._complete_all([r for r in rows if not isinstance(r, dict)])
        out = [r if isinstance(r, dict) else next(done) for r in rows]
        return pa.table({"row": [json.dumps(r) for r in out], "file": [e[3] for e in entries],
                         "last": [e[4] for e in entries]})

    def _prepare(self, record: str | None, where: str, problem: str | None) -> dict | tuple[dict, list]:
        """The record and the engine's choices for it, or its output row with the error (a dict)."""
        from raytron.serve.prepare import prepare_choices, prompt_ids
        from raytron.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_request

        row = {} if record is None else json.loads(record)
        if problem is not None:
            return bad_row(row, problem)
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
            return row, prepare_choices(request, ids, self.engine, self.serve_cfg, self.vocab_size, "prompt", stops)
        except ApiError as error:
            return bad_row(row, f"{where}: {error.message}")

    async def _complete_all(self, prepared: list[tuple[dict, list]]) -> Iterator[dict]:
        """Every prepared record's output row, all in the engine at once (it batches them)."""
        async def one(row: dict, choices: list) -> dict:
            done = await asyncio.gather(*(self.engine.complete(c.ids, c.params) for c in choices))
            return {**row, "text": done[0].text if len(done) == 1 else None, "texts": [d.text for d in done],
                    "finish_reason": done[0].finish_reason,
                    "completion_tokens": sum(d.completion_tokens for d in done), "error": None}
        return iter(await asyncio.gather(*(one(row, choices) for row, choices in prepared)))


def bad_row(row: dict, problem: str) -> dict:
    """The output row of a record the server would refuse: its fields and the problem, naming where it is."""
    return {**row, "text": None, "texts": [], "finish_reason": None, "completion_tokens": 0, "error": problem}


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
    """The whole output file at once, under a temporary name first and then moved into place: a
    file at the output name is always complete (a kill mid-write leaves only the temporary)."""
    from raytron.storage import filesystem_for, write_bytes

    if cfg.format == "jsonl":
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    else:
        names = list(dict.fromkeys(key for row in rows for key in row))  # every record's fields
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{n: row.get(n) for n in names} for row in rows]), buffer)
        data = buffer.getvalue()
    write_bytes(url + PARTIAL_SUFFIX, data)
    fs, path = filesystem_for(url)
    fs.move(path + PARTIAL_SUFFIX, path)


def _outputs(cfg: GenerateConfig, sources: list[str]) -> Iterator[tuple[int, list[dict]]]:
    """(index in ``sources``, its output rows in file order) for each file as soon as it is done, in
    order: every record through one actor pool, the files in one Dataset. Under on_bad_record 'fail'
    the first bad record raises BadRecordError naming its file and line."""
    import ray.data
    from ray.data import ActorPoolStrategy

    dataset = ray.data.read_datasource(GenerateDatasource(sources)).map_batches(
        GenerationWorker, fn_constructor_kwargs={"config": cfg.model_dump(mode="json")},
        batch_size=cfg.limits.max_batch_size, batch_format="pyarrow",  # a few calls run at once: see GenerationWorker
        compute=ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.num_cpus_per_actor)
    dataset.context.enable_progress_bars = True  # the read and the pool's bars on the console
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))  # blocks as they come, in order
    rows: list[dict] = []  # of the file being collected (order is preserved: one file at a time)
    next_file = 0
    try:
        for batch in batches:
            for text, file, last in zip(*(batch.column(n).to_pylist() for n in ("row", "file", "last"))):
                for empty in range(next_file, file):  # files before this one that held no record
                    yield empty, []
                row = json.loads(text)
                if row["error"] is not None and cfg.on_bad_record == "fail":  # the worker left out what follows
                    raise BadRecordError(f"bad input record at {row['error']} "
                                         "(set on_bad_record: skip to write its error and go on)")
                rows.append(row)
                next_file = file
                if last:
                    yield file, rows
                    rows, next_file = [], file + 1
    finally:
        batches.close()  # a stop at a bad record ends the pool now, not when garbage collected
    for empty in range(next_file, len(sources)):
        yield empty, []


def run_generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Generate for every input file without an output yet (Ray must be connected); one summary row
    per input file (with the decode batch it ran at; ``seconds`` from the start to the file written).
    Under on_bad_record 'fail' the first bad record raises BadRecordError naming its file and line,
    and neither its file nor a later one is written."""
    import ray.data

    from raytron.storage import filesystem_for

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # outputs in input order
    summary, pending = [], []
    for source in input_files(cfg.input):
        target = output_for(cfg, source)
        fs, path = filesystem_for(target)
        entry = {"input": source, "output": target, "records": None, "bad": None, "tokens": None, "seconds": None,
                 "max_batch_size": cfg.limits.max_batch_size, "status": "done before"}
        summary.append(entry)
        if fs.get_file_info(path).type != pafs.FileType.File:
            pending.append(entry)
    started = time.perf_counter()
    for file, rows in _outputs(cfg, [entry["input"] for entry in pending]) if pending else ():
        entry = pending[file]
        _write(cfg, entry["output"], rows)
        entry.update(records=len(rows), bad=sum(r["error"] is not None for r in rows),
                     tokens=sum(r["completion_tokens"] for r in rows), seconds=time.perf_counter() - started,
                     status="written")
    return summary
