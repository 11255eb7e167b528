"""The console progress line rank 0 prints per log step."""

from raytron.train.progress import ProgressLine, format_duration

METRICS = {"loss": 5.21401, "lr": 3e-4, "tokens_per_s": 12345.6}


def test_line_shows_step_loss_lr_throughput_and_an_eta_from_the_steps_seen():
    progress = ProgressLine(100, "[run] ")
    first = progress.line({**METRICS, "step": 10}, now=50.0)
    assert first == "[run] step 10/100  loss 5.2140  lr 3.00e-04  12,346 tok/s"  # no ETA from one point
    later = progress.line({**METRICS, "step": 40, "mfu": 0.4123, "val_loss": 5.5}, now=80.0)  # 1 s per step
    assert later == "[run] step 40/100  loss 5.2140  lr 3.00e-04  12,346 tok/s  val_loss 5.5000  MFU 41.2%  ETA 1m00s"


def test_durations():
    assert [format_duration(s) for s in (7, 72, 3725)] == ["7s", "1m12s", "1h02m"]
