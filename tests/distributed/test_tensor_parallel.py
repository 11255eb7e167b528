"""TP=2 on two gloo processes against the serial model loaded with the same full weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from raytron.config import ModelConfig
from raytron.model.gpt import GPT, build_model
from raytron.parallel.sharding import gather_full_state_dict, load_full_state_dict, shard_of
from raytron.parallel.tensor_parallel import TensorParallelLayers
from raytron.parallel.topology import Topology
from tests.distributed.gloo import run_on_gloo

TOL = 1e-5


def tiny(flavour: str, **overrides) -> ModelConfig:
    return ModelConfig(flavour=flavour, vocab_size=250, hidden_size=32, num_layers=2, num_heads=4,
                       max_position_embeddings=32, **overrides)


def serial_and_parallel(cfg: ModelConfig, tp: int) -> tuple[GPT, GPT, Topology]:
    """The serial model and a TP model holding the same full weights (padded vocab chosen for tp)."""
    padded = cfg.padded_vocab(tp)
    serial = build_model(cfg, seed=3, padded_vocab=padded)
    topology = Topology.from_world(dp=1, pp=1, tp=tp)
    parallel = GPT(cfg, TensorParallelLayers(topology, seed=3), padded_vocab=padded)
    load_full_state_dict(parallel, serial.state_dict(), topology.tensor)
    return serial, parallel, topology


def batch(cfg: ModelConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (3, 17), generator=generator)
    return data[:, :-1], data[:, 1:]


def _check_forward_backward(flavour: str) -> None:
    cfg = tiny(flavour)
    serial, parallel, topology = serial_and_parallel(cfg, tp=2)
    group = topology.tensor

    # each shard is the matching slice of the full weight (exact: no arithmetic involved)
    full = serial.state_dict()
    qkv_local = parallel.blocks[0].attn.qkv.weight
    q, k, v = full["blocks.0.attn.qkv.weight"].chunk(3)
    assert torch.equal(qkv_local, torch.cat([q.chunk(2)[group.rank], k.chunk(2)[group.rank], v.chunk(2)[group.rank]]))
    assert torch.equal(parallel.blocks[1].mlp.down.weight, full["blocks.1.mlp.down.weight"].chunk(2, dim=1)[group.rank])
    assert torch.equal(parallel.embed.tokens.weight, full["embed.tokens.weight"].chunk(2)[group.rank])
    for name, param in parallel.named_parameters():
        split = getattr(param, "tp_split", None)
        expected = full[name] if split is None else shard_of(full[name], split, group.rank, group.size)
        assert torch.equal(param, expected), name
    # init is layout-independent: a TP model initialised from the same seed holds the same shards
    fresh = build_model(cfg, seed=3, layers=TensorParallelLayers(topology, seed=3), padded_vocab=cfg.padded_vocab(2))
    for (name, param), (_, fresh_param) in zip(parallel.named_parameters(), fresh.named_parameters()):
        assert torch.equal(param, fresh_param), name

    tokens, targets = batch(cfg)
    serial_logits = serial(tokens)
    parallel_logits = parallel(tokens)
    assert parallel_logits.shape[-1] == serial_logits.shape[-1] // 2
    torch.testing.assert_close(parallel.layers.gather_logits(parallel_logits), serial_logits, atol=TOL, rtol=0)

    serial_loss = serial.loss(serial_logits, targets)
    parallel_loss = parallel.loss(parallel_logits, targets)
    assert abs(serial_loss.item() - parallel_loss.item()) < TOL
    serial_loss.backward()
    parallel_loss.backward()
    grads = {name: p.grad for name, p in parallel.named_parameters()}
    full_grads = gather_full_state_dict(parallel, group, grads)
    for name, param in serial.named_parameters():
        torch.testing.assert_close(full_grads[name], param.grad, atol=TOL, rtol=0, msg=name)

    # gathering the shards back reproduces the full weights exactly
    gathered = gather_full_state_dict(parallel, group)
    for name, tensor in full.items():
        assert torch.equal(gathered[name], tensor), name


def _check_adamw_steps(flavour: str) -> None:
    cfg = tiny(flavour)
    serial, parallel, _ = serial_and_parallel(cfg, tp=2)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (serial, parallel)]
    for step in range(10):
        tokens, targets = batch(cfg, seed=step)
        losses = []
        for model, optimizer in zip((serial, parallel), optimizers):
            optimizer.zero_grad()
            loss = model.loss(model(tokens), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        # Adam divides each update by its own gradient scale, so fp32 rounding of TP's sharded sums grows over
        # steps: the gpt flavour reached 1.2e-5 by step 10 once padded logits were masked (no change of model)
        assert abs(losses[0] - losses[1]) < 2 * TOL, (step, losses)


@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_tp2_matches_serial_logits_loss_grads(flavour):
    run_on_gloo(2, _check_forward_backward, flavour)


@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_tp2_matches_serial_over_ten_adamw_steps(flavour):
    run_on_gloo(2, _check_adamw_steps, flavour)


def _check_cross_entropy() -> None:
    from raytron.parallel.cross_entropy import vocab_parallel_cross_entropy

    topology = Topology.from_world(dp=1, pp=1, tp=2)
    group = topology.tensor
    full_logits = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    targets = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(1))
    reference_input = full_logits.clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(reference_input.flatten(0, 1), targets.flatten())
    reference.backward()
    local = full_logits.chunk(2, dim=-1)[group.rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, group, vocab_start=group.rank * 6)
    loss.backward()
    torch.testing.assert_close(loss.double(), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(local.grad.double(), reference_input.grad.chunk(2, dim=-1)[group.rank], atol=1e-6, rtol=0)


def test_vocab_parallel_cross_entropy_matches_torch():
    run_on_gloo(2, _check_cross_entropy)


def _check_dropout_rng() -> None:
    cfg = tiny("gpt", hidden_dropout=0.3, attention_dropout=0.3)
    _, parallel, topology = serial_and_parallel(cfg, tp=2)
    parallel.train()
    torch.manual_seed(11)  # replicated stream: same seed on both TP ranks
    tokens, _ = batch(cfg)
    hidden = parallel.embed(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))
    for block in parallel.blocks:
        hidden = block(hidden, torch.arange(tokens.shape[1]).expand_as(tokens))
    # the residual stream is replicated: with consistent RNG every TP rank holds the same values
    peers = [torch.empty_like(hidden) for _ in range(2)]
    dist.all_gather(peers, hidden.detach(), group=topology.tensor.group)
    assert torch.equal(peers[0], peers[1])
    # the sharded stream differs per rank (attention dropout over different heads)
    with parallel.layers.sharded_rng():
        draw = torch.rand(8)
    draws = [torch.empty_like(draw) for _ in range(2)]
    dist.all_gather(draws, draw, group=topology.tensor.group)
    assert not torch.equal(draws[0], draws[1])


def test_dropout_is_tp_consistent():
    run_on_gloo(2, _check_dropout_rng)
