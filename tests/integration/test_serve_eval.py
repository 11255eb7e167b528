"""`raytron eval` on its Ray Data actor pool: perplexity equal to transformers' exp(mean loss) on the
exported weights, multiple choice decided by log-likelihoods equal to a direct forward pass (labels
built from them: the answer is known), BLEU/ROUGE-L against known references, and the run in a real
`mlflow server`, linked both ways to a registered model version."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow import MlflowClient
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM

from raytron.config import RaytronConfig
from raytron.data.tokenizer import pack_documents
from raytron.model.sampling import SamplingParams
from raytron.serve.evaluate import EvalConfig, run_eval
from raytron.serve.model_source import load_model
from raytron.tracking.mlflow_run import RunTracker, register_model_version
from tests.integration.test_serve_api import MODEL_NAME, TEXTS, reference, tiny_export

SEQ_LEN = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("eval-model"))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@torch.no_grad()
def direct_loglik(local, context: str, choice: str) -> float:
    ctx, cont = local.tokenizer.encode(context).ids, local.tokenizer.encode(choice).ids
    ids = ctx + cont
    logprobs = torch.log_softmax(local.model(torch.tensor([ids]))[0][:, :local.tokenizer.get_vocab_size()], -1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))


def test_eval_metrics_equal_direct_computation_and_reach_mlflow(ray_cluster, mlflow_server, folder, tmp_path):
    local = load_model(str(folder))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in TEXTS * 3])
    contexts = ["The quick brown", "Return the", "This module"]
    choices = [" fox jumps", " value of", " provides a", " lazy dog."]
    scores = [[direct_loglik(local, c, choice) for choice in choices] for c in contexts]
    best = [{"context": c, "choices": choices, "label": max(range(4), key=s.__getitem__)} for c, s in zip(contexts, scores)]
    multiple = write_jsonl(tmp_path / "mc.jsonl", best)
    greedy = [reference(local, p, SamplingParams(max_new_tokens=8, temperature=0)) for p in TEXTS[:2]]
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"prompt": p, "reference": g} for p, g in zip(TEXTS[:2], greedy)])
    cfg = EvalConfig(model={"source": str(folder), "name": MODEL_NAME, "tracking_uri": mlflow_server.url},
                     corpus=corpus, seq_len=SEQ_LEN, multiple_choice=multiple, references=refs, max_tokens=8)

    metrics, run_id = run_eval(cfg)

    blocks = torch.from_numpy(pack_documents([local.tokenizer.encode(t).ids for t in TEXTS * 3], SEQ_LEN,
                                             local.eos_id)).long()
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # over the tokenizer's vocabulary: the export keeps the embedding's padded rows
        logits = theirs(input_ids=blocks[:, :-1]).logits[..., :local.tokenizer.get_vocab_size()]  # (N, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert metrics["accuracy"] == 1.0
    by_length = [max(range(4), key=lambda j: s[j] / len(choices[j].encode())) for s in scores]
    assert metrics["accuracy_norm"] == pytest.approx(sum(b == i["label"] for b, i in zip(by_length, best)) / 3)
    # the references are the greedy completions themselves: BLEU is perfect, and ROUGE-L is what
    # rouge-score gives each pair (1, or 0 where its tokenizer keeps no word of a gibberish text)
    assert metrics["bleu"] == pytest.approx(100.0)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert metrics["rouge_l"] == pytest.approx(sum(scorer.score(g, g)["rougeL"].fmeasure for g in greedy) / 2)
    run = MlflowClient(mlflow_server.url).get_run(run_id)
    assert run.data.metrics["perplexity"] == pytest.approx(metrics["perplexity"])
    assert run.data.tags["raytron.model_source"] == str(folder)

    worst = [{**item, "label": min(range(4), key=s.__getitem__)} for item, s in zip(best, scores)]
    wrong = cfg.model_copy(update={"multiple_choice": write_jsonl(tmp_path / "mc-worst.jsonl", worst), "corpus": None,
                                   "references": None})
    assert run_eval(wrong)[0]["accuracy"] == 0.0


def test_eval_of_a_registered_version_links_run_and_version(ray_cluster, mlflow_server, folder, tmp_path):
    cfg = RaytronConfig(name="eval-registry", tracking={"tracking_uri": mlflow_server.url, "experiment": "eval"})
    tracker = RunTracker.start(cfg)
    version = register_model_version(tracker, folder, "eval-test-gpt")
    tracker.finish()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in TEXTS * 2])
    evaluated = EvalConfig(model={"source": f"models:/eval-test-gpt/{version.version}", "name": MODEL_NAME,
                                  "tracking_uri": mlflow_server.url}, corpus=corpus, seq_len=SEQ_LEN, actors=2,
                           num_cpus_per_actor=0.5)

    metrics, run_id = run_eval(evaluated)
    by_folder, _ = run_eval(evaluated.model_copy(update={"model": evaluated.model.model_copy(
        update={"source": str(folder), "tracking_uri": mlflow_server.url})}))
    assert metrics["perplexity"] == pytest.approx(by_folder["perplexity"], rel=1e-6)  # the registered weights
    client = MlflowClient(mlflow_server.url)
    tags = client.get_run(run_id).data.tags
    assert (tags["raytron.model_name"], tags["raytron.model_version"]) == ("eval-test-gpt", version.version)
    assert client.get_model_version("eval-test-gpt", version.version).tags["raytron.eval_run_id"] == run_id
