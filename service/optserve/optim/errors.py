"""The errors the optimizer core raises; the API maps each `code` to a problem+json response."""

from __future__ import annotations

from typing import Any


class OptimError(ValueError):
    """Base of every optimizer-core error; `code` is the stable API error code."""

    code = "optim_error"


class HyperparameterError(OptimError):
    """A hyperparameter (or the optimizer name itself) is unknown or outside its allowed range."""

    code = "invalid_hyperparameter"

    def __init__(self, field: str, value: Any, allowed: str, *, code: str | None = None) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        if code is not None:
            self.code = code
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


class GradientError(OptimError):
    """A gradient does not fit the tensors of the update (unknown name, wrong shape or dtype)."""

    def __init__(self, code: str, tensor: str, detail: str) -> None:
        self.code = code
        self.tensor = tensor
        super().__init__(f"gradient {tensor!r}: {detail}")


class NonFiniteGradientError(OptimError):
    """A gradient holds NaN or infinity; raised before any state changes."""

    code = "non_finite"

    def __init__(self, tensors: list[str]) -> None:
        self.tensors = tensors
        super().__init__(f"non-finite values (NaN or inf) in gradient(s): {', '.join(tensors)}")
