"""FLOPs per token against Narayanan et al. eq. 3, exact parameter counts, memory per rank."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from raytron.config import load_config
from raytron.model.flops import flops_per_token, mfu, peak_bf16_flops
from raytron.model.gpt import count_parameters
from raytron.model.memory import memory_per_rank_bytes, over_memory_limit, parameters_per_stage
from raytron.train.cluster import ResourceError, ensure_resources

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
TINY = CONFIGS / "tiny_smoke.yaml"


def eq3_flops_per_token(l: int, h: int, s: int, V: int, recompute: bool) -> Fraction:
    """Narayanan et al. 2021 eq. 3 per token (divided by B s); without recomputation the
    blocks get 72 instead of 96 while the logits keep 6 h V, so the V term becomes V/(12 l h)."""
    if recompute:
        return 96 * l * h**2 * (1 + Fraction(s, 6 * h) + Fraction(V, 16 * l * h))
    return 72 * l * h**2 * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * l * h))


@pytest.mark.parametrize("name", ["tiny_smoke", "gpt_1p3b", "mtnlg_530b"])
@pytest.mark.parametrize("recompute", [True, False])
def test_gpt_flops_match_eq3(name, recompute):
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"train.activation_checkpointing={recompute}"])
    m = cfg.model
    expected = eq3_flops_per_token(m.num_layers, m.hidden_size, cfg.train.seq_len, cfg.padded_vocab_size, recompute)
    assert flops_per_token(cfg) == expected


def test_llama_counts_a_third_mlp_matmul():
    same_ffn = ["model.ffn_hidden_size=256", "train.activation_checkpointing=false"]
    gpt = load_config(TINY, same_ffn)
    llama = load_config(TINY, [*same_ffn, "model.flavour=llama"])
    h, f, l = 64, 256, 2
    assert flops_per_token(llama) - flops_per_token(gpt) == 3 * l * 2 * h * f  # fwd+bwd of the gate matmul


def test_mfu_and_peak_lookup():
    assert mfu(tokens_per_second=1000, flops_per_token=1e9, peak_flops=2e12) == 0.5
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("Some Accelerator") is None
    if not torch.cuda.is_available():
        assert peak_bf16_flops() is None


def gpt_parameters(l: int, h: int, V: int, P: int) -> int:
    """Per block 12h^2 weights + 13h (biases 3h+h+4h+h, two LayerNorms 4h); token and
    position tables; final LayerNorm 2h; the head is tied, so no output matrix."""
    return 12 * l * h**2 + 13 * l * h + (V + P) * h + 2 * h


def test_530b_parameter_count_is_exact_and_fast():
    cfg = load_config(CONFIGS / "mtnlg_530b.yaml")
    m = cfg.model
    l, h, V, P = m.num_layers, m.hidden_size, cfg.padded_vocab_size, m.max_position_embeddings
    start = time.perf_counter()
    counted = count_parameters(m, cfg.parallel.tp)
    assert time.perf_counter() - start < 30, "meta-device build allocates nothing"
    assert counted == gpt_parameters(l, h, V, P)
    # Narayanan et al.'s closed form (s = position table) covers everything but the final norm.
    closed_form = 12 * l * h**2 * (1 + Fraction(13, 12 * h) + Fraction(V + P, 12 * l * h))
    assert counted - closed_form == 2 * h
    assert counted == pytest.approx(529.6e9, rel=1e-3)


def test_llama_parameter_count_is_exact():
    cfg = load_config(CONFIGS / "tiny_llama_smoke.yaml")
    l, h, f, V = 2, 64, cfg.model.ffn_size, cfg.padded_vocab_size
    per_block = 4 * h * h + 3 * h * f + 2 * h  # qkv + proj, gate|up + down, two RMSNorm weights
    assert count_parameters(cfg.model) == l * per_block + V * h + h + h * V  # embed, final norm, untied head


def total_bytes(config, *overrides):
    return memory_per_rank_bytes(load_config(config, list(overrides)))[0]


def test_zero_stages_reduce_memory_monotonically():
    dp4 = ["parallel.dp=4", "train.precision=bf16"]
    per_stage = [total_bytes(TINY, *dp4, f"parallel.zero_stage={stage}") for stage in range(4)]
    assert per_stage == sorted(per_stage, reverse=True) and len(set(per_stage)) == 4


def test_tp_and_pp_divide_memory():
    base = total_bytes(TINY)
    assert total_bytes(TINY, "parallel.tp=2") < base
    assert total_bytes(TINY, "parallel.pp=2") < base
    assert total_bytes(TINY, "parallel.tp=2", "parallel.pp=2") < total_bytes(TINY, "parallel.tp=2")


def test_stages_partition_the_model():
    h, V, P, l = 64, 4096, 128, 2
    total = count_parameters(load_config(TINY).model)
    # pp splits everything; the tied gpt head adds its copy of the token embedding on the last stage
    assert sum(parameters_per_stage(load_config(TINY, ["parallel.pp=2"]))) == total + V * h
    llama = load_config(CONFIGS / "tiny_llama_smoke.yaml", ["parallel.pp=2"])
    assert sum(parameters_per_stage(llama)) == count_parameters(llama.model)
    # tp halves the sharded parameters and repeats the replicated ones on every rank
    replicated = P * h + l * (4 * h + 2 * h) + 2 * h  # positions, per block norms + row biases, final norm
    (per_rank,) = parameters_per_stage(load_config(TINY, ["parallel.tp=2"]))
    assert 2 * per_rank - replicated == total


def test_memory_matches_hand_computation():
    """tiny gpt, dp 2 x pp 2 x tp 2, bf16, ZeRO-1; h = 64, V = 4096, position table 128."""
    cfg = load_config(TINY, ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1",
                             "train.precision=bf16"])
    h, V, P = 64, 4096, 128
    block = (12 * h * h + 7 * h) // 2 + 6 * h  # sharded: qkv, proj, up, down weights + qkv, up biases
    first = V * h // 2 + P * h + block  # token shard + positions + block 0
    last = block + 2 * h + V * h // 2  # block 1 + final norm + tied embedding copy
    assert parameters_per_stage(cfg) == [first, last] == [164448, 156384]
    total, breakdown = memory_per_rank_bytes(cfg)
    assert breakdown == {"weights": 2 * first, "grads": 2 * first, "optimizer": 12 * first // 2,
                         "parameters_per_rank": first, "stage": 0}
    assert total == (2 + 2 + 6) * first


def test_fp32_uses_16_bytes_and_zero3_partitions_everything():
    cfg = load_config(TINY, ["parallel.dp=4", "parallel.zero_stage=3"])
    total, breakdown = memory_per_rank_bytes(cfg)
    params = breakdown["parameters_per_rank"]
    assert params == count_parameters(cfg.model)
    assert total == 16 * -(-params // 4)


def test_a_run_over_memory_per_worker_fails_before_it_asks_ray_for_anything():
    needed_gb = memory_per_rank_bytes(load_config(TINY))[0] / 2**30
    assert over_memory_limit(load_config(TINY)) is None  # no limit given
    assert over_memory_limit(load_config(TINY, [f"resources.memory_per_worker_gb={needed_gb * 1.01}"])) is None
    tight = load_config(TINY, [f"resources.memory_per_worker_gb={needed_gb / 2}"])
    with pytest.raises(ResourceError, match=r"needs .* GB per rank .* resources.memory_per_worker_gb is"):
        ensure_resources(tight)  # no Ray cluster here: the check comes first
