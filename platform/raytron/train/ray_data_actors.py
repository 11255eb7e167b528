"""Ray Data's cluster-wide helper actors, started by the driver so that they live on the driver's node.

Ray Data creates two detached singleton actors (0 CPUs each) the first time any process of the cluster runs
a dataset: its `_StatsActor` and its `AutoscalingCoordinator`. Each is hard-pinned to the node of the
process that creates it. In a training run that process is often a Train worker iterating its shard, so
the actors land on an autoscaled worker node and stay there after the run, and a node that hosts a live
actor is never idle: the autoscaler keeps it for good. Seen on the fake autoscaling cluster of test (a):
after the run one of the two `fake.tp` nodes outlived its idle timeout, and its raylet's state dump showed
`is_idle: 0` with one resident, `_StatsActor`. Reported upstream as ray-project/ray#56576 and #42253.

Ray has no public call for this; the two functions below are the ones Ray Data itself calls (get-if-exists,
so calling them again, from a Tune trial say, returns the actors already made).
"""

from __future__ import annotations

from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
    get_or_create_autoscaling_coordinator,
)
from ray.data._internal.stats import get_or_create_stats_actor


def start_ray_data_actors_here() -> None:
    """Create Ray Data's detached actors on this process's node (the head, for `ray job submit` and for
    `raytron` run on the head), before any worker can create them on an autoscaled node."""
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()
