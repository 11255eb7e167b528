"""prepare on SFT JSONL (chat, prompt_completion) with a real local Ray: every row is what SftEncoder makes
of its record (padded, or packed whole with segments), in file order and split by the record's hash;
bad records and too-long samples follow their policies naming file:line and are counted; the template
comes from the tokenizer folder and is part of the fingerprint; reruns are byte-identical or reused; with only
model.init_from set, chats and text are tokenized as transformers tokenizes them with that folder's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from jobs.make_sft_smoke_inputs import write_base_model

from raytron.config import load_config, read_run_mapping
from raytron.data.chat_template import ChatTemplate
from raytron.data.encode import is_validation
from raytron.data.manifest import fingerprint
from raytron.data.prepare import identity, prepare
from raytron.data.records import BadRecordError
from raytron.data.sft_encode import SampleTooLongError, SftEncoder, encode_record, leading_bos, special_ids
from raytron.data.shards import read_columns
from raytron.data.sources import list_sources
from raytron.data.tokenizer import load_tokenizer
from raytron.data.tokenizer_source import load_configured
from raytron.data.demo_chat import (CHATML_TEMPLATE, IM_END, chat_records, prompt_completion_records,
                                        write_chatml_tokenizer, write_jsonl)
from raytron.parallel.hf_import import resolve_init_from
from raytron.parallel.init_source import local_folder
from tests.integration.test_init_from_sources import upload
from tests.integration.test_prepare_local import tree_bytes

SEQ_LEN = 96
SETTINGS = ["model.vocab_size=512", f"train.seq_len={SEQ_LEN}", "data.validation_fraction=0.2",
            "data.shard_blocks=40"]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    return write_chatml_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chats")
    records = chat_records(150)
    write_jsonl(folder / "a.jsonl", records[:90])
    write_jsonl(folder / "b.jsonl", records[90:])
    return folder


def config(source, prepared, *extra):
    return load_config(None, [f"data.source={source}", f"data.prepared={prepared}", *SETTINGS, *extra])


def expected_samples(cfg, tokenizer_folder: Path) -> dict[str, list]:
    """What SftEncoder makes of every record, per split, in file order (the reference the shards must equal)."""
    data = cfg.data
    tokenizer = load_tokenizer(tokenizer_folder)
    tokenizer_config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    template = ChatTemplate.from_tokenizer_config(tokenizer_config) if data.format == "chat" else None
    eos, _ = special_ids(tokenizer, {"eos_token": tokenizer_config["eos_token"]})
    encoder = SftEncoder(tokenizer, data.format, eos, template, data.train_on_prompt, leading_bos(tokenizer))
    samples = {"train": [], "validation": []}
    for source in list_sources(cfg):
        for number, line in enumerate(Path(source.url).read_text().splitlines(), start=1):
            outcome = encode_record(encoder, json.loads(line), cfg.train.seq_len, data.too_long, f"x:{number}")
            if outcome.sample is not None:
                samples["validation" if is_validation(line, data.validation_fraction) else "train"].append(
                    outcome.sample)
    return samples


def unpacked(columns: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss_mask) of every sample of packed rows, read back by segment number, in order."""
    found = []
    for tokens, mask, segments in zip(columns["tokens"], columns["loss_mask"], columns["segments"]):
        for number in range(1, segments.max() + 1):
            positions = np.flatnonzero(segments == number)
            assert np.array_equal(positions, np.arange(positions[0], positions[-1] + 1)), "a sample is contiguous"
            found.append((tokens[positions], mask[positions]))
    return found


def test_chat_rows_are_the_encoders_samples_with_the_folders_template(ray_cluster, chats, tokenizer_folder, tmp_path):
    cfg = config(chats, tmp_path / "out", "data.format=chat", f"data.tokenizer={tokenizer_folder}")
    result = prepare(cfg)
    expected = expected_samples(cfg, tokenizer_folder)
    sft = result.manifest.settings["sft"]
    assert sft["chat_template"] == CHATML_TEMPLATE
    assert sft["chat_template_source"] == f"{tokenizer_folder}/tokenizer_config.json"
    # the tokenizer's special tokens and template travel with the shards
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == \
        (tokenizer_folder / "tokenizer_config.json").read_bytes()
    pad = load_tokenizer(tokenizer_folder).token_to_id("<|pad|>")
    for name, samples in expected.items():
        info, columns = result.manifest.splits[name], read_columns(result.manifest.splits[name])
        assert set(columns) == {"tokens", "id", "loss_mask"} and columns["tokens"].shape[1] == SEQ_LEN + 1
        assert info.rows == info.samples == len(samples) > 0
        for row, sample in enumerate(samples):  # one sample per row, then unscored pads
            n = len(sample.tokens)
            assert np.array_equal(columns["tokens"][row, :n], sample.tokens), (name, row)
            assert np.array_equal(columns["loss_mask"][row, :n], sample.loss_mask), (name, row)
            assert (columns["tokens"][row, n:] == pad).all() and not columns["loss_mask"][row, n:].any()
        assert info.scored_tokens == sum(int(s.loss_mask.sum()) for s in samples) == columns["loss_mask"].sum()
        assert info.tokens == sum(len(s.tokens) for s in samples)
    assert not columns["loss_mask"][:, 0].any()
    header = result.summary_rows()[0]
    assert header == ("", "samples", "tokens", "scored tokens", "rows", "truncated", "skipped too long")
    # the same inputs give the same bytes; the same settings reuse what is there
    prepare(config(chats, tmp_path / "again", "data.format=chat", f"data.tokenizer={tokenizer_folder}"))
    assert tree_bytes(tmp_path / "again") == tree_bytes(tmp_path / "out")
    assert prepare(cfg).reused


def test_packed_rows_hold_whole_samples_in_order_with_restarting_masks(ray_cluster, chats, tokenizer_folder,
                                                                         tmp_path):
    cfg = config(chats, tmp_path / "out", "data.format=chat", f"data.tokenizer={tokenizer_folder}",
                 "data.packing=true")
    manifest = prepare(cfg).manifest
    expected = expected_samples(cfg, tokenizer_folder)
    for name, samples in expected.items():
        columns = read_columns(manifest.splits[name])
        segments = columns["segments"]
        found = unpacked(columns)
        assert len(found) == len(samples) == manifest.splits[name].samples
        for (tokens, mask), sample in zip(found, samples):
            assert np.array_equal(tokens, sample.tokens) and np.array_equal(mask, sample.loss_mask)
        starts = np.zeros_like(segments, dtype=bool)
        starts[:, 0] = segments[:, 0] > 0
        starts[:, 1:] = (segments[:, 1:] != segments[:, :-1]) & (segments[:, 1:] > 0)
        assert not columns["loss_mask"][starts].any() and not columns["loss_mask"][segments == 0].any()
        # greedy: the next row's first sample did not fit into the row before it
        used = (segments > 0).sum(axis=1)
        first_lengths = (segments == 1).sum(axis=1)
        assert (used[:-1] + first_lengths[1:] > SEQ_LEN + 1).all()
        assert manifest.splits[name].rows < len(samples)


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory) -> Path:
    records = prompt_completion_records(60)
    for index in range(0, 60, 6):  # every sixth sample too long for a row, its prompt fitting
        records[index] = {"prompt": "What is 1 + 1? " * 2, "completion": "1 + 1 = 2. " * (index % 4 + 16)}
    return write_jsonl(tmp_path_factory.mktemp("pc") / "pc.jsonl", records)


def test_prompt_completion_truncates_and_counts(ray_cluster, long_prompts, tokenizer_folder, tmp_path):
    cfg = config(long_prompts, tmp_path / "out", "data.format=prompt_completion",
                 f"data.tokenizer={tokenizer_folder}", "data.too_long=truncate")
    manifest = prepare(cfg).manifest
    expected = expected_samples(cfg, tokenizer_folder)
    splits = manifest.splits
    truncated = sum(info.truncated for info in splits.values())
    assert truncated == sum(s.truncated for samples in expected.values() for s in samples) > 0
    assert sum(info.dropped_tokens for info in splits.values()) == sum(
        s.cut_tokens for samples in expected.values() for s in samples)
    eos = load_tokenizer(tokenizer_folder).token_to_id("<|im_end|>")
    for name, samples in expected.items():
        columns = read_columns(splits[name])
        for row, sample in enumerate(samples):
            n = len(sample.tokens)
            assert np.array_equal(columns["tokens"][row, :n], sample.tokens)
            assert np.array_equal(columns["loss_mask"][row, :n], sample.loss_mask)
            assert sample.truncated or sample.tokens[-1] == eos  # the completion ends with tokenizer_config's EOS


def test_too_long_skip_counts_and_fail_names_the_line(ray_cluster, long_prompts, tokenizer_folder, tmp_path):
    common = [f"data.tokenizer={tokenizer_folder}", "data.format=prompt_completion"]
    manifest = prepare(config(long_prompts, tmp_path / "skip", *common, "data.too_long=skip")).manifest
    assert sum(info.skipped_too_long for info in manifest.splits.values()) == 10
    assert sum(info.samples for info in manifest.splits.values()) == 50
    assert all(info.documents == info.samples + info.skipped_too_long for info in manifest.splits.values())
    with pytest.raises(SampleTooLongError, match=rf"{long_prompts}:1: sample of \d+ tokens is longer than "
                                                 rf"train.seq_len \+ 1 = {SEQ_LEN + 1}"):
        prepare(config(long_prompts, tmp_path / "fail", *common, "data.too_long=fail"))


@pytest.fixture(scope="module")
def bad_chats(tmp_path_factory) -> Path:
    good = chat_records(20)
    bad = [{"messages": [{"role": "user", "content": "What is 1 + 1?"}]},
           {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["yo"]}]},
           {"messages": []}]
    return write_jsonl(tmp_path_factory.mktemp("bad") / "chat.jsonl", good[:1] + bad + good[1:])


def test_bad_records_fail_or_are_skipped_naming_file_and_line(ray_cluster, bad_chats, tokenizer_folder, tmp_path):
    common = ["data.format=chat", f"data.tokenizer={tokenizer_folder}"]
    with pytest.raises(BadRecordError, match=rf"{bad_chats}:2: no assistant turn"):
        prepare(config(bad_chats, tmp_path / "fail", *common))
    manifest = prepare(config(bad_chats, tmp_path / "skip", *common, "data.on_bad_record=skip")).manifest
    assert manifest.bad_records == 4
    assert [example.split(": ", 1)[0] for example in manifest.bad_record_examples] == [
        f"{bad_chats}:{line}" for line in (2, 3, 4, 5)]
    assert "messages[0].role 'wizard'" in manifest.bad_record_examples[1]
    assert "messages[1].content must be a string" in manifest.bad_record_examples[2]
    assert "'messages' must be a non-empty list" in manifest.bad_record_examples[3]
    assert sum(info.samples for info in manifest.splits.values()) == 20


def test_the_template_is_in_the_fingerprint(chats, tokenizer_folder, tmp_path):
    folder = write_chatml_tokenizer(tmp_path / "tokenizer")
    cfg = config(chats, tmp_path / "out", "data.format=chat", f"data.tokenizer={folder}")

    def digest():
        return fingerprint(identity(cfg, list_sources(cfg), load_configured(cfg)))
    before = digest()
    assert digest() == before
    write_chatml_tokenizer(folder, template=CHATML_TEMPLATE.replace("\\n", " "))
    changed = digest()
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)  # transformers 5's file wins over the config's
    assert len({before, changed, digest()}) == 3
    assert identity(cfg, list_sources(cfg), load_configured(cfg))["sft"]["chat_template"] == CHATML_TEMPLATE


def test_init_from_alone_tokenizes_chats_and_text_as_transformers_with_its_folder(ray_cluster, chats, s3_server,
                                                                                   tmp_path, monkeypatch):
    base = write_base_model(tmp_path / "base")  # config.json + weights + tokenizer.json + tokenizer_config.json
    theirs = AutoTokenizer.from_pretrained(base)
    common = [f"model.init_from={base}", f"train.seq_len={SEQ_LEN}", "data.validation_fraction=0.2"]
    cfg = resolve_init_from(*read_run_mapping(None, [*common, f"data.source={chats}", "data.format=chat",
                                                     f"data.prepared={tmp_path / 'chat'}"]))
    assert cfg.data.tokenizer == str(base)
    manifest = prepare(cfg).manifest
    assert manifest.settings["sft"]["chat_template_source"] == f"{base}/tokenizer_config.json"
    lines = [line for source in list_sources(cfg) for line in Path(source.url).read_text().splitlines()]
    train = [json.loads(line)["messages"] for line in lines if not is_validation(line, 0.2)]
    rows = read_columns(manifest.splits["train"])["tokens"]
    assert len(rows) == len(train)
    for row, messages in zip(rows, train):  # the folder's template rendered and tokenized, as transformers does
        ids = theirs.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert len(ids) <= SEQ_LEN + 1 and row[:len(ids)].tolist() == ids
    # pretraining text: the folder's tokenizer too, each document's ids then its EOS (tokenizer_config.json's
    # eos_token, <|im_end|> here, as tokenizer.eos_token), cut into blocks
    texts = [" ".join(message["content"] for message in messages) for messages in train]
    corpus = write_jsonl(tmp_path / "text" / "docs.jsonl", [{"text": text} for text in texts])
    cfg = resolve_init_from(*read_run_mapping(None, [*common, f"data.source={corpus}", "data.validation_fraction=0",
                                                     f"data.prepared={tmp_path / 'text-out'}"]))
    assert cfg.data.tokenizer == str(base)
    blocks = read_columns(prepare(cfg).manifest.splits["train"])["tokens"]
    stream = [i for text in texts for i in [*theirs(text)["input_ids"], theirs.eos_token_id]]
    assert theirs.eos_token == IM_END
    assert blocks.size > 0 and blocks.reshape(-1).tolist() == stream[:blocks.size]
    # an s3:// init_from: its node-local copy, the folder checkpoints take the tokenizer files from
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAYTRON_CACHE_DIR", str(tmp_path / "cache"))
    s3_server.create_bucket("sft-tokenizer")
    upload(base, "s3://sft-tokenizer/base")
    cfg = resolve_init_from(*read_run_mapping(None, ["model.init_from=s3://sft-tokenizer/base", "data.format=chat"]))
    assert cfg.data.tokenizer == str(local_folder("s3://sft-tokenizer/base")) != str(base)
    assert load_configured(cfg).json == (base / "tokenizer.json").read_text()
