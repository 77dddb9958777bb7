"""Time grids: validation, exact end points, monotonicity, the documented step sizes, reversal, and
reproducible stratified random grids."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import numpy as np
import pytest
import torch

import solvers

FORWARD_GRIDS = {
    "uniform": solvers.UniformGrid(0.0, 1.0, 20),
    "power": solvers.PowerGrid(0.001, 0.05, 30, 0.9),
    "profile": solvers.ProfileGrid(0.0, 1.0, 25),
    "explicit": solvers.ExplicitGrid([0.0, 0.1, 0.15, 0.4, 0.8, 1.0]),
}


def draw(grid, seed: int) -> solvers.ExplicitGrid:
    return grid.stratified().sample(torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: solvers.UniformGrid(math.nan, 1.0, 10), "finite"),
        (lambda: solvers.UniformGrid(0.0, math.inf, 10), "finite"),
        (lambda: solvers.UniformGrid(1.0, 1.0, 10), "t0=1.0 is not below t1=1.0"),
        (lambda: solvers.UniformGrid(1.0, 0.0, 10), "strictly increasing"),
        (lambda: solvers.UniformGrid(0.0, 1.0, 0), "steps"),
        (lambda: solvers.UniformGrid(0.0, 1.0, -3), "steps"),
        (lambda: solvers.UniformGrid(0.0, 1.0, 2.5), "integer number of steps"),
        (lambda: solvers.UniformGrid(0.0, 1.0, 10.0), "integer number of steps"),
        (lambda: solvers.UniformGrid(0.0, 1.0, True), "integer number of steps"),
        (lambda: solvers.PowerGrid(-0.1, 1.0, 10), "t0 >= 0"),
        (lambda: solvers.PowerGrid(0.0, 1.0, 10, exponent=0.0), "exponent"),
        (lambda: solvers.PowerGrid(0.0, 1.0, 10, exponent=math.nan), "exponent"),
        (lambda: solvers.PowerGrid(0.5, 0.1, 10), "strictly increasing"),
        (lambda: solvers.ProfileGrid(0.0, 1.0, 0), "steps"),
        (lambda: solvers.ProfileGrid(0.0, 1.0, 5, knots=((0.0, 1.0), (0.5, -1.0), (1.0, 1.0))), "positive"),
        (lambda: solvers.ProfileGrid(0.0, 1.0, 5, knots=((0.1, 1.0), (1.0, 1.0))), "from 0 to 1"),
        (lambda: solvers.ExplicitGrid([0.0, math.nan, 1.0]), "finite; time 1 is nan"),
        (lambda: solvers.ExplicitGrid([0.0, 0.5, math.inf]), "finite; time 2 is inf"),
        (lambda: solvers.ExplicitGrid([0.0, 0.5, 0.5, 1.0]), "strictly increasing; t[1]=0.5 >= t[2]=0.5"),
        (lambda: solvers.ExplicitGrid([0.0, 0.7, 0.3, 1.0]), "strictly increasing; t[1]=0.7 >= t[2]=0.3"),
        (lambda: solvers.ExplicitGrid([1.0, 0.0]), "strictly increasing"),
        (lambda: solvers.ExplicitGrid([0.0]), "at least 2"),
        (lambda: solvers.ExplicitGrid([[0.0, 1.0]]), "1-D"),
        (lambda: solvers.ExplicitGrid(torch.tensor([0.0, 2.0, 1.0])), "strictly increasing"),
        (lambda: solvers.UniformGrid(0.0, 1.0, 10).with_steps(0), "steps"),
        (lambda: solvers.ExplicitGrid([0.0, 1.0]).with_steps(1.5), "integer number of steps"),
    ],
)
def test_invalid_grids_raise_value_errors_naming_the_problem(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# ------------------------------------------------------------------------------------------- forward grids


@pytest.mark.parametrize("name", sorted(FORWARD_GRIDS))
def test_forward_grids_are_increasing_with_exact_end_points(name):
    grid = FORWARD_GRIDS[name]
    nodes = grid.nodes()
    assert nodes.dtype == np.float64 and nodes.shape == (grid.steps + 1,)
    assert np.all(np.diff(nodes) > 0)
    assert nodes[0] == grid.t0 and nodes[-1] == grid.t1  # exact, not approximately
    assert grid.increasing
    ts = grid.times(torch.float32)
    assert ts.dtype == torch.float32 and ts.shape == (grid.steps + 1,)


@pytest.mark.parametrize("t0, t1, steps", [(0.0, 1.0, 3), (0.1, 0.7, 3), (1e-3, 0.05, 7), (-2.0, 3.3, 11)])
def test_uniform_grid_end_points_are_exact_and_steps_equal(t0, t1, steps):
    nodes = solvers.UniformGrid(t0, t1, steps).nodes()
    assert nodes[0] == t0 and nodes[-1] == t1
    np.testing.assert_allclose(np.diff(nodes), (t1 - t0) / steps, rtol=1e-12)


def test_power_grid_matches_the_method_note():
    """DiffFlow's 2D setting: PowerGrid(0.001, 0.05, 30, 0.9) steps grow from ~0.00127 to ~0.00179."""
    grid = solvers.PowerGrid(0.001, 0.05, 30, 0.9)
    nodes = grid.nodes()
    steps = np.diff(nodes)
    assert len(steps) == 30
    assert steps[0] == pytest.approx(0.00127, abs=5e-6)
    assert steps[-1] == pytest.approx(0.00179, abs=5e-6)
    assert np.all(np.diff(steps) > 0)  # exponent < 1: steps grow with t
    assert nodes[0] == 0.001 and nodes[-1] == 0.05
    u = nodes**0.9
    np.testing.assert_allclose(np.diff(u), (0.05**0.9 - 0.001**0.9) / 30, rtol=1e-10)  # uniform in t^0.9


def test_power_grid_with_exponent_one_is_uniform():
    power, uniform = solvers.PowerGrid(0.0, 2.0, 8, 1.0), solvers.UniformGrid(0.0, 2.0, 8)
    np.testing.assert_allclose(power.nodes(), uniform.nodes(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("steps", [1, 2, 10, 100, 1000])
def test_profile_grid_steps_grow_from_the_smallest_first_step(steps):
    grid = solvers.ProfileGrid(0.0, 1.0, steps)
    nodes = grid.nodes()
    assert nodes[0] == 0.0 and nodes[-1] == 1.0
    sizes = np.diff(nodes)
    assert np.all(sizes > 0)
    assert sizes[0] == sizes.min()
    assert np.all(np.diff(sizes) >= -1e-15)  # the default profile increases
    if steps >= 10:
        assert sizes[0] < sizes[-1] / 10


def test_profile_grid_with_flat_knots_is_uniform():
    grid = solvers.ProfileGrid(0.0, 3.0, 6, knots=((0.0, 2.0), (1.0, 2.0)))
    np.testing.assert_allclose(grid.nodes(), solvers.UniformGrid(0.0, 3.0, 6).nodes(), atol=1e-15)


@pytest.mark.parametrize("name", sorted(FORWARD_GRIDS))
@pytest.mark.parametrize("steps", [1, 7, 64])
def test_with_steps_keeps_kind_and_interval(name, steps):
    grid = FORWARD_GRIDS[name]
    other = grid.with_steps(steps)
    assert type(other) is type(grid)
    assert other.steps == steps
    nodes = other.nodes()
    assert nodes[0] == grid.t0 and nodes[-1] == grid.t1
    assert np.all(np.diff(nodes) > 0)
    assert grid.with_steps(grid.steps) == grid


def test_explicit_grid_is_an_immutable_value():
    source = np.array([0.0, 0.25, 1.0])
    grid = solvers.ExplicitGrid(source)
    source[1] = 0.9  # the grid copied its input
    assert grid.nodes()[1] == 0.25
    with pytest.raises(ValueError):
        grid.nodes()[1] = 0.5
    assert grid == solvers.ExplicitGrid([0.0, 0.25, 1.0])
    assert hash(grid) == hash(solvers.ExplicitGrid(grid.nodes()))
    assert grid != solvers.ExplicitGrid([0.0, 0.5, 1.0])


@pytest.mark.parametrize("name", sorted(FORWARD_GRIDS))
def test_times_is_a_copy_without_warnings(name):
    grid = FORWARD_GRIDS[name]
    before = grid.nodes().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about a non-writable NumPy array
        ts = grid.times()
    ts += 1.0
    np.testing.assert_array_equal(grid.nodes(), before)


def test_dataclass_grids_are_frozen():
    grid = solvers.UniformGrid(0.0, 1.0, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.steps = 5  # type: ignore[misc]
    assert grid == solvers.UniformGrid(0.0, 1.0, 4) and hash(grid) == hash(solvers.UniformGrid(0.0, 1.0, 4))


# ------------------------------------------------------------------------------------------ reversed grids


@pytest.mark.parametrize("name", sorted(FORWARD_GRIDS))
def test_reversed_grid_visits_the_same_nodes_backward(name):
    grid = FORWARD_GRIDS[name]
    back = grid.reversed()
    assert isinstance(back, solvers.ReversedGrid)
    np.testing.assert_array_equal(back.nodes(), grid.nodes()[::-1])
    assert back.t0 == grid.t1 and back.t1 == grid.t0 and back.steps == grid.steps
    assert not back.increasing
    assert back.reversed() == grid
    assert np.all(np.diff(back.nodes()) < 0)
    resampled = back.with_steps(5)
    assert isinstance(resampled, solvers.ReversedGrid) and resampled.steps == 5
    np.testing.assert_array_equal(resampled.nodes(), grid.with_steps(5).nodes()[::-1])


def test_reversed_grid_cannot_be_stratified():
    back = solvers.UniformGrid(0.0, 1.0, 10).reversed()
    with pytest.raises(ValueError, match="stratify the forward grid"):
        back.stratified()
    with pytest.raises(ValueError, match="stratify the forward grid"):
        solvers.StratifiedGrid(back)


def test_a_stratified_draw_can_be_reversed():
    sample = draw(solvers.UniformGrid(0.0, 1.0, 10), seed=0)
    back = sample.reversed()
    np.testing.assert_array_equal(back.nodes(), sample.nodes()[::-1])


# ---------------------------------------------------------------------------------------- stratified grids


@pytest.mark.parametrize("name", sorted(FORWARD_GRIDS))
def test_stratified_draws_are_reproducible_per_seed(name):
    grid = FORWARD_GRIDS[name]
    a, b, c = draw(grid, 1), draw(grid, 1), draw(grid, 2)
    assert isinstance(a, solvers.ExplicitGrid) and a.steps == grid.steps
    np.testing.assert_array_equal(a.nodes(), b.nodes())
    assert not np.array_equal(a.nodes(), c.nodes())
    g = torch.Generator().manual_seed(1)
    first, second = grid.stratified().sample(g), grid.stratified().sample(g)
    assert not np.array_equal(first.nodes(), second.nodes())  # a generator's successive draws differ


@pytest.mark.parametrize("name", sorted(FORWARD_GRIDS))
def test_stratified_nodes_stay_in_their_cells(name):
    grid = FORWARD_GRIDS[name]
    u = grid.warp(grid.nodes())
    lo = grid.unwarp(0.5 * (u[:-2] + u[1:-1]))
    hi = grid.unwarp(0.5 * (u[1:-1] + u[2:]))
    for seed in range(50):
        nodes = draw(grid, seed).nodes()
        assert nodes[0] == grid.t0 and nodes[-1] == grid.t1
        assert np.all(np.diff(nodes) > 0)
        interior = nodes[1:-1]
        assert np.all(interior >= lo * (1 - 1e-12)) and np.all(interior <= hi * (1 + 1e-12))


@pytest.mark.parametrize("name", ["uniform", "power"])
def test_stratified_mean_is_the_base_grid(name):
    """Evenly spaced in the warped coordinate, each cell is centred on its base node: E[u_i] = u_i."""
    grid, draws = FORWARD_GRIDS[name], 2000
    u = grid.warp(grid.nodes())
    samples = np.stack([grid.warp(draw(grid, seed).nodes()) for seed in range(draws)])
    width = 0.5 * (u[2:] - u[:-2])
    standard_error = width / math.sqrt(12 * draws)
    assert np.all(np.abs(samples.mean(0)[1:-1] - u[1:-1]) < 5 * standard_error)
    assert np.all(samples.std(0)[1:-1] == pytest.approx(width / math.sqrt(12), rel=0.1))


def test_stratified_mean_is_close_to_an_uneven_base_grid():
    grid, draws = FORWARD_GRIDS["profile"], 1000
    nodes = grid.nodes()
    mean = np.stack([draw(grid, seed).nodes() for seed in range(draws)]).mean(0)
    # node i's cell is centred at (t_{i-1} + 2 t_i + t_{i+1}) / 4: off by a quarter of the step change
    tolerance = 0.25 * np.abs(np.diff(nodes, 2)) + 5 * np.diff(nodes)[1:] / math.sqrt(12 * draws)
    assert np.all(np.abs(mean[1:-1] - nodes[1:-1]) <= tolerance + 1e-15)


def test_stratified_grid_with_steps_and_one_step_bases():
    base = solvers.PowerGrid(0.001, 0.05, 30)
    assert base.stratified().with_steps(10).steps == 10
    for one_step in (solvers.UniformGrid(0.0, 1.0, 1), solvers.ExplicitGrid([0.0, 1.0])):
        np.testing.assert_array_equal(draw(one_step, 0).nodes(), [0.0, 1.0])
