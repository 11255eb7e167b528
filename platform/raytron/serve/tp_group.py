"""A tensor-parallel replica: rank 0 in the replica's process, ranks 1..tp-1 in Ray actors beside it.

The replica asks Serve for a placement group of tp bundles packed on one node; rank 0 (the
replica) sits in bundle 0 and starts one ``TPRank`` actor in each other bundle. All ranks join
one torch.distributed world (gloo on CPU, nccl on GPU; rank 0's node address and a free port)
and build the GPT on the TP layers training uses, each loading its own shard (``tp_load.py``).

The serving engine runs unchanged on rank 0's GPT: a forward pre-hook broadcasts each forward's
step plan (token ids, positions, cache slots, which position's logits) on a gloo group before the
forward runs; every worker waits for plans in a loop, runs the same forward into its own KV cache
and joins the logits' all-gather, so rank 0 samples from the full logits exactly as a tp=1 replica
does. A plan of ``None`` ends the loop.

A rank that dies breaks the collectives: the step in progress fails (its requests end with an
error) and ``alive_ranks`` (the replica's health check) counts fewer than tp, so Serve replaces the whole replica;
the workers are owned by the replica's actor and die with it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raytron.model.gpt import GPT
from raytron.parallel.tensor_parallel import TensorParallelLayers
from raytron.parallel.topology import Topology
from raytron.serve.tp_load import load_tp_shard

IDLE_TIMEOUT = timedelta(days=365)
"""Workers wait for the next plan as long as the replica is idle: no collective may time out meanwhile."""
PING_TIMEOUT_S = 5.0


def _plan(tokens: torch.Tensor, positions: torch.Tensor | None, slots: torch.Tensor | None,
          logits_at: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """One forward's inputs, on the CPU: token ids (B, T), positions (B, T), slots (B,), logits_at (B,)."""
    def host(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.cpu()

    return {"tokens": host(tokens), "positions": host(positions), "slots": host(slots),
            "logits_at": host(logits_at)}


def join_world(address: str, rank: int, size: int, device: str) -> Topology:
    """Join the replica's world of ``size`` ranks; its TP group is the whole world."""
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=IDLE_TIMEOUT)
    return Topology.from_world(dp=1, pp=1, tp=size)


def load_rank(folder: str, topology: Topology, device: str) -> GPT:
    layers = TensorParallelLayers(topology, seed=0)  # eval mode: the dropout RNG never draws
    return load_tp_shard(folder, layers).to(device)


class PlanSender:
    """Rank 0's forward pre-hook: send the forward's plan to the workers, then let it run."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.seconds = 0.0
        """Time spent broadcasting plans (benchmarks read it)."""

    def __call__(self, module: GPT, args: tuple, kwargs: dict[str, Any]) -> None:
        names = ("tokens", "positions", "cache", "slots", "logits_at")
        given = dict(zip(names, args)) | kwargs
        start = time.perf_counter()
        dist.broadcast_object_list([_plan(given["tokens"], given.get("positions"), given.get("slots"),
                                          given.get("logits_at"))], src=0, group=self.group)
        self.seconds += time.perf_counter() - start

    def stop(self) -> None:
        dist.broadcast_object_list([None], src=0, group=self.group)


@ray.remote(max_concurrency=2)  # ping answers while follow runs
class TPRank:
    """Rank ``rank`` (>= 1) of a replica: its shard, its own KV cache, and the loop that follows rank 0."""

    def __init__(self, folder: str, address: str, rank: int, size: int, slots: int, context: int | None,
                 device: str, threads: int):
        torch.set_num_threads(threads)
        self.device = device
        self.topology = join_world(address, rank, size, device)
        self.model = load_rank(folder, self.topology, device)
        # the same cache as rank 0's engine (its context: limits.context, else the model's window)
        self.cache = self.model.new_cache(slots, context or self.model.cfg.max_position_embeddings)

    def ping(self) -> int:
        """This rank's process id (the replica's /health lists them)."""
        return os.getpid()

    @torch.no_grad()
    def follow(self) -> int:
        """Run every forward rank 0 announces until it sends None; returns the forwards run."""
        group, forwards = self.topology.data_source.group, 0
        while True:
            received = [None]
            dist.broadcast_object_list(received, src=0, group=group)
            plan = received[0]
            if plan is None:
                return forwards
            moved = {key: None if value is None else value.to(self.device) for key, value in plan.items()}
            logits = self.model(moved["tokens"], moved["positions"], self.cache, moved["slots"],
                                logits_at=moved["logits_at"])  # (B, T or 1, V/tp)
            self.model.layers.gather_logits(logits)  # rank 0 keeps the gathered (B, T, V)
            forwards += 1


class TPGroup:
    """Rank 0's side: the workers, the world, and rank 0's GPT with the plan hook installed."""

    def __init__(self, folder: str | Path, size: int, slots: int, context: int | None, device: str, num_cpus: float,
                 num_gpus: float):
        if size < 2:
            raise ValueError(f"deployment.tensor_parallel: a TP group needs 2 or more ranks, got {size}")
        address = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        threads = max(1, int(num_cpus))
        group = get_current_placement_group()
        self.workers = [
            TPRank.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=None if group is None else
                           PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)).remote(
                str(folder), address, rank, size, slots, context, device, threads)
            for rank in range(1, size)]
        self.topology = join_world(address, 0, size, device)
        self.model = load_rank(str(folder), self.topology, device)
        self.pids = [os.getpid()] + ray.get([worker.ping.remote() for worker in self.workers])  # every shard loaded
        self.following = [worker.follow.remote() for worker in self.workers]
        self.sender = PlanSender(self.topology.data_source.group)
        self.model.register_forward_pre_hook(self.sender, with_kwargs=True)

    @property
    def size(self) -> int:
        return self.topology.layout.tp

    async def alive_ranks(self) -> int:
        """Ranks that answer a ping and still follow rank 0 (rank 0 included): fewer than ``size`` means
        the group is broken (the replica's health check)."""
        ended, _ = ray.wait(self.following, num_returns=len(self.following), timeout=0)
        pings = await asyncio.gather(*(asyncio.wait_for(worker.ping.remote(), PING_TIMEOUT_S)
                                       for worker in self.workers), return_exceptions=True)
        return 1 + sum(not isinstance(ping, BaseException) and loop not in ended
                       for ping, loop in zip(pings, self.following))

    def close(self) -> None:
        """End the workers' loops (they return the forwards they ran) and leave the world."""
        self.sender.stop()
        ray.get(self.following)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
