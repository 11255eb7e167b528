"""Exported folders load in `transformers` and compute what our model computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from raytron.config import ModelConfig
from raytron.data.tokenizer import save_tokenizer, special_token_ids, train_tokenizer
from raytron.export import export_huggingface, load_huggingface
from raytron.model.gpt import build_model
from raytron.model.generation import generate
from raytron.model.sampling import SamplingParams

VOCAB = 300
FLAVOURS = ["gpt", "llama"]


def tiny_config(flavour: str) -> ModelConfig:
    return ModelConfig(flavour=flavour, vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                       max_position_embeddings=128)


@pytest.fixture(params=FLAVOURS)
def exported(request, tmp_path):
    """(our model, the transformers model loaded from its exported folder, the folder)."""
    ours = build_model(tiny_config(request.param), seed=7).eval()
    folder = export_huggingface(ours, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    return ours, theirs, folder


def test_loads_as_the_matching_transformers_class(exported):
    ours, theirs, folder = exported
    expected = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[ours.cfg.flavour]
    assert type(theirs).__name__ == expected
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    # padded embedding rows are cut: transformers sees the true vocabulary
    assert theirs.config.vocab_size == VOCAB < ours.padded_vocab
    padding = (ours.padded_vocab - VOCAB) * ours.cfg.hidden_size * (1 if ours.tied else 2)
    assert theirs.num_parameters() == sum(p.numel() for p in ours.parameters()) - padding


@torch.no_grad()
def test_logits_match_transformers(exported):
    ours, theirs, _ = exported
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))  # (B, T)
    torch.testing.assert_close(theirs(tokens).logits, ours(tokens)[..., :VOCAB], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(exported):
    ours, theirs, _ = exported
    prompts = [[5, 17, 42, 99, 3], [250, 11]]
    new_tokens = 12
    completions = generate(ours, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    for prompt, completion in zip(prompts, completions):
        out = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == completion.tokens


@torch.no_grad()
def test_load_huggingface_round_trips(exported):
    ours, _, folder = exported
    loaded = load_huggingface(folder)
    assert loaded.cfg == ours.cfg
    for name, tensor in ours.state_dict().items():
        if name in ("embed.tokens.weight", "head.output.weight"):  # export cut the padded rows: zeros again
            assert not loaded.state_dict()[name][VOCAB:].any(), name
            tensor, loaded_tensor = tensor[:VOCAB], loaded.state_dict()[name][:VOCAB]
        else:
            loaded_tensor = loaded.state_dict()[name]
        assert torch.equal(loaded_tensor, tensor), name


def test_state_dict_export_needs_its_config(tmp_path):
    with pytest.raises(ValueError, match="cfg"):
        export_huggingface(build_model(tiny_config("gpt")).state_dict(), tmp_path)


def test_tokenizer_is_copied_and_loads(tmp_path):
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=VOCAB)
    tokenizer_path = save_tokenizer(tokenizer, tmp_path / "tokenizer")
    eos = special_token_ids(tokenizer).eos
    cfg = tiny_config("llama")

    folder = export_huggingface(build_model(cfg).state_dict(), tmp_path / "hf", tokenizer_path, cfg=cfg,
                                eos_token_id=eos)

    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (folder / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    text = "the lazy fox"
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        loaded = loader.from_pretrained(folder)
        assert loaded(text)["input_ids"] == tokenizer.encode(text).ids
        assert loaded.eos_token_id == eos
    assert AutoModelForCausalLM.from_pretrained(folder).config.eos_token_id == eos
