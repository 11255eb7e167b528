"""One MLflow run per training run, and exported Hugging Face folders in the MLflow registry.

``RunTracker`` owns one run: params are the flattened config, tags the git commit and the
config hash, metrics come per step. Every call it makes is guarded — a failure is logged
(a warning the first time per kind of call) and counted in ``errors``, never raised —
because losing a chart is better than losing a training run. It uses ``MlflowClient``
with explicit run ids, so several trackers can live in one process (Tune trials).

The registry helpers do raise: an export that did not reach the registry must say so.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import mlflow
import pydantic
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from raytron.config import RaytronConfig, TrackingConfig

log = logging.getLogger(__name__)

GIT_COMMIT_TAG = "mlflow.source.git.commit"
"""MLflow's own tag for the source commit: the UI shows it on the run page."""
CONFIG_HASH_TAG = "raytron.config_hash"
RUN_ID_TAG = "raytron.run_id"
DATA_MANIFEST_TAG = "raytron.data_manifest_hash"
HF_ARTIFACT_KEY = "hf_model"
"""Key of the Hugging Face folder among the pyfunc model's artifacts."""
LOGGED_MODEL_NAME = "model"

# MLflow's defaults (7 retries with backoff, 120 s timeout) let a dead server stall a
# training step for minutes. One retry rides out a blip; connection refused fails at once.
# 10 s rather than less because an artifact PUT waits for the server to store the file.
FAST_FAILURE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

T = TypeVar("T")


def resolve_tracking_uri(tracking_cfg: TrackingConfig | None = None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else an embedded sqlite store under ./mlruns."""
    if tracking_cfg is not None and tracking_cfg.tracking_uri:
        return tracking_cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlruns' / 'mlflow.db'}"


def prepare_local_store(tracking_uri: str) -> str | None:
    """For a sqlite store: create its folder and return the artifact location beside it.

    Without one, MLflow would put artifacts in ./mlruns of whatever the cwd is at the time.
    Server URIs return None: the server decides where artifacts go.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix):]).resolve()
    database.parent.mkdir(parents=True, exist_ok=True)
    return (database.parent / "artifacts").as_uri()


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"hidden_size": 256}}`` -> ``{"model.hidden_size": "256"}`` (MLflow params are strings)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    # One over-long value makes MLflow reject the whole batch; a cut value still says something.
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD of the repository around ``cwd`` (default: the process's), or "unknown"."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, or hung
        return "unknown"
    return result.stdout.strip() or "unknown"


def prefer_fast_failures() -> None:
    """Apply FAST_FAILURE_ENV where the user has not set those variables."""
    for name, value in FAST_FAILURE_ENV.items():
        os.environ.setdefault(name, value)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


class RunTracker:
    """One MLflow run; every method is guarded (see the module docstring)."""

    def __init__(self, tracking_uri: str):
        prefer_fast_failures()
        self.tracking_uri = tracking_uri
        self.errors = 0
        """MLflow operations that failed or were skipped because the run never started."""
        self._warned: set[str] = set()
        self._run_id: str | None = None
        self._artifact_location = self._guard("connect", prepare_local_store, tracking_uri)
        self._client: MlflowClient | None = self._guard("connect", MlflowClient, tracking_uri)

    @classmethod
    def start(cls, cfg: RaytronConfig, run_id: str | None = None) -> RunTracker:
        """Start a run named ``cfg.name``, or resume ``run_id``: a training run restarted after a
        failure continues the same MLflow run."""
        tracker = cls(resolve_tracking_uri(cfg.tracking))
        tracker._guard("start", tracker._open, cfg, run_id)
        return tracker

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> RunTracker:
        """Log into a run someone else started (a Train worker logging the driver's run)."""
        tracker = cls(tracking_uri)
        tracker._run_id = run_id
        return tracker

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None when starting the run failed."""
        return self._run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_metric_steps([(metrics, step, int(time.time() * 1000))])

    def log_metric_steps(self, steps: list[tuple[Mapping[str, float], int, int]]) -> None:
        """Several steps' metrics in as few requests as MLflow allows: (metrics, step, epoch ms when the
        step ended), so batched steps keep their own times in MLflow's charts."""
        self._guard("log_metrics", self._log_metrics, steps)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifacts", lambda: self._client.log_artifacts(self._require_run(), str(local_dir),
                                                                        artifact_path))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact of the run (e.g. the placement of its ranks)."""
        self._guard("log_dict", lambda: self._client.log_dict(self._require_run(), dict(data), artifact_file))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._guard("set_tags", self._set_tags, tags)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED."""
        self._guard("finish", lambda: self._client.set_terminated(self._require_run(), status))

    def _guard(self, kind: str, call: Callable[..., T], *args: Any) -> T | None:
        try:
            return call(*args)
        except Exception as error:  # whatever tracking does wrong, training goes on
            self.errors += 1
            level = logging.DEBUG if kind in self._warned else logging.WARNING
            self._warned.add(kind)
            log.log(level, "MLflow %s failed (%d MLflow errors so far; training continues): %s",
                    kind, self.errors, error)
            return None

    def _require_run(self) -> str:
        if self._client is None or self._run_id is None:
            raise RuntimeError(f"no MLflow run at {self.tracking_uri}: starting it failed earlier")
        return self._run_id

    def _open(self, cfg: RaytronConfig, run_id: str | None) -> None:
        if self._client is None:
            raise RuntimeError(f"no MLflow client for {self.tracking_uri}")
        tags = {GIT_COMMIT_TAG: git_commit(), CONFIG_HASH_TAG: cfg.digest()}
        if run_id is None:
            experiment_id = self._experiment_id(cfg.tracking.experiment)
            self._run_id = self._client.create_run(experiment_id, run_name=cfg.name, tags=tags).info.run_id
            logged: Mapping[str, str] = {}
        else:
            logged = self._client.get_run(run_id).data.params
            self._client.update_run(run_id, status="RUNNING")
            self._run_id = run_id
            self._set_tags(tags)
        self._guard("log_params", self._log_params, flatten_config(cfg.to_dict()), logged)

    def _experiment_id(self, name: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name, artifact_location=self._artifact_location)
            except MlflowException as error:  # a concurrent run (a Tune trial) created it first
                if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                experiment = self._client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":  # deleted in the UI: its name stays taken
            self._client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _log_params(self, params: Mapping[str, str], logged: Mapping[str, str]) -> None:
        # Params are immutable in MLflow: a resumed run logs only what is new.
        changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
        if changed:
            log.warning("config changed since this MLflow run started; params keep their first values: %s",
                        ", ".join(changed))
        entries = [Param(key, value) for key, value in params.items() if key not in logged]
        for batch in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._require_run(), params=batch)

    def _log_metrics(self, steps: list[tuple[Mapping[str, float], int, int]]) -> None:
        run_id = self._require_run()
        entries = [Metric(key, float(value), time_ms, step)
                   for metrics, step, time_ms in steps for key, value in metrics.items()]
        for batch in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=batch)

    def _set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for batch in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._require_run(), tags=batch)


class CompletionRequest(pydantic.BaseModel):
    """One prompt for ``HuggingFaceFolderModel.predict``."""

    prompt: str
    max_new_tokens: int = 32


class HuggingFaceFolderModel(mlflow.pyfunc.PythonModel):
    """pyfunc face of an exported Hugging Face folder: greedy completion of text prompts.

    Serving reads the folder itself (``download_model_folder``); this makes a registered
    version usable from MLflow's own tools too: ``predict([{"prompt": "...", "max_new_tokens": 8}])``.
    MLflow derives the signature from the type hints. Loading needs raytron importable, as
    the class is pickled by reference.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.folder = context.artifacts[HF_ARTIFACT_KEY]
        self._loaded = None

    def predict(self, model_input: list[CompletionRequest], params: dict[str, Any] | None = None) -> list[str]:
        model, tokenizer = self._model_and_tokenizer()
        completions = []
        for request in model_input:
            encoded = tokenizer(request.prompt, return_tensors="pt")
            output = model.generate(**encoded, max_new_tokens=request.max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
            completions.append(tokenizer.decode(output[0, encoded.input_ids.shape[1]:], skip_special_tokens=True))
        return completions

    def _model_and_tokenizer(self):
        if self._loaded is None:
            # Imported here: transformers takes seconds to import and only prediction needs it.
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._loaded = (AutoModelForCausalLM.from_pretrained(self.folder).eval(),
                            AutoTokenizer.from_pretrained(self.folder))
        return self._loaded


def _pip_requirements() -> list[str]:
    # Given explicitly: inferring them loads the model in a subprocess, which takes seconds.
    packages = ["mlflow", "torch", "transformers", "tokenizers", "safetensors"]
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in packages]


def register_model_version(tracker_or_run_id: RunTracker | str, folder: str | Path, name: str,
                           tags: Mapping[str, str] | None = None,
                           tracking_cfg: TrackingConfig | None = None) -> ModelVersion:
    """Log an exported Hugging Face ``folder`` to the run as an MLflow model and register it as a
    new version of ``name``, tagged with the run id, the run's config hash and ``tags`` (which win;
    pass DATA_MANIFEST_TAG there). ``tracking_cfg`` locates the server when given a bare run id."""
    if isinstance(tracker_or_run_id, RunTracker):
        run_id, tracking_uri = tracker_or_run_id.run_id, tracker_or_run_id.tracking_uri
        if run_id is None:
            raise RuntimeError(f"cannot register {name}: the MLflow run at {tracking_uri} never started")
    else:
        run_id, tracking_uri = tracker_or_run_id, resolve_tracking_uri(tracking_cfg)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # The steps of mlflow.pyfunc.log_model, done with this client: log_model itself reads the
    # global tracking URI and active run (and does not take a run id).
    logged = client.create_logged_model(run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / LOGGED_MODEL_NAME
        mlflow.pyfunc.save_model(
            local, python_model=HuggingFaceFolderModel(), artifacts={HF_ARTIFACT_KEY: str(folder)},
            mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                               model_uuid=logged.model_id, model_id=logged.model_id),
            pip_requirements=_pip_requirements())
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    _ensure_registered_model(client, name)
    version_tags = {RUN_ID_TAG: run_id, **_lineage_tags(run.data.tags), **(tags or {})}
    # The source is the artifact location, not "models:/<model_id>": a sqlite registry resolves
    # that URI through the process-global tracking URI (an MLflow TODO), not this client's.
    return client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                       tags=version_tags, model_id=logged.model_id)


def _lineage_tags(run_tags: Mapping[str, str]) -> dict[str, str]:
    return {key: run_tags[key] for key in (CONFIG_HASH_TAG, GIT_COMMIT_TAG) if key in run_tags}


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def set_alias(name: str, alias: str, version: str | int, tracking_cfg: TrackingConfig | None = None) -> None:
    """Point ``models:/NAME@ALIAS`` at ``version`` (e.g. promote a version to "production")."""
    MlflowClient(resolve_tracking_uri(tracking_cfg)).set_registered_model_alias(name, alias, str(version))


def download_model_folder(model_uri: str, dst: str | Path | None = None,
                          tracking_cfg: TrackingConfig | None = None) -> Path:
    """Fetch ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` and return its Hugging Face folder."""
    tracking_uri = resolve_tracking_uri(tracking_cfg)
    client = MlflowClient(tracking_uri)
    # Resolved with this client: mlflow.artifacts.download_artifacts ignores its registry_uri for
    # models:/ URIs and asks the process-global registry.
    version = _model_version(client, model_uri)
    location = client.get_model_version_download_uri(version.name, version.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=None if dst is None else str(dst),
                                                tracking_uri=tracking_uri)
    artifacts = Model.load(local).flavors["python_function"]["artifacts"]
    return Path(local) / artifacts[HF_ARTIFACT_KEY]["path"]


def find_model_version(model_uri: str, tracking_cfg: TrackingConfig | None = None) -> ModelVersion:
    """The registered version ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names, without
    downloading it (MlflowException when the registry holds no such model, alias or version)."""
    return _model_version(MlflowClient(resolve_tracking_uri(tracking_cfg)), model_uri)


def _model_version(client: MlflowClient, model_uri: str) -> ModelVersion:
    prefix = "models:/"
    reference = model_uri[len(prefix):] if model_uri.startswith(prefix) else ""
    name, at, alias = reference.partition("@")
    if at and name and alias:
        return client.get_model_version_by_alias(name, alias)
    name, slash, version = reference.rpartition("/")
    if not (slash and name and version.isdigit()):
        raise ValueError(f"{model_uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return client.get_model_version(name, version)
