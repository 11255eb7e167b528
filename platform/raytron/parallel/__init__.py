"""Distribution: the (dp, pp, tp) topology, Megatron-style tensor parallelism, sharding."""
