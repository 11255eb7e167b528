"""One tensor-parallel rank's shard of a served model, read without the whole model in one process.

- A training checkpoint (``meta.json``) of any (pp, tp): each pipeline stage's files are opened and,
  tensor by tensor, this rank's slice is taken. When the checkpoint's tp equals the replica's, a
  rank reads only its own file; otherwise one full tensor at a time is rebuilt from the trained
  shards and re-cut (peak memory: the rank's shard plus the largest single tensor).
- A Hugging Face folder (exported by raytron, or any supported one): each rank reads its rows with
  safetensors' ``get_slice`` (``parallel/hf_load.py``).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from raytron.config import build_config
from raytron.model.gpt import GPT
from raytron.parallel.hf_import import load_huggingface_model
from raytron.parallel.sharding import shard_of, unshard
from raytron.parallel.tensor_parallel import TensorParallelLayers
from raytron.train.checkpoint import META_FILE, CheckpointMeta, shard_file


class ShardLoadError(ValueError):
    pass


def load_tp_shard(folder: str | Path, layers: TensorParallelLayers) -> GPT:
    """This rank's part (``layers.group.rank`` of ``layers.tp_size``) of the model in ``folder``, in eval mode."""
    folder = Path(folder)
    if (folder / META_FILE).is_file():
        return _from_checkpoint(folder, layers)
    return load_huggingface_model(folder, layers=layers, tp_rank=layers.group.rank)


@torch.no_grad()
def _from_checkpoint(folder: Path, layers: TensorParallelLayers) -> GPT:
    meta = CheckpointMeta.read(folder)
    config = build_config(meta.config, f"{folder}/{META_FILE}")
    trained_pp, trained_tp = config.parallel.pp, config.parallel.tp
    if meta.padded_vocab_size % layers.tp_size:
        raise ShardLoadError(f"{folder}: padded vocabulary {meta.padded_vocab_size} does not split over "
                             f"tensor_parallel {layers.tp_size}")
    model = GPT(config.model, layers, padded_vocab=meta.padded_vocab_size)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    rank, size = layers.group.rank, layers.tp_size
    for pp_index in range(trained_pp):
        with ExitStack() as stack:
            files = [folder / shard_file(pp_index, t) for t in range(trained_tp)]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ShardLoadError(f"{folder}: missing shard file(s) {', '.join(missing)} (trained with "
                                     f"pp={trained_pp}, tp={trained_tp})")
            readers = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
            splits = json.loads((readers[0].metadata() or {}).get("tp_split", "{}"))
            for name in readers[0].keys():
                if name in loaded:  # a tied embedding lives on the first and the last stage
                    continue
                if name not in params:
                    raise ShardLoadError(f"{files[0]}: {name} is not a parameter of the model")
                param = params[name]
                if name not in splits:  # replicated on every trained TP rank
                    source = readers[0].get_tensor(name)
                elif trained_tp == size:
                    source = readers[rank].get_tensor(name)
                else:
                    full = unshard([reader.get_tensor(name) for reader in readers], tuple(splits[name]))
                    source = shard_of(full, tuple(splits[name]), rank, size)
                if source.shape != param.shape:
                    raise ShardLoadError(f"{files[0]}: {name} gives a shard of shape {tuple(source.shape)} at "
                                         f"tensor_parallel {size}; the model expects {tuple(param.shape)}")
                param.copy_(source)
                loaded.add(name)
    absent = sorted(set(params) - loaded)
    if absent:
        raise ShardLoadError(f"{folder}: the checkpoint's model files lack {', '.join(absent)}")
    return model.eval()
