"""Evaluation metrics (numpy / torch only)."""
