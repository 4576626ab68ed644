"""DermML: a Kubernetes-native MLOps platform for dermatology imaging."""

__version__ = "0.1.0"
