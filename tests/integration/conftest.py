"""One Ray cluster for the whole test session, and packed blocks of real text."""

from __future__ import annotations

import pytest
import ray

from raytron.data.demo_data import demo_data


@pytest.fixture(scope="session")
def ray_cluster():
    # logical CPUs beyond the 2 real cores: Train workers + Ray Data tasks must all fit
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="session")
def text_blocks(tmp_path_factory):
    """Docstring corpus -> BPE (vocab 512) -> blocks of 33 tokens."""
    return demo_data(tmp_path_factory.mktemp("demo-data"), 400_000, vocab_size=512, seq_len=32)


def blocks_dataset(blocks, count: int):
    """The first ``count`` blocks as a Ray Dataset with an 'id' column (for exactly-once audits)."""
    return ray.data.from_items([{"tokens": blocks[i], "id": i} for i in range(count)])
