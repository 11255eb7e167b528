"""`raytron generate` on moto's S3: one output per input file, texts equal to the server's for the same
seeds (the in-process generate the server is tested against), chats rendered by the server's
template, bad records skipped or failing by name, and a rerun that skips finished files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from raytron.model.sampling import SamplingParams
from raytron.serve.batch_generate import GenerateConfig, run_generate
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


def test_generate_writes_one_output_per_input_and_resumes(ray_cluster, s3_server, monkeypatch, folder):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.create_bucket(BUCKET)
    root = f"s3://{BUCKET}/run"
    prompts = [{"prompt": TEXTS[i], "seed": 10 + i} for i in range(3)]
    chats = [{"messages": [{"role": "user", "content": TEXTS[3]}], "seed": 7},
             {"messages": [{"role": "robot", "content": "hi"}], "seed": 8}]  # a role the server refuses
    write_bytes(f"{root}/in/a.jsonl", jsonl(prompts))
    write_bytes(f"{root}/in/b.jsonl", jsonl(chats))
    cfg = config(folder, root, on_bad_record="skip")

    summary = run_generate(cfg)
    assert [row["status"] for row in summary] == ["written (0 bad records)", "written (1 bad records)"]
    local = load_model(str(folder))
    written = read_jsonl(f"{root}/out/a.jsonl")
    params = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert [r["text"] for r in written] == [reference(local, p["prompt"], SamplingParams(seed=p["seed"], **params))
                                           for p in prompts]
    chat, bad = read_jsonl(f"{root}/out/b.jsonl")
    prompt = render_chat([ChatMessage(**m) for m in chats[0]["messages"]])
    assert chat["text"] == reference(local, prompt, SamplingParams(seed=7, stop=TURN_STOPS, **params))
    assert bad["text"] is None and "messages.0.role" in bad["error"]

    # a rerun after a kill: what is finished stays, what is missing is done
    fs, path = filesystem_for(f"{root}/out/a.jsonl")
    finished = fs.get_file_info(path).mtime
    delete(f"{root}/out/b.jsonl")
    again = run_generate(cfg)
    assert [row["status"] for row in again] == ["done before", "written (1 bad records)"]
    assert fs.get_file_info(path).mtime == finished
    assert read_jsonl(f"{root}/out/b.jsonl")[0]["text"] == chat["text"]

    strict = config(folder, root, on_bad_record="fail").model_copy(update={"output": f"{root}/strict"})
    with pytest.raises(Exception, match="b.jsonl.*messages.0.role"):
        run_generate(strict)


def test_generate_cli_fails_at_once_on_a_missing_model(tmp_path):
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump(
        {"model": {"source": str(tmp_path / "no-model")}, "input": str(tmp_path), "output": str(tmp_path / "out")}))
    done = subprocess.run([sys.executable, "-m", "raytron.cli", "generate", str(tmp_path / "generate.yaml")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("raytron generate: model.source:") and "no-model" in line
