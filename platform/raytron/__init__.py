"""raytron: train, tune and serve Megatron-Turing-NLG-style GPT models on Ray."""

__version__ = "0.1.0"
