"""The Serve app on 127.0.0.1 over real HTTP: the official openai client, raw requests for the error
table, batch invariance, disconnects, a 30 s load test and the Prometheus series.

One app (a tiny random-init GPT exported like a trained one) serves the whole module."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import ray
from ray import serve

from raytron.data.tokenizer import save_tokenizer, train_tokenizer
from raytron.config import ModelConfig
from raytron.export.huggingface import export_huggingface
from raytron.model.generation import generate
from raytron.model.gpt import build_model
from raytron.model.sampling import SamplingParams
from raytron.serve.app import run_app
from raytron.serve.chat_template import TURN_STOPS, render_chat
from raytron.serve.protocol import ChatMessage
from raytron.serve.model_source import load_model
from raytron.serve.settings import build_serve_config
from tests.servers import free_port

MODEL_NAME = "tiny-gpt"
API_KEY = "test-key"
BATCH = 16
MAX_TOKENS = 48
STREAM_INTERVAL_S = 0.3
"""http.stream_interval_s of the second app, far longer than a step of the tiny model; the first app
sends every step's text (0)."""
CONTEXT = 128
"""The first app's context window (limits.context)."""
LONG_CONTEXT = 2048
"""The model's window and the second app's: room for streams that run for thousands of steps."""
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return the value of the parameter.",
         "This module provides a class for reading files.", "Raises ValueError if the input is empty."]
SERIES = ("raytron_serve_requests_total", "raytron_serve_errors_total", "raytron_serve_generated_tokens_total",
          "raytron_serve_running_batch_size", "raytron_serve_time_to_first_token_seconds_bucket",
          "raytron_serve_inter_token_latency_seconds_bucket", "raytron_serve_prompt_tokens_total",
          "raytron_serve_logprob_requests_total", "raytron_serve_queue_time_seconds_bucket")


def tiny_export(folder: Path) -> Path:
    """A random-init GPT and a BPE trained on a few sentences, exported as training exports."""
    tokenizer = train_tokenizer(TEXTS * 20, vocab_size=300, min_frequency=1)
    tokenizer_path = save_tokenizer(tokenizer, folder / "tokenizer")
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=LONG_CONTEXT)
    return export_huggingface(build_model(cfg, seed=11), folder / "export", tokenizer_path, eos_token_id=0)


def serve_config(source: str, port: int, **model) -> dict:
    return {"model": {"source": source, "name": MODEL_NAME, **model},
            "limits": {"max_batch_size": BATCH, "max_tokens": MAX_TOKENS, "max_request_bytes": 20_000,
                       "context": CONTEXT},
            "deployment": {"max_ongoing_requests": 128, "ray_actor_options": {"num_cpus": 1}},
            "http": {"host": "127.0.0.1", "port": port, "api_key": API_KEY, "stream_interval_s": 0}}


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    folder = tiny_export(tmp_path_factory.mktemp("serve-model"))
    cfg = build_serve_config(serve_config(str(folder), free_port()))
    url = run_app(cfg)
    yield url, folder
    serve.shutdown()


@pytest.fixture(scope="module")
def coalescing(served):
    """A second app on the same model and proxy whose streams send text at most every STREAM_INTERVAL_S,
    with the model's whole window: every slot can hold a stream that runs for thousands of steps."""
    url, folder = served
    config = serve_config(str(folder), int(url.rsplit(":", 1)[1]))
    config["app_name"] = "coalescing"
    config["limits"] |= {"context": LONG_CONTEXT, "max_tokens": ENDLESS_TOKENS,
                         "max_tokens_in_flight": BATCH * LONG_CONTEXT}
    config["http"] |= {"route_prefix": "/coalescing", "stream_interval_s": STREAM_INTERVAL_S}
    yield run_app(build_serve_config(config))
    serve.delete("coalescing")


@pytest.fixture(scope="module")
def local(served):
    """The same model in this process, for reference outputs."""
    return load_model(str(served[1]))


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=API_KEY, max_retries=0)


def reference(local, prompt: str, params: SamplingParams) -> str:
    ids = local.tokenizer.encode(prompt).ids
    return generate(local.model, [ids], params, local.eos_id, local.tokenizer.decode)[0].text


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


def request(url: str, body: bytes | dict | None = None, headers: dict | None = None) -> Reply:
    """A raw HTTP request (POST with a body, else GET) with the API key unless headers override it."""
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    call = urllib.request.Request(url, data=content, headers={k: v for k, v in headers.items() if v})
    try:
        with urllib.request.urlopen(call, timeout=120) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode())
    except urllib.error.HTTPError as error:
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read().decode())


post = request


def health(url: str) -> dict:
    return request(f"{url}/health").json()


def test_models_lists_the_configured_name(client):
    assert [model.id for model in client.models.list().data] == [MODEL_NAME]


def test_greedy_completion_equals_in_process_generation(client, local):
    response = client.completions.create(model=MODEL_NAME, prompt=TEXTS[0], max_tokens=12, temperature=0)
    expected = reference(local, TEXTS[0], SamplingParams(max_new_tokens=12, temperature=0))
    (choice,) = response.choices
    assert choice.text == expected and choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(local.tokenizer.encode(TEXTS[0]).ids)
    assert 0 < response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_prompt_list_gives_one_choice_per_prompt(client, local):
    response = client.completions.create(model=MODEL_NAME, prompt=TEXTS[:3], max_tokens=6, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    assert [c.text for c in response.choices] == [reference(local, text, params) for text in TEXTS[:3]]


def test_streamed_completion_adds_up_to_the_plain_one(client, served):
    kwargs = dict(model=MODEL_NAME, prompt=TEXTS[1], max_tokens=20, temperature=0.9, seed=5,
                  extra_body={"top_k": 40})  # top_k is an extension: the client sends it as extra body
    plain_response = client.completions.create(**kwargs)
    plain, plain_usage = plain_response.choices[0], plain_response.usage
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    raw = post(f"{served[0]}/v1/completions", {**kwargs.pop("extra_body"), **kwargs, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    streamed = "".join(json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1])
    assert streamed == plain.text
    with_usage = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == plain_usage.completion_tokens


def streamed_events(url: str, body: dict) -> list[dict]:
    """The JSON events of a streamed completion with usage (the stream must end with [DONE])."""
    raw = post(f"{url}/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert raw.status_code == 200, raw.text
    events = [event for event in raw.text.split("\n\n") if event]
    assert events[-1] == "data: [DONE]"
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


@pytest.mark.parametrize("app", ["served", "coalescing"])
def test_streamed_chunks_join_to_the_plain_text_and_never_outnumber_the_tokens(request, app):
    found = request.getfixturevalue(app)
    url = found[0] if app == "served" else found
    greedy = {"model": MODEL_NAME, "prompt": TEXTS[3], "max_tokens": MAX_TOKENS, "temperature": 0}
    unstopped = post(f"{url}/v1/completions", greedy).json()["choices"][0]["text"]
    stop = unstopped[12:15]  # in the middle of the text: the stream must hold back its first letters
    stopped = post(f"{url}/v1/completions", {**greedy, "stop": stop}).json()["choices"][0]["text"]
    assert len(stop) == 3 and stopped == unstopped[:unstopped.index(stop)]
    bodies = [seeded_request(i) for i in (1, 2, 5, 6)] + [
        {**greedy, "stop": stop}, {**seeded_request(3), "prompt": TEXTS[:3], "max_tokens": 30}]
    chunks, tokens = 0, 0
    for body in bodies:
        plain = post(f"{url}/v1/completions", body).json()
        events = streamed_events(url, body)
        assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
        for choice in plain["choices"]:  # one per prompt; a stream interleaves them by index
            mine = [event["choices"][0] for event in events[:-1] if event["choices"][0]["index"] == choice["index"]]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
            chunks += sum(1 for c in mine if c["text"])
        tokens += plain["usage"]["completion_tokens"]
    assert chunks <= tokens
    if app == "coalescing":
        # what an interval generated went out together: 16 chunks for these 155 tokens in one run, 84 with
        # interval 0 (where a step whose text ends in an unfinished character hands nothing over)
        assert chunks <= tokens / 4, (chunks, tokens)


def test_coalescing_streams_free_their_slots_when_clients_disconnect(coalescing):
    before = health(coalescing)
    connections = [open_stream(coalescing, ENDLESS) for _ in range(4)]
    for connection in connections:
        connection.close()
    after = wait_for(lambda: settled(coalescing), "the disconnected streams' slots are free")
    assert after["cancelled"] - before["cancelled"] == 4  # they ended by the disconnects, not by finishing


def test_chat_completion_renders_the_template(client, local):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": TEXTS[2]}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    prompt = render_chat([ChatMessage(**m) for m in messages])
    assert prompt.endswith("User: " + TEXTS[2] + "\n\nAssistant:")
    expected = reference(local, prompt, SamplingParams(max_new_tokens=10, temperature=0, stop=TURN_STOPS))
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason
    with_usage = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                                     temperature=0, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage.total_tokens == response.usage.total_tokens


LONG_PROMPT = " ".join(TEXTS) * 20  # far beyond the 128-token context

ERROR_TABLE = [
    # (name, body or raw bytes, headers, status, param)
    ("malformed json", b'{"model": "tiny-gpt", "prompt": ', {}, 400, None),
    ("body not an object", b"[1, 2]", {}, 400, None),
    ("wrong type", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": "5"}, {}, 400, "max_tokens"),
    ("prompt missing", {"model": MODEL_NAME}, {}, 400, "prompt"),
    ("unknown field", {"model": MODEL_NAME, "prompt": "hi", "best_ofs": 3}, {}, 400, "best_ofs"),
    ("max_tokens 0", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, {}, 400, "max_tokens"),
    ("max_tokens negative", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": -3}, {}, 400, "max_tokens"),
    ("max_tokens over the limit", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": MAX_TOKENS + 1}, {}, 400,
     "max_tokens"),
    ("prompt beyond context", {"model": MODEL_NAME, "prompt": LONG_PROMPT[:10_000]}, {}, 400, "prompt"),
    ("negative temperature", {"model": MODEL_NAME, "prompt": "hi", "temperature": -0.5}, {}, 400, "temperature"),
    ("top_p 0", {"model": MODEL_NAME, "prompt": "hi", "top_p": 0}, {}, 400, "top_p"),
    ("top_p above 1", {"model": MODEL_NAME, "prompt": "hi", "top_p": 1.5}, {}, 400, "top_p"),
    ("n 0", {"model": MODEL_NAME, "prompt": "hi", "n": 0}, {}, 400, "n"),
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, {}, 404, "model"),
    ("body too large", {"model": MODEL_NAME, "prompt": "x" * 30_000}, {}, 413, None),
    ("no api key", {"model": MODEL_NAME, "prompt": "hi"}, {"Authorization": ""}, 401, None),
    ("wrong api key", {"model": MODEL_NAME, "prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, None),
]


@pytest.mark.parametrize("name,body,headers,status,param", ERROR_TABLE, ids=[row[0] for row in ERROR_TABLE])
def test_bad_input_answers_an_openai_error_and_the_server_keeps_serving(served, name, body, headers, status, param):
    response = post(f"{served[0]}/v1/completions", body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert health(served[0])["status"] == "ok"


def test_prompt_plus_max_tokens_beyond_context(served, local):
    tokenizer = local.tokenizer
    prompt = tokenizer.decode(tokenizer.encode(LONG_PROMPT).ids[:100])
    assert 128 - MAX_TOKENS < len(tokenizer.encode(prompt).ids) < 128
    too_long = post(f"{served[0]}/v1/completions", {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    # without max_tokens the default shrinks to what the window leaves
    fits = post(f"{served[0]}/v1/completions", {"model": MODEL_NAME, "prompt": prompt})
    assert fits.status_code == 200, fits.text


def test_chat_errors_and_unknown_routes_use_the_same_shape(served):
    bad_role = post(f"{served[0]}/v1/chat/completions",
                    {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "hi"}]})
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages.0.role"
    long_chat = post(f"{served[0]}/v1/chat/completions",
                     {"model": MODEL_NAME, "messages": [{"role": "user", "content": LONG_PROMPT[:10_000]}]})
    assert long_chat.status_code == 400 and long_chat.json()["error"]["code"] == "context_length_exceeded"
    missing = request(f"{served[0]}/v1/nothing")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert request(f"{served[0]}/v1/models", headers={"Authorization": ""}).status_code == 401  # every /v1 route


ENDLESS_TOKENS = LONG_CONTEXT - 64
ENDLESS = {"model": MODEL_NAME, "prompt": TEXTS[0], "max_tokens": ENDLESS_TOKENS, "temperature": 0,
           "ignore_eos": True, "stream": True}
"""A stream that can end only by its client leaving while a test runs (thousands of steps)."""


def seeded_request(index: int) -> dict:
    return {"model": MODEL_NAME, "prompt": TEXTS[index % len(TEXTS)] * (1 + index % 3),
            "max_tokens": 8 + 2 * (index % 7), "temperature": 0.0 if index % 4 == 0 else 1.0,
            "top_p": 0.9, "seed": 100 + index}


def wait_for(condition, what: str, deadline_s: float = 120.0):
    """Poll until condition() is truthy (a deadline against hangs, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"never happened: {what}")


def settled(url: str) -> dict | None:
    """/health once nothing runs or waits and every slot is free (a steady state, not a moment)."""
    state = health(url)
    return state if state["free_slots"] == BATCH and state["running"] == state["waiting"] == 0 else None


def steps_with(state: dict, size: int) -> int:
    """Engine steps so far that ran ``size`` sequences together (the engine's record, /health)."""
    return state["batch_steps"].get(str(size), 0)


def open_stream(url: str, body: dict) -> http.client.HTTPConnection:
    """POST a streaming request and read its first event; the open connection is returned."""
    where = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=120)
    connection.request("POST", f"{where.path}/v1/completions", json.dumps(body),
                       {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    return connection


def fill_every_slot(url: str) -> list[http.client.HTTPConnection]:
    """BATCH endless streams (each holds its slot for ~2000 steps unless its client leaves)."""
    return [open_stream(url, ENDLESS) for _ in range(BATCH)]


def test_sixteen_concurrent_seeded_requests_equal_one_at_a_time(coalescing):
    """Every slot held by an endless stream, the 16 requests queue together; when the streams go,
    they run batched with each other (and with streams not yet dropped), whatever the machine's speed."""
    url = coalescing
    requests = [seeded_request(i) for i in range(16)]
    alone = [post(f"{url}/v1/completions", r).json()["choices"][0]["text"] for r in requests]
    blockers = fill_every_slot(url)
    with ThreadPoolExecutor(16) as pool:
        replies = [pool.submit(post, f"{url}/v1/completions", r) for r in requests]
        wait_for(lambda: health(url)["waiting"] == 16, "the 16 requests queue behind the full batch")
        full_before = steps_with(health(url), 16)
        for blocker in blockers:
            blocker.close()
        concurrent = [reply.result().json()["choices"][0]["text"] for reply in replies]
    assert concurrent == alone
    after = wait_for(lambda: settled(url), "every slot is free again")
    assert steps_with(after, 16) > full_before  # they ran in full batches


def test_disconnecting_mid_stream_frees_the_slot(coalescing):
    url = coalescing
    before = health(url)
    connections = fill_every_slot(url)
    for connection in connections:  # each holds a slot for ~2000 more steps; now the clients go away
        connection.close()
    after = wait_for(lambda: settled(url), "the disconnected streams' slots are free")
    assert after["cancelled"] - before["cancelled"] == BATCH  # they ended by the disconnects, not by finishing
    # the next requests run at full batch again: one request with BATCH prompts hands them to the engine
    # together; the engine's record of its steps says how full they were (with a slot leaked no step
    # could hold BATCH sequences)
    full = {"model": MODEL_NAME, "prompt": [TEXTS[1]] * BATCH, "max_tokens": 8, "temperature": 0}
    reply = post(f"{url}/v1/completions", full)
    assert reply.status_code == 200 and len(reply.json()["choices"]) == BATCH
    assert steps_with(health(url), BATCH) > steps_with(after, BATCH)


def well_formed(body: dict, stream: bool) -> bool:
    choice = body["choices"][0]
    return (body["object"] == "text_completion" and isinstance(choice["text"], str)
            and (stream or (choice["finish_reason"] in ("stop", "length") and body["usage"]["total_tokens"] > 0)))


@pytest.mark.slow
def test_load_32_clients_for_30_seconds(served):
    url = served[0]
    end = time.monotonic() + 30

    def one_client(index: int) -> list[str]:
        outcomes = []
        round_ = 0
        while time.monotonic() < end:
            round_ += 1
            body = {**seeded_request(index + round_), "stream": round_ % 3 == 0}
            if round_ % 7 == 0:
                body["temperature"] = -1  # some bad requests in the mix
            reply = post(f"{url}/v1/completions", body)
            if reply.status_code == 200 and body["stream"]:
                events = [e for e in reply.text.split("\n\n") if e]
                good = events[-1] == "data: [DONE]" and all(
                    well_formed(json.loads(e.removeprefix("data: ")), True) for e in events[:-1])
            elif reply.status_code == 200:
                good = well_formed(reply.json(), False)
            else:
                good = set(reply.json()["error"]) == {"message", "type", "param", "code"}
            outcomes.append(f"{reply.status_code}" if good else f"{reply.status_code} malformed")
        return outcomes

    with ThreadPoolExecutor(32) as pool:
        outcomes = [o for client_outcomes in pool.map(one_client, range(32)) for o in client_outcomes]
    counts = {outcome: outcomes.count(outcome) for outcome in set(outcomes)}
    assert set(counts) == {"200", "400"}, counts  # no 5xx, nothing malformed
    assert counts["200"] >= 32, counts


def test_metrics_reach_prometheus(served, client):
    client.completions.create(model=MODEL_NAME, prompt=TEXTS[0], max_tokens=4, logprobs=1)
    post(f"{served[0]}/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "top_p": 3})
    port = ray.nodes()[0]["MetricsExportPort"]

    def scrape():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        names = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_raytron_serve_")}
        return names if all(f"ray_{series}" in names for series in SERIES) else None

    names = wait_for(scrape, "every serving series is exported", deadline_s=60)
    assert {f"ray_{series}" for series in SERIES} <= names
