"""Evaluation of a run's or registered model on one or many test splits."""
