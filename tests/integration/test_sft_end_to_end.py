"""Supervised fine-tuning end to end, through Ray and a real `mlflow server`: a tiny Llama built with
`transformers` (with a ChatML tokenizer folder beside it) is imported with ``model.init_from``, fine-tuned
at pp=2 on packed chat data, exported and registered; the masked validation loss falls, and the
registered version, served by ``raytron serve``, answers a chat request by stopping at the end-of-turn
token ``<|im_end|>`` (finish_reason "stop" before max_tokens, no stop strings given)."""

from __future__ import annotations

import openai
from mlflow import MlflowClient
from ray import serve

from jobs.make_sft_smoke_inputs import make_inputs
from raytron.config import read_run_mapping
from raytron.parallel.hf_import import resolve_init_from
from raytron.data.demo_chat import IM_END
from raytron.serve.app import run_app
from raytron.serve.settings import build_serve_config
from raytron.train.run import run_training
from tests.integration.test_serve_api import API_KEY, MODEL_NAME, serve_config
from tests.servers import free_port

REGISTERED = "sft-e2e"


def test_sft_from_an_imported_model_lowers_masked_loss_and_serves_to_end_of_turn(ray_cluster, mlflow_server,
                                                                                 tmp_path):
    model_folder, chats = make_inputs(tmp_path)
    cfg = resolve_init_from(*read_run_mapping("jobs/configs/sft_smoke.yaml", [
        f"model.init_from={model_folder}", f"data.source={chats}", f"data.tokenizer={model_folder}",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_server.url}",
        f"tracking.registered_model_name={REGISTERED}"]))
    result = run_training(cfg, workdir=tmp_path)
    assert result.export is not None

    client = MlflowClient(mlflow_server.url)
    version = client.get_latest_versions(REGISTERED)[0]
    # the masked validation loss (scored assistant tokens only) of the run that registered the version
    history = [m.value for m in sorted(client.get_metric_history(version.run_id, "val_loss"), key=lambda m: m.step)]
    assert len(history) >= 2 and history[-1] < 0.8 * history[0], history

    serve_cfg = build_serve_config(serve_config(f"models:/{REGISTERED}/{version.version}", free_port(),
                                                tracking_uri=mlflow_server.url))
    try:
        url = run_app(serve_cfg)
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=24, temperature=0)
    finally:
        serve.shutdown()
    choice = chat.choices[0]
    assert choice.finish_reason == "stop" and chat.usage.completion_tokens < 24, choice
    assert IM_END not in choice.message.content and "=" in choice.message.content, choice.message.content
