"""Data: the built-in docstring corpus, the BPE tokenizer and sequence packing."""
