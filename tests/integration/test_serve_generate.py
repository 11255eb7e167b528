"""`raytron generate` on moto's S3: one output per input file, texts equal to the server's for the same
seeds (the in-process generate the server is tested against), one actor pool for all the files of a
run, chats rendered by the server's template, Parquet in and out, bad records skipped or failing by
file and line, and a rerun after a SIGKILL that keeps finished files and completes the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from raytron.data.records import BadRecordError
from raytron.model.sampling import SamplingParams
from raytron.serve.batch_generate import GENERATE_BATCH, GenerateConfig, GenerateLimits, run_generate
from raytron.serve.chat_template import TURN_STOPS, render_chat
from raytron.serve.model_source import load_model
from raytron.serve.protocol import ChatMessage
from raytron.storage import delete, filesystem_for, read_bytes, write_bytes
from tests.integration.test_serve_api import MODEL_NAME, TEXTS, reference, tiny_export

BUCKET = "generate-e2e"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("generate-model"))


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def read_jsonl(url: str) -> list[dict]:
    return [json.loads(line) for line in read_bytes(url).decode().splitlines()]


def config(folder, root: str, **changes) -> GenerateConfig:
    return GenerateConfig(model={"source": str(folder), "name": MODEL_NAME}, input=f"{root}/in",
                          output=f"{root}/out", request={"max_tokens": 8, "temperature": 1.0, "top_p": 0.9},
                          limits={"context": 128, "max_batch_size": 4}, num_cpus_per_actor=0.5, **changes)


def generation_actors() -> set[str]:
    """Ids of the Ray Data actors ever started around a GenerationWorker in this cluster (dead ones too)."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(limit=10_000, raise_on_missing_output=False)
            if "GenerationWorker" in a.class_name}


def test_generate_writes_one_output_per_input_and_resumes(ray_cluster, s3_server, monkeypatch, folder):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.create_bucket(BUCKET)
    root = f"s3://{BUCKET}/run"
    prompts = [{"prompt": TEXTS[i], "seed": 10 + i} for i in range(3)]
    chats = [{"messages": [{"role": "user", "content": TEXTS[3]}], "seed": 7},
             {"messages": [{"role": "robot", "content": "hi"}], "seed": 8}]  # a role the server refuses
    write_bytes(f"{root}/in/a.jsonl", jsonl(prompts))
    write_bytes(f"{root}/in/a2-empty.jsonl", b"")  # between the two: no record, an empty output
    write_bytes(f"{root}/in/b.jsonl", jsonl(chats))
    cfg = config(folder, root, on_bad_record="skip")

    before = generation_actors()
    summary = run_generate(cfg)
    assert [(row["status"], row["records"], row["bad"]) for row in summary] == [
        ("written", 3, 0), ("written", 0, 0), ("written", 2, 1)]
    assert len(generation_actors() - before) == cfg.actors  # one pool for all files: the model loaded once per actor
    assert read_bytes(f"{root}/out/a2-empty.jsonl") == b""
    local = load_model(str(folder))
    written = read_jsonl(f"{root}/out/a.jsonl")
    params = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert [r["text"] for r in written] == [reference(local, p["prompt"], SamplingParams(seed=p["seed"], **params))
                                           for p in prompts]
    chat, bad = read_jsonl(f"{root}/out/b.jsonl")
    prompt = render_chat([ChatMessage(**m) for m in chats[0]["messages"]])
    assert chat["text"] == reference(local, prompt, SamplingParams(seed=7, stop=TURN_STOPS, **params))
    assert bad["text"] is None and bad["error"].startswith(f"{root}/in/b.jsonl:2: ") and "messages.0.role" in bad["error"]

    # a rerun after a kill: what is finished stays, what is missing is done
    fs, path = filesystem_for(f"{root}/out/a.jsonl")
    finished = fs.get_file_info(path).mtime
    delete(f"{root}/out/b.jsonl")
    again = run_generate(cfg)
    assert [(row["status"], row["bad"]) for row in again] == [("done before", None), ("done before", None), ("written", 1)]
    assert fs.get_file_info(path).mtime == finished
    assert read_jsonl(f"{root}/out/b.jsonl")[0]["text"] == chat["text"]

    strict = config(folder, root, on_bad_record="fail").model_copy(update={"output": f"{root}/strict"})
    with pytest.raises(BadRecordError, match="b.jsonl:2: messages.0.role"):
        run_generate(strict)
    # the files before the bad record's are written, its own is not
    assert read_jsonl(f"{root}/strict/a.jsonl") == written and read_bytes(f"{root}/strict/a2-empty.jsonl") == b""
    strict_fs, strict_b = filesystem_for(f"{root}/strict/b.jsonl")
    assert strict_fs.get_file_info(strict_b).type == pafs.FileType.NotFound


def test_generate_cli_fails_at_once_on_a_missing_model(tmp_path):
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump(
        {"model": {"source": str(tmp_path / "no-model")}, "input": str(tmp_path), "output": str(tmp_path / "out")}))
    done = subprocess.run([sys.executable, "-m", "raytron.cli", "generate", str(tmp_path / "generate.yaml")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("raytron generate: model.source:") and "no-model" in line


def test_generate_reads_and_writes_parquet(ray_cluster, folder, tmp_path):
    rows = [{"prompt": TEXTS[0], "messages": None, "seed": 3},
            {"prompt": None, "messages": [{"role": "user", "content": TEXTS[1]}], "seed": 4},
            {"prompt": TEXTS[2], "messages": None, "seed": 5}]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "p.parquet")
    cfg = config(folder, str(tmp_path), format="parquet")

    (entry,) = run_generate(cfg)
    written = pq.read_table(tmp_path / "out" / "p.parquet").to_pylist()
    assert entry["records"] == 3 and [r["seed"] for r in written] == [3, 4, 5]
    local = load_model(str(folder))
    params = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    prompt = render_chat([ChatMessage(role="user", content=TEXTS[1])])
    assert [r["text"] for r in written] == [reference(local, TEXTS[0], SamplingParams(seed=3, **params)),
                                           reference(local, prompt, SamplingParams(seed=4, stop=TURN_STOPS, **params)),
                                           reference(local, TEXTS[2], SamplingParams(seed=5, **params))]
    assert written[1]["messages"] == rows[1]["messages"] and written[0]["error"] is None


def test_bad_records_name_file_and_line(ray_cluster, folder, tmp_path):
    (tmp_path / "in").mkdir()
    lines = [json.dumps({"prompt": TEXTS[0], "seed": 1}), "{not json", "", json.dumps(["a", "list"]),
             json.dumps({"prompt": TEXTS[1], "seed": "two"})]
    source = tmp_path / "in" / "a.jsonl"
    source.write_text("\n".join(lines) + "\n")

    with pytest.raises(BadRecordError, match=f"{source}:2: not a JSON line"):
        run_generate(config(folder, str(tmp_path)))
    assert not (tmp_path / "out" / "a.jsonl").exists()

    (entry,) = run_generate(config(folder, str(tmp_path), on_bad_record="skip"))
    good, not_json, not_object, bad_value = read_jsonl(str(tmp_path / "out" / "a.jsonl"))
    assert (entry["records"], entry["bad"]) == (4, 3)
    assert good["error"] is None and good["text"]
    assert not_json["error"].startswith(f"{source}:2: not a JSON line")
    assert not_object["error"] == f"{source}:4: a JSON list, not an object"
    assert bad_value["error"].startswith(f"{source}:5: ") and "seed" in bad_value["error"]


def test_rerun_after_sigkill_redoes_only_unfinished_files(ray_cluster, folder, tmp_path):
    """SIGKILL `raytron generate` once its first output file is written; the rerun keeps that file and
    writes the rest: one output per input record, in input order."""
    (tmp_path / "in").mkdir()
    inputs = {stem: [{"prompt": TEXTS[(i + n) % 4], "seed": 100 * n + i} for i in range(4)]
              for n, stem in enumerate(["f0", "f1", "f2"])}
    for stem, records in inputs.items():
        (tmp_path / "in" / f"{stem}.jsonl").write_bytes(jsonl(records))
    cfg = config(folder, str(tmp_path))
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    address = ray.get_runtime_context().gcs_address
    process = subprocess.Popen([sys.executable, "-m", "raytron.cli", "generate", str(tmp_path / "generate.yaml")],
                               env={**os.environ, "RAY_ADDRESS": address}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first = tmp_path / "out" / "f0.jsonl"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert first.exists()
    left = [stem for stem in inputs if not (tmp_path / "out" / f"{stem}.jsonl").exists()]
    assert left, "the kill came after every file was done: nothing left to resume"
    finished = first.stat().st_mtime_ns

    summary = run_generate(cfg)
    assert [row["status"] for row in summary] == ["done before" if s not in left else "written" for s in inputs]
    assert first.stat().st_mtime_ns == finished
    for stem, records in inputs.items():
        written = read_jsonl(str(tmp_path / "out" / f"{stem}.jsonl"))
        assert [(r["prompt"], r["seed"]) for r in written] == [(r["prompt"], r["seed"]) for r in records]
        assert all(r["text"] is not None and r["error"] is None for r in written)


def test_texts_and_order_do_not_depend_on_the_decode_batch(ray_cluster, folder, tmp_path):
    """Nine seeded records at max_batch_size 2 (five Ray Data batches, several in the one engine at once,
    which takes the next batch's records as slots free) and at generate's default (one batch): the
    texts are the seeded reference's (each prompt alone) and come back in input order."""
    (tmp_path / "in").mkdir()
    records = [{"prompt": TEXTS[i % 4][: 20 + 9 * i], "seed": 50 + i} for i in range(9)]
    (tmp_path / "in" / "r.jsonl").write_bytes(jsonl(records))
    local = load_model(str(folder))
    params = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    expected = [reference(local, r["prompt"], SamplingParams(seed=r["seed"], **params)) for r in records]
    for batch in (2, GENERATE_BATCH):
        limits = {"context": 128} if batch == GENERATE_BATCH else {"context": 128, "max_batch_size": batch}
        cfg = config(folder, str(tmp_path)).model_copy(update={"output": f"{tmp_path}/out-{batch}",
                                                               "limits": GenerateLimits(**limits)})
        (entry,) = run_generate(cfg)
        assert entry["max_batch_size"] == batch
        written = read_jsonl(f"{tmp_path}/out-{batch}/r.jsonl")
        assert [r["seed"] for r in written] == [r["seed"] for r in records]
        assert [r["text"] for r in written] == expected
