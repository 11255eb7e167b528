"""The ``raytron`` command: one root parser; each subcommand calls library code and prints.

To add a subcommand write ``add_<name>(subparsers)`` that builds its parser and sets
``run=<function(args) -> int | None>``, and list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import yaml

from raytron.config import ConfigError, RaytronConfig, build_config, read_run_mapping, schema_rows
from raytron.data.cli import add_prepare, add_tokenizer
from raytron.serve.cli import add_eval, add_generate, add_serve
from raytron.train.progress import PROGRESS_LINE_REGEX


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The run YAML and its ``--set`` overrides, shared by every subcommand that takes a run."""
    parser.add_argument("config", nargs="?", help="run YAML (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one field, value parsed as YAML; repeatable")


def load_run_config(args: argparse.Namespace) -> RaytronConfig:
    """The run config of ``add_config_arguments``; with model.init_from its model.* come from there."""
    raw, source = read_run_mapping(args.config, args.overrides)
    if (raw.get("model") or {}).get("init_from"):
        from raytron.parallel.hf_import import resolve_init_from  # imports torch: only when importing a model

        return resolve_init_from(raw, source)
    return build_config(raw, source)


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last column runs free."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)), row[-1])


def derived_values(cfg: RaytronConfig) -> dict[str, object]:
    return {"padded_vocab_size": cfg.padded_vocab_size, "world_size": cfg.world_size,
            "ffn_size": cfg.model.ffn_size, "config_digest": cfg.digest()}


def run_config(args: argparse.Namespace) -> None:
    if args.schema:
        print_table([("FIELD", "TYPE", "DEFAULT", "DOC"), *schema_rows()])
        return
    cfg = load_run_config(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    # Derived values go out as YAML comments so the output still loads as a config.
    print("# derived (not settable):")
    for key, value in derived_values(cfg).items():
        print(f"#   {key}: {value}")


def add_config(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="print the resolved config, or every field with --schema")
    add_config_arguments(parser)
    parser.add_argument("--schema", action="store_true", help="print path, type, default and doc of every field")
    parser.set_defaults(run=run_config)


def run_info(args: argparse.Namespace) -> None:
    # Imported here so `raytron config` does not pay for importing torch.
    from raytron.model.flops import flops_per_token
    from raytron.model.gpt import count_parameters
    from raytron.model.memory import memory_per_rank_bytes

    raw, source = read_run_mapping(args.config, args.overrides)
    if "source" in (raw.get("model") or {}):  # a serve config: what its replicas occupy
        from raytron.serve.settings import build_serve_config, serve_resources

        print(json.dumps(serve_resources(build_serve_config(raw, source)), indent=2))
        return
    cfg = load_run_config(args)
    memory, breakdown = memory_per_rank_bytes(cfg)
    info = {"parameters": count_parameters(cfg.model, cfg.parallel.tp), "flops_per_token": flops_per_token(cfg),
            "memory_per_rank_bytes": memory, "memory_breakdown": breakdown, **derived_values(cfg)}
    print(json.dumps(info, indent=2))


def add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="parameters, FLOPs per token and memory per rank as JSON "
                                   "(of a serve config: the devices and CPUs its replicas take)")
    add_config_arguments(parser)
    parser.set_defaults(run=run_info)


def run_train(args: argparse.Namespace) -> int:
    # imported here: Ray, DeepSpeed and MLflow take seconds to import and `config`/`info` need none
    from raytron.storage import StorageError
    from raytron.train.cluster import ResourceError
    from raytron.train.ray_trainer import TrainingStopped
    from raytron.train.run import run_training

    cfg = load_run_config(args)
    try:
        result = run_training(cfg, resume=args.resume)
    except (ResourceError, StorageError, TrainingStopped) as error:
        print(f"raytron train: {error}", file=sys.stderr)
        return 1
    summary = {key: value for key, value in result.metrics.items() if key not in ("losses", "grad_norms")}
    print(json.dumps({"run": result.run_name, "storage_path": result.storage_path,
                      "checkpoint": result.checkpoint.path if result.checkpoint else None, "last_step": summary},
                     indent=2))
    return 0


def add_resumable_run(subparsers: argparse._SubParsersAction, name: str, help: str, resume_help: str,
                      run) -> None:
    """A subcommand that takes a run YAML, its overrides and ``--resume`` (train, tune)."""
    parser = subparsers.add_parser(name, help=help)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.set_defaults(run=run)


def add_train(subparsers: argparse._SubParsersAction) -> None:
    add_resumable_run(subparsers, "train", "train on Ray (joins $RAY_ADDRESS or a running cluster, else starts a "
                      "local one)", "continue the newest run of this config's name from its latest checkpoint",
                      run_train)


def run_tune(args: argparse.Namespace) -> int:
    # imported here: Ray Tune, DeepSpeed and MLflow take seconds to import
    from raytron.tune.report import ranked_table, summary
    from raytron.tune.sweep import EXPECTED_ERRORS, run_sweep

    cfg = load_run_config(args)
    try:
        result = run_sweep(cfg, resume=args.resume)
    except EXPECTED_ERRORS as error:
        print(f"raytron tune: {error}", file=sys.stderr)
        return 1
    print_table(ranked_table(result, cfg.tune.metric))
    print(json.dumps(summary(result, cfg.tune.metric), indent=2))
    return 0


def add_tune(subparsers: argparse._SubParsersAction) -> None:
    add_resumable_run(subparsers, "tune", "sweep the config's tune.search_space with Ray Tune (same cluster rules "
                      "as train)", "continue the sweep of this tune.name after its driver died: finished trials "
                      "stay, the others resume from their checkpoints", run_tune)


def run_export(args: argparse.Namespace) -> int:
    # imported here: torch and MLflow take seconds to import
    from raytron.export.consolidate import CheckpointError
    from raytron.export.from_checkpoint import RegistrationError, export_checkpoint

    try:
        result = export_checkpoint(args.checkpoint, args.out, register=not args.no_register)
    except (CheckpointError, RegistrationError) as error:
        print(f"raytron export: {error}", file=sys.stderr)
        return 1
    version = result.model_version
    registered = {"registered_model": version.name, "version": version.version} if version else {}
    print(json.dumps({"folder": str(result.folder), **result.lineage, **registered}, indent=2))
    return 0


def add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="checkpoint of any dp/pp/tp -> Hugging Face folder -> "
                                                  "MLflow registered model version")
    parser.add_argument("checkpoint", help="checkpoint folder: local path or s3://bucket/prefix")
    parser.add_argument("out", help="local folder for the Hugging Face model")
    parser.add_argument("--no-register", action="store_true",
                        help="only write the folder; do not log it to MLflow or register a version")
    parser.set_defaults(run=run_export)


SUBCOMMANDS = (add_config, add_info, add_train, add_tune, add_export, add_serve, add_prepare, add_tokenizer,
               add_generate, add_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytron", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def job_main(subcommand: str) -> int:
    """The body of jobs/<name>.py for `ray job submit`: ``--config CONFIG`` is accepted for CONFIG."""
    args = sys.argv[1:]
    if args[:1] == ["--config"]:
        args = args[1:]
    return main([subcommand, *args])


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `raytron config --schema | head` ends quietly, like other Unix tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # Ray's driver folds lines from different workers that differ only in numbers into one "[repeated Nx across
    # cluster]": a sweep's concurrent trials would lose most of their progress lines. Read when ray is imported,
    # which no subcommand has done yet.
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINE_REGEX)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
