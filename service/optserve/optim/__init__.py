"""The optimizer core: pure numpy, torch.optim numerics, no I/O.

Importing this package registers every algorithm; look them up with `get_algorithm(name)`.
"""

from . import adagrad, adam, adamax, lion, nadam, radam, rmsprop, sgd  # noqa: F401  (registration)
from .base import SCALAR_STATE, Algorithm, TensorState, algorithm_names, get_algorithm
from .errors import GradientError, HyperparameterError, NonFiniteGradientError, OptimError

__all__ = [
    "SCALAR_STATE",
    "Algorithm",
    "GradientError",
    "HyperparameterError",
    "NonFiniteGradientError",
    "OptimError",
    "TensorState",
    "algorithm_names",
    "get_algorithm",
]
