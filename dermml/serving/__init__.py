"""Serving: MLflow pyfunc models per task and ``mlflow models serve`` wrappers."""
