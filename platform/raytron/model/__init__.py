"""Single-device model code: the GPT, its KV cache, generation and FLOPs. No torch.distributed here."""

from raytron.model.gpt import GPT
from raytron.model.layer_factory import LayerFactory, SerialLayers

__all__ = ["GPT", "LayerFactory", "SerialLayers"]
