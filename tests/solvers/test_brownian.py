"""Brownian increments: the consistency of a path across intervals and query orders, their law, and
solves driven by a path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchsde

import solvers

DTYPE = torch.float64


def path(seed: int = 0, shape=(8, 3), t0: float = 0.0, t1: float = 1.0) -> solvers.BrownianPath:
    return solvers.BrownianPath(t0, t1, shape, seed=seed, dtype=DTYPE)


def increments(w, nodes, order) -> dict[int, torch.Tensor]:
    return {i: w(float(nodes[i]), float(nodes[i + 1])) for i in order}


class Noise(solvers.SDE):
    """dx = sigma dW: the solution is sigma times the path itself."""

    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.sigma = sigma

    def drift(self, t, x):
        return torch.zeros_like(x)

    def diffusion(self, t, x):
        return torch.full_like(x, self.sigma)


class Nonlinear(solvers.SDE):
    noise_type = solvers.NoiseType.DIAGONAL

    def drift(self, t, x):
        return torch.sin(x) - t * x

    def diffusion(self, t, x):
        return 0.5 + 0.2 * torch.cos(x)


# ------------------------------------------------------------------------------------------- consistency


def test_increments_add_up_over_adjacent_intervals():
    w = path(seed=1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, m, b = np.sort(rng.uniform(0.0, 1.0, 3))
        torch.testing.assert_close(w(a, m) + w(m, b), w(a, b), rtol=0, atol=1e-12)
    nodes = solvers.PowerGrid(0.0, 1.0, 37, 0.7).nodes()
    total = sum(increments(w, nodes, range(37)).values())
    torch.testing.assert_close(total, w(0.0, 1.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", [solvers.UniformGrid(0.0, 1.0, 16), solvers.PowerGrid(0.001, 1.0, 25, 0.9)],
                         ids=["uniform", "power"])
def test_same_seed_same_increments_whatever_the_query_order(grid):
    nodes = grid.nodes()
    n = grid.steps
    forward = increments(path(seed=7), nodes, range(n))
    backward = increments(path(seed=7), nodes, reversed(range(n)))
    shuffled = increments(path(seed=7), nodes, np.random.default_rng(1).permutation(n))
    w = path(seed=7)
    w(0.0, 1.0), w(0.3, 0.6), w(0.05, 0.95)  # unrelated queries first
    after_others = increments(w, nodes, range(n))
    for i in range(n):
        for other in (backward, shuffled, after_others):
            assert torch.equal(forward[i], other[i])
    different = increments(path(seed=8), nodes, range(n))
    assert not torch.equal(forward[0], different[0])


def test_path_is_deterministic_on_repeated_queries():
    w = path(seed=2)
    first = w(0.2, 0.7)
    for a, b in ((0.0, 0.5), (0.6, 0.9), (0.1, 0.3)):
        w(a, b)
    assert torch.equal(w(0.2, 0.7), first)


def test_path_dtype_shape_and_interval_checks():
    w = solvers.BrownianPath(0.0, 2.0, (4, 5), seed=0, dtype=torch.float32)
    dw = w(0.5, 1.5)
    assert dw.shape == (4, 5) and dw.dtype == torch.float32
    with pytest.raises(ValueError, match="t0 < t1"):
        solvers.BrownianPath(1.0, 1.0, (2, 2))


# ----------------------------------------------------------------------------------------------- the law


@pytest.mark.parametrize("a, b", [(0.0, 1.0), (0.1, 0.35), (0.5, 0.5013), (0.71, 0.93)])
def test_increments_are_centred_with_variance_dt(a, b):
    n = 40_000
    dw = path(seed=3, shape=(n // 4, 4))(a, b).flatten()
    dt = b - a
    # mean ~ N(0, dt/n); sample variance ~ dt (1 +- sqrt(2/n)): 5 standard errors each
    assert abs(float(dw.mean())) < 5 * math.sqrt(dt / n)
    assert abs(float(dw.var()) / dt - 1) < 5 * math.sqrt(2 / n)


def test_disjoint_increments_are_uncorrelated():
    n = 40_000
    w = path(seed=4, shape=(n,))
    x, y = w(0.0, 0.4), w(0.4, 1.0)
    correlation = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(n)


POWER = solvers.PowerGrid(0.001, 0.05, 30, 0.9)


@pytest.mark.parametrize("grid", [POWER, POWER.reversed()], ids=["power", "reversed"])
def test_fresh_increments_from_a_generator_have_variance_dt(grid):
    """dx = dW with every node saved: the steps of x are the drawn increments, of variance |dt_k|."""
    batch = 20_000
    every_node = solvers.SaveAt(t0=True, steps=True)
    sol = solvers.sdesolve(Noise(), torch.zeros(batch, 1, dtype=DTYPE), grid, save=every_node,
                           generator=torch.Generator().manual_seed(0))
    dw = torch.diff(sol.xs[..., 0], dim=0)  # (steps, batch)
    dt = np.abs(np.diff(grid.nodes()))
    ratio = (dw.var(dim=1) / torch.as_tensor(dt)).numpy()
    assert np.all(np.abs(ratio - 1) < 5 * math.sqrt(2 / batch))
    assert np.all(np.abs(dw.mean(dim=1).numpy()) < 5 * np.sqrt(dt / batch))


# --------------------------------------------------------------------------------------- solves on a path


def solve_on(w, grid, x0):
    return solvers.sdesolve(Nonlinear(), x0, grid, brownian=w, save=solvers.SaveAt(t0=True, steps=True)).xs


@pytest.mark.parametrize("grid", [solvers.UniformGrid(0.0, 1.0, 20), solvers.ProfileGrid(0.0, 1.0, 20)],
                         ids=["uniform", "profile"])
def test_euler_on_a_path_does_not_depend_on_the_query_order(grid):
    x0 = torch.linspace(-1.0, 1.0, 24, dtype=DTYPE).reshape(8, 3)
    reference = solve_on(path(seed=5), grid, x0)
    nodes = grid.nodes()
    scrambled = path(seed=5)
    increments(scrambled, nodes, reversed(range(grid.steps)))  # the whole grid queried backward first
    coarse_first = path(seed=5)
    coarse = grid.with_steps(5).nodes() if isinstance(grid, solvers.UniformGrid) else nodes[::4]
    increments(coarse_first, coarse, range(len(coarse) - 1))
    for w in (scrambled, coarse_first):
        assert torch.equal(solve_on(w, grid, x0), reference)
    assert not torch.equal(solve_on(path(seed=6), grid, x0), reference)


def test_same_path_on_nested_grids_sees_the_same_motion():
    """dx = dW: on any grid of the path's interval the solution at T is W(T) - W(0), to rounding."""
    w = path(seed=9)
    x0 = torch.zeros(8, 3, dtype=DTYPE)
    for grid in (solvers.UniformGrid(0.0, 1.0, 3), solvers.PowerGrid(0.0, 1.0, 17),
                 solvers.ProfileGrid(0.0, 1.0, 9)):
        xs = solvers.sdesolve(Noise(), x0, grid, brownian=w).xs
        torch.testing.assert_close(xs[-1], w(0.0, 1.0), rtol=0, atol=1e-12)


def test_a_reversed_solve_on_the_same_path_undoes_the_noise():
    w, grid = path(seed=10), solvers.PowerGrid(0.0, 1.0, 12)
    x0 = torch.randn(8, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    there = solvers.sdesolve(Noise(0.7), x0, grid, brownian=w).xs[-1]
    back = solvers.sdesolve(Noise(0.7), there, grid.reversed(), brownian=w).xs[-1]
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-12)


def test_a_torchsde_brownian_interval_drives_a_solve():
    bm = torchsde.BrownianInterval(0.0, 1.0, size=(8, 3), dtype=DTYPE, entropy=3)
    grid = solvers.UniformGrid(0.0, 1.0, 10)
    xs = solvers.sdesolve(Noise(), torch.zeros(8, 3, dtype=DTYPE), grid, brownian=bm).xs
    torch.testing.assert_close(xs[-1], bm(0.0, 1.0), rtol=0, atol=1e-12)
