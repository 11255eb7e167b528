"""The model-parallel unit DeepSpeed asks for (``mpu=``), answered from our Topology.

DeepSpeed uses it to reduce gradients over the data-parallel group only and to count
replicated parameters once per tensor-parallel group in the gradient norm.
"""

from __future__ import annotations

from raytron.parallel.topology import Topology


class TopologyMPU:
    def __init__(self, topology: Topology):
        self.topology = topology

    def get_model_parallel_rank(self) -> int:
        return self.topology.tensor.rank

    def get_model_parallel_world_size(self) -> int:
        return self.topology.tensor.size

    def get_model_parallel_group(self):
        return self.topology.tensor.group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.topology.tensor.ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self.topology.data.rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.data.size

    def get_data_parallel_group(self):
        return self.topology.data.group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.topology.data.ranks)
