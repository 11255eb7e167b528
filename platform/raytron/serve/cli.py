"""``raytron serve CONFIG``: deploy the serve config's app on Ray and block until Ctrl-C.
``raytron generate CONFIG``: offline completions on Ray Data (serve/batch_generate.py).
``raytron eval CONFIG``: perplexity, multiple choice, BLEU/ROUGE-L to MLflow (serve/evaluate.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def connect(num_cpus_needed: float) -> None:
    """Join $RAY_ADDRESS, else a running local cluster, else start one with enough logical CPUs.
    Replicas on a cluster that did not start here get the raytron package as a py_modules runtime env."""
    import ray

    runtime_env = {"py_modules": [str(PACKAGE_DIR)]}
    if "RAY_ADDRESS" in os.environ:
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
        return
    try:
        ray.init(address="auto", runtime_env=runtime_env)
    except ConnectionError:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(num_cpus_needed) + 1), dashboard_host="127.0.0.1")


def run_serve(args: argparse.Namespace) -> int:
    # imported here: Ray and torch take seconds to import and other subcommands need neither
    from ray import serve

    from raytron.serve.app import pinned_to_this_machine, run_app
    from raytron.serve.model_source import ModelSourceError, check_source
    from raytron.serve.settings import load_serve_config

    cfg = load_serve_config(args.config, args.overrides)
    pinned = pinned_to_this_machine(cfg)
    try:  # before Ray starts: a missing model is one line in seconds
        check_source(pinned.model.source, pinned.model.tracking_uri)
    except ModelSourceError as error:
        print(f"raytron serve: {error}", file=sys.stderr)
        return 1
    deployment = cfg.deployment
    replicas = deployment.num_replicas or (deployment.autoscaling_config.max_replicas
                                           if deployment.autoscaling_config else 1)
    connect(replicas * deployment.ray_actor_options.num_cpus)
    try:
        url = run_app(cfg)
    except (ModelSourceError, RuntimeError) as error:  # run_app has removed the app it tried to deploy
        print(f"raytron serve: {error}", file=sys.stderr)
        return 1
    key = ' -H "Authorization: Bearer $RAYTRON_API_KEY"' if cfg.http.api_key else ""
    print(f"serving {cfg.model.name} at {url}/v1 (Ctrl-C stops)\n"
          f"  curl {url}/v1/completions -H 'Content-Type: application/json'{key} "
          f"-d '{{\"model\": \"{cfg.model.name}\", \"prompt\": \"Return the\", \"max_tokens\": 16}}'", flush=True)
    # `ray job stop` sends SIGTERM: remove the app then too, or it keeps serving (Serve apps outlive
    # the driver that deployed them)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.delete(cfg.app_name)
    return 0


def add_config_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("config", help=what)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one field, value parsed as YAML; repeatable")


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server on Ray Serve (blocks; prints the URL)")
    add_config_arguments(parser, "serve YAML (see jobs/configs/serve/)")
    parser.set_defaults(run=run_serve)


def with_checked_source(cfg, command: str):
    """``cfg`` with ``model.source`` made absolute (Ray workers run elsewhere), checked before Ray
    starts: a missing model is one line on stderr in seconds, and None comes back."""
    from raytron.serve.model_source import MODEL_URI_PREFIX, ModelSourceError, check_source

    source = cfg.model.source if cfg.model.source.startswith(MODEL_URI_PREFIX) else str(Path(cfg.model.source).resolve())
    try:
        check_source(source, cfg.model.tracking_uri)
    except ModelSourceError as error:
        print(f"raytron {command}: {error}", file=sys.stderr)
        return None
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": source})})


def run_generate(args: argparse.Namespace) -> int:
    from raytron.serve.batch_generate import load_generate_config, run_generate as generate

    cfg = with_checked_source(load_generate_config(args.config, args.overrides), "generate")
    if cfg is None:
        return 1
    from raytron.data.records import BadRecordError
    from raytron.serve.table import format_table

    connect(cfg.actors * cfg.num_cpus_per_actor)
    try:
        summary = generate(cfg)
    except BadRecordError as error:
        print(f"raytron generate: {error}", file=sys.stderr)
        return 1
    print(format_table(summary, ["input", "records", "bad", "tokens", "seconds", "max_batch_size", "status"]))
    return 0


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="completions for JSONL/Parquet prompts on Ray Data (resumable)")
    add_config_arguments(parser, "generate YAML (model, input, output, request, limits, actors)")
    parser.set_defaults(run=run_generate)


def run_eval(args: argparse.Namespace) -> int:
    from raytron.serve.evaluate import load_eval_config, run_eval as evaluate

    cfg = with_checked_source(load_eval_config(args.config, args.overrides), "eval")
    if cfg is None:
        return 1
    from raytron.serve.table import format_table

    connect(cfg.actors * cfg.num_cpus_per_actor)
    metrics, run_id = evaluate(cfg)
    print(format_table([{"metric": name, "value": value} for name, value in metrics.items()], ["metric", "value"]))
    print(f"MLflow run {run_id} (experiment {cfg.experiment})")
    return 0


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="perplexity, multiple-choice accuracy, BLEU/ROUGE-L of a model")
    add_config_arguments(parser, "eval YAML (model, corpus, multiple_choice, references)")
    parser.set_defaults(run=run_eval)
