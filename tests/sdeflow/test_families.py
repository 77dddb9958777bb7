"""Model families behind one trainer: each trains, checkpoints and resumes bit-exactly through ``Trainer``;
parameter groups, samplers and trajectories follow each family's conventions."""

import math

import pytest
import torch
from trainer_state import assert_same_state

from sdeflow.families import DDPMFamily, DiffFlowFamily, FFJORDFamily, family_names, make_family
from sdeflow.nets import TimeMLP
from sdeflow.train import TrainConfig, Trainer

TINY = dict(width=16, depth=2, batch_size=32, steps=3, train_size=256, eval_size=32, eval_every=0,
            checkpoint_every=0, lr_decay_every=2, lr_decay=0.5)
FAMILIES = ("diffflow", "ddpm", "ffjord")


def tiny(model: str, **overrides) -> TrainConfig:
    return TrainConfig(model=model, **{**TINY, **overrides})


@pytest.mark.parametrize("model", FAMILIES)
def test_family_trains_checkpoints_and_resumes_bit_exactly(model, tmp_path):
    straight = Trainer(tiny(model), "moons")
    straight.train(4, progress=False)
    assert all(math.isfinite(v) for v in straight.history.losses)

    first = Trainer(tiny(model), "moons")
    path = tmp_path / "checkpoint.pt"
    first.train(2, checkpoint=path, progress=False)
    resumed = Trainer.from_checkpoint(path)
    assert resumed.config.model == model and type(resumed.family) is type(first.family)
    assert_same_state(first, resumed)  # the round trip
    resumed.train(4, progress=False)  # crosses a learning-rate decay at iteration 2
    assert_same_state(straight, resumed)
    # training moved every learned tensor, and the EMA with them
    fresh = Trainer(tiny(model), "moons")
    for before, net, ema in zip(fresh.model.parameters(), straight.model.parameters(), straight.ema.parameters(),
                                strict=True):
        assert not torch.equal(before, net) and not torch.equal(before, ema)


def test_param_groups_take_their_learning_rates():
    groups = {m: {g["name"]: g["lr"] for g in Trainer(tiny(m, drift_lr=1e-3, score_lr=2e-3), "moons")
                  .optimizer.param_groups} for m in FAMILIES}
    assert groups == {"diffflow": {"drift": 1e-3, "score": 2e-3}, "ddpm": {"score": 2e-3}, "ffjord": {"drift": 1e-3}}
    ddpm = Trainer(tiny("ddpm"), "moons")
    # the VP drift is fixed: only the score network is learned
    assert sum(p.numel() for p in ddpm.model.parameters()) == sum(p.numel() for p in ddpm.model.score.parameters())


@pytest.mark.parametrize("family", [DiffFlowFamily(), DDPMFamily(), FFJORDFamily()], ids=lambda f: f.name)
def test_samplers_and_trajectories(family):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = family.build(lambda role: TimeMLP(2, width=16, depth=2, t_scale=family.t_scale))
    n, steps = 50, 6

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(1)

    sde, ode = family.sample(model, n, (2,), steps, gen()), family.sample(model, n, (2,), steps, gen(), ode=True)
    assert sde.shape == ode.shape == (n, 2)
    # a stochastic family has two samplers; a deterministic one samples its ODE either way
    assert (not torch.equal(sde, ode)) is family.stochastic
    path = family.sample_trajectory(model, n, (2,), steps, gen())
    assert path.xs.shape == (steps + 1, n, 2) and bool((path.ts.diff() < 0).all())
    assert float(path.ts[0]) == pytest.approx(family.T) and float(path.ts[-1]) == pytest.approx(family.t0)
    torch.testing.assert_close(path.xs[-1], sde)  # the trajectory ends in the samples of the same seed
    x = torch.randn(n, 2, generator=gen())
    forward = family.forward_trajectory(model, x, steps, gen())
    assert forward.xs.shape == (steps + 1, n, 2) and bool((forward.ts.diff() > 0).all())
    assert torch.equal(forward.xs[0], x)
    nll = family.exact_nll(model, x)
    assert nll.shape == (n,) and bool(torch.isfinite(nll).all())
    bound = family.bound_nll(model, x, steps, gen())
    assert (bound is None) is (family.name == "ffjord")


def test_registry():
    assert family_names() == sorted(FAMILIES)
    assert make_family("ddpm", beta_max=10.0).beta_max == 10.0
    with pytest.raises(ValueError, match="unknown model 'flow'; available: ddpm, diffflow, ffjord"):
        make_family("flow")


def test_ffjord_trains_with_the_adaptive_solver_when_given_a_tolerance():
    # ode_tol > 0: the loss is the Dopri5 log-density at that tolerance, whatever steps says (RK4's depends on
    # it), and it estimates the exact-trace NLL; other models refuse the setting
    family = tiny("ffjord", ode_tol=1e-6).family()
    assert isinstance(family, FFJORDFamily) and family.train_tol == 1e-6
    rk4 = tiny("ffjord").family()
    torch.manual_seed(0)
    model = family.build(lambda role: TimeMLP(2, width=16, depth=2, t_scale=1.0)).double()
    with torch.no_grad():  # a flow that is not the identity: the last layer starts at zero
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = float(family.exact_nll(model, x).mean())

    def loss(family, steps):  # the same probes every call; many copies of each point average them out
        with torch.no_grad():
            return float(family.loss(model, x.repeat(50, 1), steps, torch.Generator().manual_seed(2)))

    assert loss(family, 2) == loss(family, 7)
    assert loss(rk4, 2) != loss(rk4, 7)
    assert abs(loss(family, 2) - exact) < 0.05
    with pytest.raises(ValueError, match="ode_tol is for model 'ffjord'"):
        tiny("ddpm", ode_tol=1e-3)
    with pytest.raises(ValueError, match="ode_tol must be finite and >= 0"):
        tiny("ffjord", ode_tol=-1.0)
