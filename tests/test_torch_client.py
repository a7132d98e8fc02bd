"""`optserve_client.torch.RemoteOptimizer` against a real `optserve serve`, torch as the oracle.

Every remote run is compared with the same training loop on a local torch optimizer
(`foreach=False`, torch's single-tensor path the server reproduces) from the same init.
"""

from __future__ import annotations

import contextlib
import copy
import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from optserve_client import OptservError
from optserve_client.torch import RemoteOptimizer

RTOL, ATOL = 1e-5, 1e-6

torch.set_num_threads(1)  # the oracle's reductions in one fixed order, and quick for tiny nets


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen)


DATA = make_data()


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    after_backward: Callable[[int], None] | None = None,
) -> None:
    x, y = DATA
    for i in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if after_backward is not None:
            after_backward(i)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def assert_moved(model: nn.Module, start: nn.Module) -> None:
    """The run did something: a parity check between two models that never moved is vacuous."""
    assert any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters(), strict=True)
    )


@pytest.fixture
def remote(api_url: str) -> Iterator[Callable[..., RemoteOptimizer]]:
    """RemoteOptimizer(params, url=api_url, ...); every session made is deleted afterwards."""
    made: list[RemoteOptimizer] = []

    def make(params: Any, **kwargs: Any) -> RemoteOptimizer:
        opt = RemoteOptimizer(params, url=api_url, **kwargs)
        made.append(opt)
        return opt

    yield make
    for opt in made:
        with contextlib.suppress(OptservError):  # another handle on it may have deleted it
            opt.session.delete()
        opt.close()


# -- parity --------------------------------------------------------------------------------------


def test_adam_mlp_matches_local_adam(remote: Callable[..., RemoteOptimizer]) -> None:
    model = make_model()
    start, local = copy.deepcopy(model), copy.deepcopy(model)
    opt = remote(model.named_parameters(), optimizer="adam", lr=1e-2)
    assert set(opt.session.info()["tensors"]) == {n for n, _ in model.named_parameters()}

    train(model, opt, 50)
    train(local, torch.optim.Adam(local.parameters(), lr=1e-2, foreach=False), 50)

    assert_moved(model, start)
    assert_same_params(model, local)
    assert opt.session.version == 50


@pytest.mark.parametrize(
    ("optimizer", "torch_class", "hyperparameters"),
    [
        ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                  "weight_decay": 1e-3}),
        ("rmsprop", torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5, "centered": True}),
    ],
)  # fmt: skip
def test_sgd_momentum_and_rmsprop_parity(
    remote: Callable[..., RemoteOptimizer],
    optimizer: str,
    torch_class: type[torch.optim.Optimizer],
    hyperparameters: dict[str, Any],
) -> None:
    model = make_model(seed=2)
    start, local = copy.deepcopy(model), copy.deepcopy(model)
    # Plain parameters: the session names them by position.
    opt = remote(model.parameters(), optimizer=optimizer, **hyperparameters)
    assert list(opt.session.info()["tensors"]) == ["0", "1", "2", "3"]
    local_opt = torch_class(local.parameters(), foreach=False, **hyperparameters)

    train(model, opt, 20)
    train(local, local_opt, 20)

    assert_moved(model, start)
    assert_same_params(model, local)
    remote_sd, local_sd = opt.state_dict(), local_opt.state_dict()
    assert remote_sd["param_groups"][0].keys() == local_sd["param_groups"][0].keys()
    assert remote_sd["state"].keys() == local_sd["state"].keys()
    for index, entry in local_sd["state"].items():
        assert list(remote_sd["state"][index]) == list(entry)


# -- state_dict ----------------------------------------------------------------------------------


def test_state_dict_is_torchs_and_continues_locally(
    remote: Callable[..., RemoteOptimizer],
) -> None:
    model = make_model()
    local = copy.deepcopy(model)
    opt = remote(model.named_parameters(), lr=1e-2, amsgrad=True, foreach=False)
    local_opt = torch.optim.Adam(local.named_parameters(), lr=1e-2, amsgrad=True, foreach=False)
    train(model, opt, 20)
    train(local, local_opt, 20)

    sd, expected = opt.state_dict(), local_opt.state_dict()
    # torch's format: the same param group (param_names included), the same state entries.
    assert sd["param_groups"] == expected["param_groups"]
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert sd["state"].keys() == expected["state"].keys() == {0, 1, 2, 3}
    for index, entry in expected["state"].items():
        got = sd["state"][index]
        assert list(got) == list(entry)  # step, exp_avg, exp_avg_sq, max_exp_avg_sq
        assert got["step"].dtype == torch.float32 and got["step"].dim() == 0
        assert got["step"].item() == 20.0
        for key in entry:
            torch.testing.assert_close(got[key], entry[key], rtol=RTOL, atol=ATOL)
    # torch.load's weights_only vocabulary, as a checkpoint file would need.
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)

    # A local Adam continues from the exported state exactly as the remote one does.
    continued = copy.deepcopy(model)
    continued_opt = torch.optim.Adam(continued.parameters(), foreach=False)
    continued_opt.load_state_dict(sd)
    train(continued, continued_opt, 5)
    train(model, opt, 5)
    assert_same_params(model, continued)


@pytest.mark.parametrize(
    ("optimizer", "torch_class"),
    [
        ("adamw", torch.optim.AdamW),
        ("adagrad", torch.optim.Adagrad),
        ("nadam", torch.optim.NAdam),
        ("radam", torch.optim.RAdam),
        ("adamax", torch.optim.Adamax),
    ],
)
def test_state_dict_round_trips_for_the_other_optimizers(
    remote: Callable[..., RemoteOptimizer],
    optimizer: str,
    torch_class: type[torch.optim.Optimizer],
) -> None:
    """Each optimizer's own state names (sum, mu_product, exp_inf, ...) both ways."""
    model = make_model(seed=9)
    local = copy.deepcopy(model)
    opt = remote(model.parameters(), optimizer=optimizer, lr=1e-2, foreach=False)
    local_opt = torch_class(local.parameters(), lr=1e-2, foreach=False)
    train(model, opt, 5)
    train(local, local_opt, 5)
    assert_same_params(model, local)
    sd, expected = opt.state_dict(), local_opt.state_dict()
    assert sd["param_groups"] == expected["param_groups"]
    for index, entry in expected["state"].items():
        assert list(sd["state"][index]) == list(entry)
        for key in entry:
            torch.testing.assert_close(sd["state"][index][key], entry[key], rtol=RTOL, atol=ATOL)

    # remote -> local and local -> a fresh remote, then both continue like the original.
    continued = copy.deepcopy(model)
    continued_opt = torch_class(continued.parameters(), foreach=False)
    continued_opt.load_state_dict(sd)
    fresh_model = copy.deepcopy(local)
    fresh = remote(fresh_model.parameters(), optimizer=optimizer)
    fresh.load_state_dict(expected)
    for m, o in (
        (model, opt),
        (local, local_opt),
        (continued, continued_opt),
        (fresh_model, fresh),
    ):
        train(m, o, 3)
    assert_same_params(continued, model)
    assert_same_params(fresh_model, local)
    assert_same_params(model, local)


def test_local_state_dict_loads_into_a_fresh_remote(
    remote: Callable[..., RemoteOptimizer],
) -> None:
    local = make_model(seed=3)
    local_opt = torch.optim.Adam(local.parameters(), lr=2e-2, betas=(0.8, 0.99), foreach=False)
    train(local, local_opt, 10)

    model = copy.deepcopy(local)
    opt = remote(model.named_parameters())  # lr 1e-3, betas (0.9, 0.999): replaced by the load
    opt.load_state_dict(local_opt.state_dict())
    assert opt.param_groups[0]["lr"] == 2e-2
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    info = opt.session.info()
    assert info["lr"] == 2e-2 and info["optimizer"]["betas"] == [0.8, 0.99]
    assert opt.session.state()["tensors"]["0.weight"]["step"] == 10.0

    train(local, local_opt, 5)
    train(model, opt, 5)
    assert_same_params(model, local)


# -- torch semantics -----------------------------------------------------------------------------


def test_parameter_without_grad_is_skipped(remote: Callable[..., RemoteOptimizer]) -> None:
    model = make_model(seed=4)
    local = copy.deepcopy(model)
    opt = remote(model.named_parameters(), lr=1e-2)
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2, foreach=False)

    def drop_last_layer(m: nn.Module, from_step: int) -> Callable[[int], None]:
        def hook(i: int) -> None:
            if i >= from_step:  # steps 4-9: the last layer has no gradient
                for p in m[2].parameters():
                    p.grad = None

        return hook

    train(model, opt, 3)
    frozen = {n: p.detach().clone() for n, p in model[2].named_parameters()}
    train(model, opt, 6, after_backward=drop_last_layer(model, 0))
    train(local, local_opt, 9, after_backward=drop_last_layer(local, 3))

    assert_same_params(model, local)
    for name, param in model[2].named_parameters():
        assert torch.equal(param, frozen[name])  # not stepped, not decayed, not moved
    tensors = opt.session.state()["tensors"]
    assert tensors["0.weight"]["step"] == 9.0
    assert tensors["2.weight"]["step"] == 3.0  # behind: skipped like torch skips grad=None
    assert opt.state_dict()["state"][2]["step"].item() == 3.0


def test_step_returns_the_closures_loss_and_zero_grad(
    remote: Callable[..., RemoteOptimizer],
) -> None:
    model = make_model()
    opt = remote(model.parameters(), optimizer="sgd", lr=0.1)
    x, y = DATA

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert isinstance(first, torch.Tensor) and second.item() < first.item()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.step() is None  # no gradient anywhere: nothing is pushed
    assert opt.session.version == 2


# -- hyperparameters -----------------------------------------------------------------------------


def test_lr_changes_via_param_groups_and_steplr(remote: Callable[..., RemoteOptimizer]) -> None:
    model = make_model(seed=5)
    local = copy.deepcopy(model)
    opt = remote(model.named_parameters(), lr=1e-2)
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2, foreach=False)

    # By hand first: a larger lr, then a weight decay, both sent with the next push.
    for o in (opt, local_opt):
        o.param_groups[0]["lr"] = 3e-2
    train(model, opt, 3)
    train(local, local_opt, 3)
    for o in (opt, local_opt):
        o.param_groups[0]["weight_decay"] = 0.1
    train(model, opt, 2)
    train(local, local_opt, 2)
    assert opt.session.info()["optimizer"]["weight_decay"] == 0.1

    # Then a torch scheduler on top, unchanged.
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    local_sched = torch.optim.lr_scheduler.StepLR(local_opt, step_size=3, gamma=0.5)
    train(model, opt, 12, scheduler=sched)
    train(local, local_opt, 12, scheduler=local_sched)

    assert_same_params(model, local)
    assert opt.param_groups[0]["lr"] == local_opt.param_groups[0]["lr"] == 3e-2 * 0.5**4
    # The last scheduler.step() (epoch 12) is sent with the next push; state_dict() sends it too.
    assert opt.session.info()["lr"] == 3e-2 * 0.5**3
    assert opt.state_dict()["param_groups"][0]["lr"] == 3e-2 * 0.5**4
    assert opt.session.info()["lr"] == 3e-2 * 0.5**4


def test_server_side_lr_schedule_is_left_alone(remote: Callable[..., RemoteOptimizer]) -> None:
    model = make_model(seed=6)
    local = copy.deepcopy(model)
    opt = remote(model.named_parameters(), lr=1e-2,
                 lr_schedule={"type": "step", "step_size": 3, "gamma": 0.5})  # fmt: skip
    local_opt = torch.optim.Adam(local.parameters(), lr=1e-2, foreach=False)
    local_sched = torch.optim.lr_scheduler.StepLR(local_opt, step_size=3, gamma=0.5)

    train(model, opt, 10)
    train(local, local_opt, 10, scheduler=local_sched)

    assert_same_params(model, local)
    info = opt.session.info()
    assert info["optimizer"]["lr"] == 1e-2  # never PATCHed: the client did not fight the schedule
    assert info["lr"] == local_opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == 1e-2  # what the user set, until refreshed
    opt.refresh()
    assert opt.param_groups[0]["lr"] == local_opt.param_groups[0]["lr"]

    # Setting the lr by hand still works (torch's group["lr"] = x; the schedule continues).
    opt.param_groups[0]["lr"] = local_opt.param_groups[0]["lr"] = 5e-3
    train(model, opt, 4)
    train(local, local_opt, 4, scheduler=local_sched)
    assert_same_params(model, local)


# -- sessions ------------------------------------------------------------------------------------


def test_join_an_existing_session(remote: Callable[..., RemoteOptimizer]) -> None:
    model = make_model(seed=7)
    opt = remote(model.named_parameters(), lr=1e-2)
    train(model, opt, 3)

    other = make_model(seed=8)  # another worker, other init: joining pulls the session's values
    joined = remote(other.named_parameters(), session=opt.session.id)
    assert joined.optimizer_name == "adam" and joined.param_groups[0]["lr"] == 1e-2
    assert_same_params(other, model)
    train(other, joined, 2)
    assert joined.session.version == 5
    assert opt.pull_params() == 5
    assert_same_params(model, other)

    with pytest.raises(ValueError, match="runs 'adam', not 'sgd'"):
        remote(make_model().named_parameters(), session=opt.session.id, optimizer="sgd")
    with pytest.raises(ValueError, match="has no tensor '0'"):
        remote(make_model().parameters(), session=opt.session.id)


def test_errors(remote: Callable[..., RemoteOptimizer]) -> None:
    with pytest.raises(OptservError) as info:
        remote(make_model().parameters(), betas=(1.5, 0.999))
    assert info.value.code == "invalid_hyperparameter"
    with pytest.raises(OptservError) as info:
        remote(make_model().parameters(), optimizer="adamm")
    assert info.value.code == "unknown_optimizer"
    with pytest.raises(TypeError, match="float32 parameters only"):
        remote(make_model().double().parameters())
    model = make_model()
    with pytest.raises(ValueError, match="one param group"):
        remote([{"params": model[0].parameters()}, {"params": model[2].parameters()}])

    # A bad value set in param_groups fails the next step, and nothing is applied.
    opt = remote(model.parameters())
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(OptservError) as info:
        train(model, opt, 1)
    assert info.value.code == "invalid_hyperparameter"
    assert opt.session.version == 0


def test_the_client_does_not_import_torch() -> None:
    code = "import sys, optserve_client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
