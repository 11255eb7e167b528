"""Export trained models to formats other tools load (Hugging Face folders)."""

from raytron.export.huggingface import export_huggingface, load_huggingface

__all__ = ["export_huggingface", "load_huggingface"]
