"""Sweeps on Ray Tune: the search space, the trial function, MLflow parent/child runs, resume."""
