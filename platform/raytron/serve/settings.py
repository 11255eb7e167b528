"""The serving config: one strict YAML per deployment, separate from the training run's config.

Unknown keys, wrong types and impossible combinations fail at load time naming the dotted
field (``ConfigError``, as ``raytron.config`` does for training runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PositiveInt, ValidationError

from raytron.config import ConfigError, Section, read_yaml_mapping


class ModelSource(Section):
    source: str
    """Where the weights and tokenizer come from: models:/NAME/VERSION or models:/NAME@ALIAS (MLflow registry), a training checkpoint folder (holds meta.json) or an exported Hugging Face folder (holds config.json)."""
    name: str = "raytron"
    """Model name clients send and GET /v1/models lists; other names answer 404."""
    tracking_uri: str | None = None
    """MLflow tracking URI for models:/ sources; default $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db."""


class Limits(Section):
    max_batch_size: PositiveInt = 16
    """Sequences decoded together per step (KV-cache slots per replica)."""
    max_tokens_in_flight: PositiveInt = 8192
    """Sum over running sequences of prompt + max_tokens; a request waits until it fits."""
    max_tokens: PositiveInt = 256
    """Largest max_tokens a request may ask for."""
    context: PositiveInt | None = None
    """Context window (prompt + completion); default and upper bound the model's max_position_embeddings."""
    max_request_bytes: PositiveInt = 1_000_000
    """Larger request bodies answer 413."""


class SamplingDefaults(Section):
    max_tokens: PositiveInt = 16
    """max_tokens of a request that gives none (OpenAI's completions default)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    """Temperature of a request that gives none; 0 is greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """top_p of a request that gives none."""
    top_k: int = Field(0, ge=0)
    """top_k of a request that gives none; 0 keeps every token."""


class Autoscaling(Section):
    min_replicas: int = Field(1, ge=0)
    """Fewest replicas."""
    max_replicas: PositiveInt = 1
    """Most replicas."""
    target_ongoing_requests: float = Field(8.0, gt=0.0)
    """Ongoing requests per replica the autoscaler aims at."""
    upscale_delay_s: float = Field(30.0, ge=0.0)
    """How long the load must call for more replicas before Serve adds them."""
    downscale_delay_s: float = Field(600.0, ge=0.0)
    """How long the load must call for fewer replicas before Serve removes them."""
    metrics_interval_s: float = Field(10.0, gt=0.0)
    """How often each replica reports its ongoing requests to the autoscaler."""
    look_back_period_s: float = Field(30.0, gt=0.0)
    """The window the autoscaler averages those reports over."""


class ActorOptions(Section):
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs per replica (also its torch threads)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per replica; > 0 runs the model on cuda."""


class Deployment(Section):
    num_replicas: PositiveInt | None = None
    """Fixed replica count; leave unset with autoscaling_config (default 1 replica)."""
    autoscaling_config: Autoscaling | None = None
    """Scale replicas between min and max on ongoing requests."""
    ray_actor_options: ActorOptions = ActorOptions()
    """Resources per replica."""
    max_ongoing_requests: PositiveInt = 64
    """Requests a replica accepts at once (running + waiting for a slot); Serve queues the rest."""
    tensor_parallel: PositiveInt = 1
    """Ranks per replica: > 1 splits the model Megatron-style over that many processes packed on one node
    (a placement group of one ray_actor_options bundle per rank: the replica is rank 0)."""
    health_check_period_s: float = Field(10.0, gt=0.0)
    """How often Serve checks each replica (with tensor_parallel > 1: that every rank is alive)."""


class Http(Section):
    host: str = "127.0.0.1"
    """Address the Serve proxy binds; 0.0.0.0 exposes the server beyond this machine."""
    port: int = Field(8000, ge=0, le=65535)
    """Port of the Serve proxy (one per Ray cluster: every Serve app shares it)."""
    route_prefix: str = "/"
    """Path the app is mounted at."""
    api_key: str | None = None
    """When set, every route but /health needs `Authorization: Bearer <api_key>` (401 otherwise)."""
    stream_interval_s: float = Field(0.2, ge=0.0)
    """A stream sends a request's new text at most this often; what is generated meanwhile goes out
    together as one chunk (the first text and the end go at once). Every chunk costs CPU in the
    replica, the Serve proxy and the client; 0 sends each step's text as it comes."""


class ServeConfig(Section):
    app_name: str = "raytron"
    """Serve application name (serve status, serve shutdown)."""
    model: ModelSource
    """What to serve."""
    limits: Limits = Limits()
    """Batching and request limits."""
    sampling: SamplingDefaults = SamplingDefaults()
    """Defaults for parameters a request leaves out."""
    deployment: Deployment = Deployment()
    """Ray Serve deployment options."""
    http: Http = Http()
    """Where the server listens, and its API key."""


def _cross_field_problems(cfg: ServeConfig) -> list[str]:
    problems = []
    deployment, limits = cfg.deployment, cfg.limits
    if deployment.num_replicas is not None and deployment.autoscaling_config is not None:
        problems.append("deployment.num_replicas: set either num_replicas or autoscaling_config, not both")
    scaling = deployment.autoscaling_config
    if scaling is not None and scaling.min_replicas > scaling.max_replicas:
        problems.append(f"deployment.autoscaling_config.min_replicas: {scaling.min_replicas} exceeds "
                        f"max_replicas {scaling.max_replicas}")
    if cfg.sampling.max_tokens > limits.max_tokens:
        problems.append(f"sampling.max_tokens: default {cfg.sampling.max_tokens} exceeds limits.max_tokens "
                        f"{limits.max_tokens}")
    if limits.context is not None and limits.max_tokens >= limits.context:
        problems.append(f"limits.max_tokens: {limits.max_tokens} leaves no room for a prompt in limits.context "
                        f"{limits.context}")
    actor = deployment.ray_actor_options
    if deployment.tensor_parallel > 1 and actor.num_cpus == 0 and actor.num_gpus == 0:
        problems.append("deployment.ray_actor_options: with tensor_parallel > 1 each rank's bundle needs num_cpus "
                        "or num_gpus > 0")
    if deployment.tensor_parallel > 1 and 0 < actor.num_gpus < 1:
        problems.append(f"deployment.ray_actor_options.num_gpus: {actor.num_gpus} with tensor_parallel "
                        f"{deployment.tensor_parallel}; each rank needs a whole GPU (nccl) or none (gloo on CPU)")
    if not cfg.http.route_prefix.startswith("/"):
        problems.append(f"http.route_prefix: must start with '/', got {cfg.http.route_prefix!r}")
    return problems


def serve_resources(cfg: ServeConfig) -> dict[str, Any]:
    """What a serve config occupies (``raytron info``): per replica tensor_parallel bundles of
    ray_actor_options, times the most replicas it may run."""
    deployment = cfg.deployment
    tp, actor = deployment.tensor_parallel, deployment.ray_actor_options
    scaling = deployment.autoscaling_config
    replicas = scaling.max_replicas if scaling is not None else deployment.num_replicas or 1
    return {"tensor_parallel": tp, "max_replicas": replicas, "processes_per_replica": tp,
            "cpus_per_replica": tp * actor.num_cpus, "gpus_per_replica": tp * actor.num_gpus,
            "devices": replicas * tp, "cpus": replicas * tp * actor.num_cpus,
            "gpus": replicas * tp * actor.num_gpus}


def _validation_problems(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        detail = f"got {item.get('input')!r}"
        if item["type"] == "extra_forbidden":
            detail = f"allowed: {', '.join(_section_at(item['loc'][:-1]).model_fields)}"
        lines.append(f"{path}: {item['msg']} ({detail})")
    return lines


def _section_at(loc: tuple) -> type[BaseModel]:
    section: type[BaseModel] = ServeConfig
    for part in loc:
        annotation = section.model_fields[part].annotation
        # optional sections (autoscaling_config) are `X | None`: step into X
        inner = [arg for arg in getattr(annotation, "__args__", (annotation,)) if isinstance(arg, type)]
        section = next(arg for arg in inner if issubclass(arg, BaseModel))
    return section


def build_serve_config(raw: dict[str, Any], source: str = "<dict>") -> ServeConfig:
    """Validate a raw mapping; raise ConfigError naming every bad field."""
    try:
        cfg = ServeConfig.model_validate(raw)
    except ValidationError as error:
        problems = _validation_problems(error)
    else:
        problems = _cross_field_problems(cfg)
        if not problems:
            return cfg
    raise ConfigError(f"invalid serve config {source}:\n" + "\n".join(f"  - {line}" for line in problems))


def load_serve_config(path: str | Path, overrides: list[str] = ()) -> ServeConfig:
    """Load a serve YAML and apply ``--set a.b=c`` overrides (values parsed as YAML)."""
    raw = read_yaml_mapping(path, "serve config", overrides)
    return build_serve_config(raw, str(path))


def load_section(section: type[BaseModel], path: str | Path, kind: str, overrides: list[str] = ()) -> Any:
    """Load a YAML into one config class (generate, eval); ConfigError naming every bad field."""
    try:
        return section.model_validate(read_yaml_mapping(path, kind, overrides))
    except ValidationError as error:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in error.errors()]
        raise ConfigError(f"invalid {kind} {path}:\n" + "\n".join(f"  - {line}" for line in lines)) from None
