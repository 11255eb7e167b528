"""Typed, strict run configuration: one class per component, loaded from YAML.

Unknown keys, wrong types and impossible combinations fail at load time with the
dotted path of the offending field and what is allowed (``ConfigError``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, PositiveInt, ValidationError, field_validator

from raytron.config_base import ConfigError, Section, apply_override, read_yaml_mapping, section_schema_rows
from raytron.data_config import DataConfig
from raytron.tune_config import TuneConfig

VOCAB_PAD_MULTIPLE = 128


class RopeScaling(Section):
    """Hugging Face's rope_scaling / rope_parameters: stretch RoPE's wavelengths for longer contexts."""

    type: Literal["linear", "llama3"]
    """'linear' divides every frequency by factor; 'llama3' only the long wavelengths, smoothly (Llama 3.1)."""
    factor: float = Field(gt=0.0)
    """How much longer the context becomes."""
    low_freq_factor: float = Field(1.0, gt=0.0)
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled."""
    high_freq_factor: float = Field(4.0, gt=0.0)
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: PositiveInt = 8192
    """llama3: the context the model was pretrained with."""


class ModelConfig(Section):
    flavour: Literal["gpt", "llama"] = "gpt"
    """Architecture: 'gpt' (MT-NLG/GPT-3: learned positions, LayerNorm, GELU, biases, tied head) or 'llama' (RoPE, RMSNorm, SwiGLU, no biases, untied head)."""
    vocab_size: PositiveInt = 8192
    """Tokenizer vocabulary size; the embedding is padded to a multiple of 128 x parallel.tp."""
    hidden_size: PositiveInt = 256
    """Width of the residual stream."""
    num_layers: PositiveInt = 4
    """Number of transformer blocks."""
    num_heads: PositiveInt = 4
    """Attention heads per block; must divide hidden_size."""
    ffn_hidden_size: PositiveInt | None = None
    """MLP inner width; default 4 x hidden (gpt) or 8/3 x hidden rounded up to 64 (llama)."""
    max_position_embeddings: PositiveInt = 1024
    """Longest sequence the model supports (size of the position table / RoPE range)."""
    hidden_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings and block outputs (training only)."""
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention probabilities (training only)."""
    norm_epsilon: float = Field(1e-5, gt=0.0)
    """Epsilon of LayerNorm / RMSNorm."""
    init_std: float = Field(0.02, gt=0.0)
    """Std of the normal init; output projections use init_std / sqrt(2 x num_layers)."""
    rope_theta: float = Field(10000.0, gt=0.0)
    """RoPE base frequency (llama only)."""
    num_kv_heads: PositiveInt | None = None
    """Key/value heads (grouped-query attention); default num_heads. Must divide num_heads; parallel.tp must divide it."""
    head_size: PositiveInt | None = None
    """Width of one attention head (Hugging Face's head_dim); default hidden_size / num_heads."""
    qkv_bias: bool = False
    """Biases on the q, k, v projections only (Qwen2; llama only: gpt has every bias)."""
    tie_embeddings: bool | None = None
    """Output projection shares the token embedding; default: tied for gpt, untied for llama."""
    rope_scaling: RopeScaling | None = None
    """RoPE frequency scaling for longer contexts (llama only); none by default."""
    hf_architecture: Literal["GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"] | None = None
    """Hugging Face class export writes (init_from sets it); default GPT2LMHeadModel (gpt), LlamaForCausalLM or Qwen2ForCausalLM (llama with qkv_bias)."""
    init_from: str | None = None
    """Start from these weights (no random init): a Hugging Face folder (config.json + safetensors), an s3:// prefix of one (fetched once per node), models:/NAME/VERSION or models:/NAME@ALIAS, or a raytron checkpoint (weights only); model.* come from its config."""

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.flavour == "gpt":
            return 4 * self.hidden_size
        return _round_up(8 * self.hidden_size // 3, 64)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows of q, k and v in the fused qkv projection (GQA: k and v are smaller)."""
        return self.num_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim

    @property
    def tied(self) -> bool:
        return self.flavour == "gpt" if self.tie_embeddings is None else self.tie_embeddings

    def padded_vocab(self, tp: int) -> int:
        """Vocab rounded up so each TP shard is a multiple of 128 rows (Megatron's rule)."""
        return _round_up(self.vocab_size, VOCAB_PAD_MULTIPLE * tp)


class ParallelConfig(Section):
    dp: PositiveInt = 1
    """Data-parallel degree (ZeRO shards optimizer state across it)."""
    pp: PositiveInt = 1
    """Pipeline-parallel degree; must divide model.num_layers."""
    tp: PositiveInt = 1
    """Tensor-parallel degree; must divide model.num_heads."""
    zero_stage: int = Field(1, ge=0, le=3)
    """DeepSpeed ZeRO stage (0-3); with pp > 1 only 0 or 1."""


class ResourcesConfig(Section):
    num_workers: PositiveInt | None = None
    """Ray Train workers; default dp x pp x tp, and if given it must equal that product."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per worker."""
    gpus_per_worker: float = Field(0.0, ge=0.0)
    """GPUs per worker; 0 trains on CPU with gloo, > 0 on GPU with nccl."""
    custom: dict[str, Annotated[float, Field(gt=0.0)]] = {}
    """Custom Ray resources per worker ({name: amount}), e.g. to steer workers to a node type that offers them."""
    accelerator_type: str | None = None
    """Ray accelerator type every worker needs (e.g. A100, H100): workers go only to nodes of that type."""
    memory_per_worker_gb: float | None = Field(None, gt=0.0)
    """Memory (GB) a worker has for its model state (one GPU's memory; a CPU worker's RAM). A run whose per-rank weights + grads + optimizer estimate (`raytron info`) exceeds it fails before it starts; a layout sweep leaves such layouts out. A bound, not a Ray reservation."""

    @field_validator("custom")
    @classmethod
    def _no_builtin_names(cls, custom: dict[str, float]) -> dict[str, float]:
        # CPU and GPU have fields of their own; a second way to set them would be ambiguous
        builtin = sorted(set(custom) & {"CPU", "GPU", "memory", "object_store_memory"})
        if builtin:
            raise ValueError(f"{builtin} are not custom resources: use cpus_per_worker / gpus_per_worker")
        return custom


class TrainConfig(Section):
    seq_len: PositiveInt = 128
    """Tokens per training sequence; at most model.max_position_embeddings."""
    micro_batch_size: PositiveInt = 4
    """Sequences per micro-batch per data-parallel rank."""
    grad_accum_steps: PositiveInt = 1
    """Micro-batches per optimizer step (pipeline micro-batches when pp > 1)."""
    steps: PositiveInt = 100
    """Optimizer steps to run."""
    lr: float = Field(3e-4, gt=0.0)
    """Peak learning rate."""
    min_lr: float = Field(3e-5, ge=0.0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(10, ge=0)
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Global gradient-norm clip; 0 disables."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 needs a GPU."""
    seed: int = 1234
    """Seed for init, dropout and data order."""
    log_every: PositiveInt = 10
    """Print/log metrics every N steps."""
    eval_every: int = Field(0, ge=0)
    """Validation every N steps; 0 disables."""
    checkpoint_every: int = Field(0, ge=0)
    """Checkpoint every N steps; 0 checkpoints only at the end."""
    keep_checkpoints: PositiveInt = 3
    """How many most recent checkpoints to keep."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    compile: bool = False
    """torch.compile the model through DeepSpeed's engine.compile (fuses elementwise work; pays off on GPU)."""
    threads: int = Field(0, ge=0)
    """torch intra-op threads per process; 0 keeps torch's default."""
    storage_path: str = "runs"
    """Where Ray Train keeps checkpoints: a local folder or s3://bucket/prefix."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train may do after a failure (-1: unlimited)."""
    export: bool = False
    """Export the final model to Hugging Face format and register it in MLflow."""
    data_ledger: str | None = None
    """Local folder where each DP reader appends the block ids it consumed per step (exactly-once audits)."""


class TrackingConfig(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite under ./mlruns."""
    experiment: str = "raytron"
    """MLflow experiment name."""
    registered_model_name: str = "raytron-gpt"
    """Model name in the MLflow registry for exports."""


class RaytronConfig(Section):
    """A whole run: model, parallel layout, resources, training, data, tracking."""

    name: str = "raytron"
    """Run name (used for MLflow runs and checkpoint folders)."""
    model: ModelConfig = ModelConfig()
    """The network."""
    parallel: ParallelConfig = ParallelConfig()
    """The (dp, pp, tp) layout."""
    resources: ResourcesConfig = ResourcesConfig()
    """Ray resources per worker."""
    train: TrainConfig = TrainConfig()
    """Optimisation and schedule."""
    data: DataConfig = DataConfig()
    """Corpus and tokenizer."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow."""
    deepspeed_overrides: dict[str, Any] = {}
    """Keys merged last into the derived DeepSpeed config (they win)."""
    tune: TuneConfig = TuneConfig()
    """Ray Tune sweep (`raytron tune`); ignored by `raytron train`."""

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.pp * self.parallel.tp

    @property
    def global_batch_size(self) -> int:
        """Blocks (sequences) per optimizer step: micro batch x grad accumulation x dp."""
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.parallel.dp

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab(self.parallel.tp)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Stable hash of the resolved config (MLflow tag, checkpoint metadata)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _cross_field_problems(cfg: RaytronConfig) -> list[str]:
    """Combinations that are each valid alone but cannot run together."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    problems = []
    if m.head_size is None and m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size: {m.hidden_size} must be divisible by model.num_heads ({m.num_heads})")
    if m.num_heads % p.tp:
        problems.append(f"model.num_heads: {m.num_heads} must be divisible by parallel.tp ({p.tp})")
    if m.num_heads % m.kv_heads:
        problems.append(f"model.num_kv_heads: {m.kv_heads} must divide model.num_heads ({m.num_heads})")
    elif m.kv_heads % p.tp:
        problems.append(f"model.num_kv_heads: {m.kv_heads} must be divisible by parallel.tp ({p.tp})")
    if m.flavour == "gpt" and (m.qkv_bias or m.rope_scaling is not None):
        problems.append("model.qkv_bias / model.rope_scaling: llama only (gpt has every bias and no RoPE)")
    if m.ffn_size % p.tp:
        problems.append(f"model.ffn_hidden_size: {m.ffn_size} must be divisible by parallel.tp ({p.tp})")
    if m.num_layers % p.pp:
        problems.append(f"model.num_layers: {m.num_layers} must be divisible by parallel.pp ({p.pp})")
    if m.flavour == "llama" and m.head_dim % 2:
        problems.append(f"model.head_size: head dim {m.head_dim} must be even for RoPE (flavour llama)")
    if t.seq_len > m.max_position_embeddings:
        problems.append(
            f"train.seq_len: {t.seq_len} exceeds model.max_position_embeddings ({m.max_position_embeddings})"
        )
    if p.pp > 1 and p.zero_stage > 1:
        problems.append(f"parallel.zero_stage: {p.zero_stage} is not supported with pipeline parallelism; use 0 or 1")
    workers = cfg.resources.num_workers
    if workers is not None and workers != cfg.world_size:
        problems.append(
            f"resources.num_workers: {workers} must equal parallel.dp x pp x tp "
            f"({p.dp} x {p.pp} x {p.tp} = {cfg.world_size})"
        )
    if t.min_lr > t.lr:
        problems.append(f"train.min_lr: {t.min_lr} must not exceed train.lr ({t.lr})")
    if t.precision == "fp16" and cfg.resources.gpus_per_worker == 0:
        problems.append("train.precision: fp16 needs a GPU (resources.gpus_per_worker > 0); use fp32 or bf16 on CPU")
    return problems


def _format_validation_error(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (allowed: {_allowed_keys(item['loc'])})")
        else:
            lines.append(f"{path}: {item['msg']} (got {item.get('input')!r})")
    return lines


def _allowed_keys(loc: tuple) -> str:
    section: type[BaseModel] = RaytronConfig
    parts = iter(loc[:-1])
    for part in parts:
        annotation = section.model_fields[part].annotation
        if get_origin(annotation) is dict:  # a mapping of sections (tune.search_space): skip the mapping's key
            annotation = get_args(annotation)[1]
            next(parts, None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        section = annotation
    return ", ".join(section.model_fields)


def build_config(raw: dict[str, Any], source: str = "<dict>") -> RaytronConfig:
    """Validate a raw mapping; raise ConfigError naming every bad field."""
    try:
        cfg = RaytronConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_report(source, _format_validation_error(error))) from None
    problems = _cross_field_problems(cfg)
    if problems:
        raise ConfigError(_report(source, problems))
    return cfg


def _report(source: str, lines: list[str]) -> str:
    return f"invalid config {source}:\n" + "\n".join(f"  - {line}" for line in lines)


def read_run_mapping(path: str | Path | None = None, overrides: list[str] = ()) -> tuple[dict[str, Any], str]:
    """The raw mapping of a YAML run file (or defaults when ``path`` is None) with ``--set`` overrides,
    and how errors should name it."""
    if path is None:
        raw: dict[str, Any] = {}
        for assignment in overrides:
            apply_override(raw, assignment)
        return raw, "<defaults>"
    return read_yaml_mapping(path, "config", overrides), str(path)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RaytronConfig:
    """Load a YAML run file (or defaults when ``path`` is None) and apply ``--set`` overrides."""
    return build_config(*read_run_mapping(path, overrides))


def schema_rows(section: type[BaseModel] = RaytronConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted path, type, default, doc) for every leaf field of the run config, depth first."""
    return section_schema_rows(section, prefix)
