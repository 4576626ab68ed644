"""Datasets: the Parquet manifest, importers, procedural demo data and torch datasets."""
