# `raytron train` through Ray Train on the one H100: the 1.3B GPT shape, bf16, seq 2048, one worker.
# The demo corpus's tokenizer has 19,460 tokens (the model's vocabulary follows it), and a 20%
# validation split fills one global batch of 32 blocks; metrics are read back from MLflow.
source bench/device/setup.sh
unset DS_ACCELERATOR
export RAY_ADDRESS=local
S=""
for kv in parallel.dp=1 resources.num_workers=1 resources.cpus_per_worker=8 train.micro_batch_size=8 \
          train.grad_accum_steps=4 train.steps=14 train.log_every=1 train.warmup_steps=2 name=gpt-1p3b-h100 \
          model.vocab_size=19460 data.validation_fraction=0.2; do S="$S --set $kv"; done
timeout 420 raytron train jobs/configs/gpt_1p3b.yaml $S 2>&1 | tee $OUT/gpu_train.log | tail -30
python3 - <<'PY' 2>&1 | tee $OUT/gpu_metrics.log
from mlflow import MlflowClient
from raytron.tracking.mlflow_run import resolve_tracking_uri
client = MlflowClient(resolve_tracking_uri())
for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
    print(run.info.run_name, run.info.status)
    for name in ["step_time_s", "tokens_per_s", "tflops_per_worker", "mfu", "loss", "data_wait_share"]:
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        print(name, [round(m.value, 4) for m in history])
PY
