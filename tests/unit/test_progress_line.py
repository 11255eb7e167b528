"""The console progress line rank 0 prints per log step."""

import re

from ray._private.ray_logging import LogDeduplicator

from raytron.train.progress import PROGRESS_LINE_REGEX, ProgressLine, format_duration

METRICS = {"loss": 5.21401, "lr": 3e-4, "tokens_per_s": 12345.6}


def test_line_shows_step_loss_lr_throughput_and_an_eta_from_the_steps_seen():
    progress = ProgressLine(100, "[run] ")
    first = progress.line({**METRICS, "step": 10}, now=50.0)
    assert first == "[run] step 10/100  loss 5.2140  lr 3.00e-04  12,346 tok/s"  # no ETA from one point
    later = progress.line({**METRICS, "step": 40, "mfu": 0.4123, "val_loss": 5.5}, now=80.0)  # 1 s per step
    assert later == "[run] step 40/100  loss 5.2140  lr 3.00e-04  12,346 tok/s  val_loss 5.5000  MFU 41.2%  ETA 1m00s"


def test_durations():
    assert [format_duration(s) for s in (7, 72, 3725)] == ["7s", "1m12s", "1h02m"]


def test_ray_does_not_fold_two_trials_progress_lines_into_one():
    """Ray's driver folds lines differing only in numbers; the progress lines of concurrent trials must all show."""
    lines = [ProgressLine(8, f"[{trial}] ").line({**METRICS, "step": 3}) for trial in ("a1b2_00000", "a1b2_00001")]
    assert all(re.search(PROGRESS_LINE_REGEX, line) for line in lines)
    for allow, expected in ((None, lines[:1]), (PROGRESS_LINE_REGEX, lines)):
        dedup = LogDeduplicator(agg_window_s=60, allow_re=allow, skip_re=None, _timesource=lambda: 0.0)
        shown = [line for pid, line in enumerate(lines) for batch in dedup.deduplicate(
            {"ip": "127.0.0.1", "pid": pid, "lines": [line]}) for line in batch["lines"]]
        assert shown == expected
