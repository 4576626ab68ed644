"""Data validation: per-sample facts, checks and reports."""
