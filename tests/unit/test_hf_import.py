"""Importing Hugging Face folders: logits and greedy tokens equal transformers, export is bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from raytron.export import export_huggingface
from raytron.model.generation import generate
from raytron.model.sampling import SamplingParams
from raytron.parallel.hf_import import load_huggingface_model
from raytron.parallel.hf_load import INDEX_FILE, weight_files
from tests.hf_models import KINDS, VOCAB, save_tiny


def source_tensors(folder):
    return {name: tensor for path in sorted(set(weight_files(folder).values())) for name, tensor in load_file(path).items()}


@pytest.fixture(scope="module", params=sorted(KINDS))
def imported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    theirs = save_tiny(request.param, folder)
    assert (folder / INDEX_FILE).is_file() and len(set(weight_files(folder).values())) > 2  # really sharded
    return request.param, folder, theirs, load_huggingface_model(folder, seq_len=64)


def test_config_comes_from_config_json(imported):
    kind, _, theirs, ours = imported
    cfg = ours.cfg
    assert cfg.hf_architecture == type(theirs).__name__
    assert cfg.vocab_size == VOCAB and cfg.tied == theirs.config.tie_word_embeddings
    if kind != "gpt2":
        assert (cfg.num_heads, cfg.kv_heads, cfg.head_dim) == (4, 2, 16)
        assert cfg.qkv_bias == (kind == "qwen2")
        assert (cfg.rope_scaling is not None) == kind.startswith("llama")


@torch.no_grad()
def test_logits_equal_transformers(imported):
    _, _, theirs, ours = imported
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))  # (B, T)
    torch.testing.assert_close(ours(tokens)[..., :VOCAB], theirs(tokens).logits, atol=1e-5, rtol=0)


def test_twenty_greedy_tokens_equal_transformers(imported):
    _, _, theirs, ours = imported
    prompt = [5, 17, 42, 99, 3]
    completion = generate(ours, [prompt], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    out = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                          pad_token_id=0, eos_token_id=None)
    assert completion.tokens == out[0, len(prompt):].tolist()


def test_import_then_export_is_bitwise_and_loads(imported, tmp_path):
    _, folder, theirs, ours = imported
    generation = folder / "generation_config.json"
    # an EOS list (Llama-3-Instruct: end of text and end of turn) must survive export
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "eos_token_id": [2, 7]}))
    out = export_huggingface(ours, tmp_path / "export")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    exported, source = load_file(out / "model.safetensors"), source_tensors(folder)
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(theirs).__name__]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, theirs(tokens).logits, atol=1e-5, rtol=0)
