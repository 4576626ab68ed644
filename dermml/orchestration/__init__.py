"""Adapters to Ray, MLflow, KFP and Kubernetes: the only code that knows those libraries."""
