"""Drive real torch optimizers (the parity oracle) step by step, the way a training loop would."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

TORCH_CLASSES = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adamax": torch.optim.Adamax,
}


class TorchLion(torch.optim.Optimizer):
    """timm's Lion op sequence (torch.optim has none), the reference for our `lion`."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.lerp_(grad, 1 - beta2)


class TorchRun:
    """A torch optimizer over named float32 tensors; `step` takes numpy grads (None = no grad)."""

    def __init__(self, name: str, params: Mapping[str, np.ndarray], options: Mapping) -> None:
        self.names = list(params)
        self.tensors = [torch.nn.Parameter(torch.from_numpy(params[n].copy())) for n in self.names]
        if name == "lion":
            self.optimizer = TorchLion(self.tensors, **options)
        else:
            # The single-tensor path is what torch runs for CPU params by default.
            self.optimizer = TORCH_CLASSES[name](self.tensors, foreach=False, **options)
        #: Largest single-step move of each element so far: the magnitude of the update terms.
        self.max_move = {n: np.zeros_like(params[n]) for n in self.names}

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        for name, tensor in zip(self.names, self.tensors, strict=True):
            grad = grads.get(name)
            tensor.grad = None if grad is None else torch.from_numpy(grad.copy())
        before = self.params()
        self.optimizer.step()
        for name, after in self.params().items():
            np.maximum(self.max_move[name], np.abs(after - before[name]), out=self.max_move[name])

    def params(self) -> dict[str, np.ndarray]:
        return {n: t.detach().numpy().copy() for n, t in zip(self.names, self.tensors, strict=True)}

    def state(self, name: str) -> dict[str, np.ndarray | float]:
        tensor = self.tensors[self.names.index(name)]
        out: dict[str, np.ndarray | float] = {}
        for key, value in self.optimizer.state.get(tensor, {}).items():
            out[key] = value.item() if value.dim() == 0 else value.numpy().copy()
        return out


def ulps(ours: np.ndarray, expected: np.ndarray, *scales: np.ndarray) -> np.ndarray:
    """|ours - expected| in float32 ulps at the largest magnitude involved, per element.

    A parameter's error comes from 1-ulp roundings of the values its update touched: the
    parameter itself (final and initial) and each step's move. Measuring at the largest of
    those keeps elements that cross or end near zero meaningful.
    """
    magnitude = np.abs(expected).astype(np.float32)
    for scale in scales:
        magnitude = np.maximum(magnitude, np.abs(scale).astype(np.float32))
    both_nan = np.isnan(ours) & np.isnan(expected)
    diff = np.abs(ours.astype(np.float64) - expected.astype(np.float64))
    return np.where(both_nan, 0.0, diff / np.spacing(magnitude).astype(np.float64))
