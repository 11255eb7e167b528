"""MLflow tracking: one run per training run, exported models in the registry.

Everything here talks to MLflow through ``MlflowClient`` with explicit run ids, so
several runs can be tracked from one process, and a tracker never raises into training.
"""
