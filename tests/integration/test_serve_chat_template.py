"""A served folder with its own chat template (ChatML, with real added special tokens): the server
renders chats exactly as transformers' apply_chat_template does, and the template's end-of-turn
token ends generation with finish_reason "stop". While that replica then idles, its running batch size
stays in Ray's metrics export (the agent drops a gauge not set within 20 s)."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest
import ray
from ray import serve
from transformers import AutoTokenizer

from raytron.config import ModelConfig
from raytron.data.tokenizer import DEFAULT_SPECIAL_TOKENS, EOS_TOKEN, save_tokenizer, train_tokenizer
from raytron.export.huggingface import export_huggingface
from raytron.model.gpt import build_model
from raytron.serve.app import run_app
from raytron.serve.settings import build_serve_config
from tests.integration.test_serve_api import API_KEY, MODEL_NAME, TEXTS, request, serve_config, wait_for
from tests.servers import free_port

END_OF_TURN = "<|im_end|>"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]},
            {"role": "assistant", "content": TEXTS[1]}, {"role": "user", "content": TEXTS[2]}]


@pytest.fixture(scope="module")
def chatml_served(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatml-model")
    tokenizer = train_tokenizer(TEXTS * 20, vocab_size=300, min_frequency=1,
                                special_tokens=DEFAULT_SPECIAL_TOKENS + ("<|im_start|>", END_OF_TURN))
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=256)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    export = export_huggingface(build_model(cfg, seed=5), folder / "export",
                                save_tokenizer(tokenizer, folder / "tokenizer"), eos_token_id=eos)
    config_path = export / "tokenizer_config.json"
    # the end-of-turn token is named only by the template: the server must find it there
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHATML}))
    config = serve_config(str(export), free_port())
    config["limits"]["context"] = cfg.max_position_embeddings  # the tags make the chat longer than 128 tokens
    url = run_app(build_serve_config(config))
    yield url, export, tokenizer
    serve.shutdown()


def test_server_renders_chats_as_transformers_apply_chat_template(chatml_served):
    url, export, tokenizer = chatml_served
    theirs = AutoTokenizer.from_pretrained(export)
    expected = theirs.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                          add_generation_prompt=True)["input_ids"]
    ours = request(f"{url}/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert ours == expected and tokenizer.token_to_id(END_OF_TURN) in ours
    closed = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    unopened = request(f"{url}/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()["tokens"]
    assert tokenizer.decode(unopened, skip_special_tokens=False) == closed
    info = request(f"{url}/tokenizer_info").json()
    assert info["chat_template"] == CHATML and info["eos_token"] == EOS_TOKEN


def test_end_of_turn_token_stops_a_chat_completion(chatml_served):
    url, _, tokenizer = chatml_served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    end = tokenizer.token_to_id(END_OF_TURN)
    steered = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0, logit_bias={str(end): 100})
    # min_tokens holds the end-of-turn token off as it holds EOS off, then it is chosen and ends the turn
    reply = client.chat.completions.create(**steered, extra_body={"min_tokens": 3})
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 3
    assert END_OF_TURN not in reply.choices[0].message.content and reply.choices[0].message.content
    ignored = client.chat.completions.create(**steered, extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length"


def test_running_batch_size_stays_exported_while_the_replica_idles(chatml_served):
    port = ray.nodes()[0]["MetricsExportPort"]

    def batch_size_lines():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        return [line for line in text.splitlines() if line.startswith("ray_raytron_serve_running_batch_size{")]

    wait_for(batch_size_lines, "the running batch size is exported", deadline_s=60)
    time.sleep(30)  # idle for longer than the agent keeps a gauge value that is not set again
    lines = batch_size_lines()
    assert lines and all(line.endswith(" 0.0") or line.endswith(" 0") for line in lines), lines
