"""`ray job submit` entrypoint for sweeps: python jobs/tune.py --config CONFIG [--set k=v ...] [--resume]."""

import sys
from pathlib import Path

# A job's working dir is this checkout: make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raytron.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("tune"))
