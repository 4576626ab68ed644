"""The pyfunc model's code, logged as a file ("models from code"), not as a pickled object.

MLflow copies this file into every logged model and runs it at load time; it only names the
class, whose code comes from the installed ``dermml`` package. The network weights and the
config live in the model's bundle artifact, loaded with ``torch.load(weights_only=True)``.
"""

from mlflow.models import set_model

from dermml.serving.pyfunc import DermmlModel

set_model(DermmlModel())
