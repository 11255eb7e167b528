"""``raytron prepare CONFIG`` and ``raytron tokenizer train CONFIG``, registered by raytron.cli."""

from __future__ import annotations

import argparse
import json
import sys


def _root():
    # raytron.cli imports this module to register the subcommands: import it back lazily
    from raytron import cli
    return cli


def run_prepare(args: argparse.Namespace) -> int:
    # imported here: Ray takes seconds to import and other subcommands do not need it
    from raytron.data.prepare import PrepareError, prepare
    from raytron.data.records import BadRecordError
    from raytron.data.sft_encode import SampleTooLongError
    from raytron.storage import StorageError
    from raytron.train.cluster import connect

    cfg = _root().load_run_config(args)
    connect(cfg)
    try:
        result = prepare(cfg)
    except (StorageError, BadRecordError, SampleTooLongError, PrepareError) as error:
        print(f"raytron prepare: {error}", file=sys.stderr)
        return 1
    _root().print_table(result.summary_rows())
    for example in result.manifest.bad_record_examples[:5]:
        print(f"skipped: {example}")
    return 0


def add_prepare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help="tokenize and pack data.source into shards + manifest at "
                                                   "data.prepared with Ray Data (reused when unchanged)")
    _root().add_config_arguments(parser)
    parser.set_defaults(run=run_prepare)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from raytron.data.records import BadRecordError
    from raytron.data.sources import list_sources
    from raytron.data.tokenizer_source import train_on_sample
    from raytron.storage import StorageError, write_bytes

    cfg = _root().load_run_config(args)
    try:
        spec = train_on_sample(cfg, list_sources(cfg))
        write_bytes(args.out, spec.json.encode(), cfg.data.endpoint_url, cfg.data.region)
    except (StorageError, BadRecordError) as error:
        print(f"raytron tokenizer train: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"tokenizer": args.out, "vocab_size": spec.vocab_size, "sha256": spec.sha256,
                      "use_with": f"--set data.tokenizer={args.out}"}, indent=2))
    return 0


def add_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="tokenizer tools")
    actions = parser.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a byte-level BPE (model.vocab_size; EOS, BOS, PAD) on the "
                                             "first data.tokenizer_sample_bytes of data.source")
    _root().add_config_arguments(train)
    train.add_argument("--out", default="tokenizer.json", help="where to write tokenizer.json (path or s3:// URL)")
    train.set_defaults(run=run_tokenizer_train)
