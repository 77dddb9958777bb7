"""The contract of :func:`solvers.sdesolve` with Euler–Maruyama: shapes, dtypes and finite values over
noise types x grids x dtypes, invariances (equal grids, equal SDE spellings, seeds), clear errors, and
memory that does not grow with the number of steps."""

from __future__ import annotations

import gc
import math
import re
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import solvers

BATCH, DIM, M = 5, 3, 2


class Diagonal(solvers.SDE):
    noise_type = solvers.NoiseType.DIAGONAL

    def drift(self, t, x):
        return -x + torch.sin(t)

    def diffusion(self, t, x):
        return 0.2 + 0.1 * torch.tanh(x)


class Scalar(solvers.SDE):
    noise_type = solvers.NoiseType.SCALAR

    def drift(self, t, x):
        return -0.5 * x * (1 + t)

    def diffusion(self, t, x):
        return (0.3 * torch.cos(x)).unsqueeze(-1)


class General(solvers.SDE):
    noise_type = solvers.NoiseType.GENERAL

    def drift(self, t, x):
        return torch.tanh(x) - x

    def diffusion(self, t, x):
        c = torch.linspace(-0.3, 0.3, DIM * M, dtype=x.dtype).reshape(DIM, M)
        return 0.1 + torch.sigmoid(x).unsqueeze(-1) * c


class Additive(solvers.SDE):
    noise_type = solvers.NoiseType.ADDITIVE

    def drift(self, t, x):
        return -2.0 * x

    def diffusion(self, t, x):
        s = torch.tensor([[0.3, 0.0], [0.1, 0.2], [0.0, 0.4]], dtype=x.dtype)
        return s.expand(x.shape[0], DIM, M)


SDES = {"diagonal": Diagonal, "scalar": Scalar, "general": General, "additive": Additive}
GRIDS = {
    "uniform": solvers.UniformGrid(0.0, 1.0, 12),
    "power": solvers.PowerGrid(0.001, 0.05, 30, 0.9),
    "profile": solvers.ProfileGrid(0.0, 1.0, 16),
    "explicit": solvers.ExplicitGrid([0.0, 0.05, 0.2, 0.21, 0.6, 1.0]),
    "stratified": solvers.PowerGrid(0.01, 1.0, 10).stratified().sample(torch.Generator().manual_seed(0)),
    "reversed": solvers.PowerGrid(0.001, 1.0, 15).reversed(),
}
SAVES = {
    "final": (solvers.SaveAt(), lambda n: [n]),
    "ends": (solvers.SaveAt(t0=True), lambda n: [0, n]),
    "all": (solvers.SaveAt(t0=True, steps=True), lambda n: list(range(n + 1))),
    "steps": (solvers.SaveAt(steps=True), lambda n: list(range(1, n + 1))),
    "every4": (solvers.SaveAt(every=4), lambda n: sorted(set(range(0, n + 1, 4)) | {n})),
    "start": (solvers.SaveAt(t0=True, t1=False), lambda n: [0]),
}


def x0_for(dtype=torch.float64, batch=BATCH):
    return torch.linspace(-1.0, 1.0, batch * DIM, dtype=dtype).reshape(batch, DIM)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("noise", sorted(SDES))
def test_shapes_dtypes_and_finite_values(noise, grid_name, dtype, device):
    sde, grid = SDES[noise](), GRIDS[grid_name]
    x0 = x0_for(dtype).to(device)
    n = grid.steps
    for save_name, (save, indices) in SAVES.items():
        sol = solvers.sdesolve(sde, x0, grid, save=save, generator=seeded())
        expected = indices(n)
        assert isinstance(sol, solvers.Solution)
        assert sol.xs.shape == (len(expected), BATCH, DIM), save_name
        assert sol.ts.shape == (len(expected),), save_name
        assert sol.xs.dtype == dtype and sol.ts.dtype == dtype and sol.xs.device == x0.device
        assert torch.equal(sol.ts, grid.times(dtype)[expected]), save_name
        assert bool(torch.isfinite(sol.xs).all()), save_name
        assert sol.cost is None
        assert sol.stats.steps == n and sol.stats.rejected_steps == 0
        assert sol.stats.drift_evals == n and sol.stats.diffusion_evals == n
        if 0 in expected:
            assert torch.equal(sol.xs[0], x0)
        else:
            assert not torch.equal(sol.xs[0], x0)


def test_the_time_a_drift_sees_is_the_grid_node_in_the_state_dtype():
    seen = []

    class Recorder(Diagonal):
        def drift(self, t, x):
            seen.append(t)
            return super().drift(t, x)

    grid = GRIDS["power"]
    solvers.sdesolve(Recorder(), x0_for(torch.float32), grid, generator=seeded())
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in seen)
    assert torch.equal(torch.stack(seen), grid.times(torch.float32)[:-1])


# --------------------------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("noise", sorted(SDES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_an_explicit_grid_equal_to_a_uniform_grid_gives_bit_identical_results(noise, dtype):
    uniform = solvers.UniformGrid(0.0, 1.0, 25)
    explicit = solvers.ExplicitGrid(uniform.nodes())
    sde, x0, save = SDES[noise](), x0_for(dtype), solvers.SaveAt(t0=True, steps=True)
    a = solvers.sdesolve(sde, x0, uniform, save=save, generator=seeded(3))
    b = solvers.sdesolve(sde, x0, explicit, save=save, generator=seeded(3))
    assert torch.equal(a.xs, b.xs) and torch.equal(a.ts, b.ts)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.drift_net = nn.Sequential(nn.Linear(DIM + 1, 16), nn.Tanh(), nn.Linear(16, DIM)).double()
        self.log_sigma = nn.Parameter(torch.full((DIM,), -1.0, dtype=torch.float64))

    def drift(self, t, x):
        return self.drift_net(torch.cat([x, t.expand(x.shape[0], 1)], 1))

    def diffusion(self, t, x):
        return self.log_sigma.exp() * (1 + x.pow(2)).sqrt()


class TorchsdeStyle(nn.Module):
    """What a torchsde user writes: f, g, noise_type, sde_type and nothing else."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def f(self, t, y):
        return self.net.drift(t, y)

    def g(self, t, y):
        return self.net.diffusion(t, y)


class Subclass(solvers.SDE):
    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def drift(self, t, x):
        return self.net.drift(t, x)

    def diffusion(self, t, x):
        return self.net.diffusion(t, x)


@pytest.mark.parametrize("grid_name", ["uniform", "power", "reversed"])
def test_a_torchsde_style_module_and_an_sde_subclass_give_identical_results(grid_name):
    net, grid, x0 = Net(), GRIDS[grid_name], x0_for(torch.float64)
    save = solvers.SaveAt(t0=True, steps=True)
    a = solvers.sdesolve(TorchsdeStyle(net), x0, grid, save=save, generator=seeded(1))
    b = solvers.sdesolve(Subclass(net), x0, grid, save=save, generator=seeded(1))
    assert torch.equal(a.xs, b.xs)
    wrapped = solvers.as_sde(TorchsdeStyle(net))
    assert isinstance(wrapped, solvers.SDE) and wrapped.noise_type is solvers.NoiseType.DIAGONAL
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in net.parameters()}
    # and the other way round: our SDE is a torchsde SDE on (batch, d) states
    t = torch.tensor(0.5, dtype=torch.float64)
    assert torch.equal(Subclass(net).f(t, x0), net.drift(t, x0))


@pytest.mark.parametrize("noise", sorted(SDES))
def test_same_seed_same_result_different_seed_different_result(noise):
    sde, grid, x0 = SDES[noise](), GRIDS["profile"], x0_for()
    a = solvers.sdesolve(sde, x0, grid, generator=seeded(5)).xs
    b = solvers.sdesolve(sde, x0, grid, generator=seeded(5)).xs
    c = solvers.sdesolve(sde, x0, grid, generator=seeded(6)).xs
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_without_a_generator_the_global_seed_decides():
    sde, grid, x0 = Diagonal(), GRIDS["uniform"], x0_for()
    torch.manual_seed(11)
    a = solvers.sdesolve(sde, x0, grid).xs
    torch.manual_seed(11)
    b = solvers.sdesolve(sde, x0, grid).xs
    assert torch.equal(a, b)


def test_saving_more_nodes_does_not_change_the_path():
    sde, grid, x0 = General(), GRIDS["power"], x0_for()
    every_node = solvers.SaveAt(t0=True, steps=True)
    everything = solvers.sdesolve(sde, x0, grid, save=every_node, generator=seeded(2))
    final = solvers.sdesolve(sde, x0, grid, generator=seeded(2))
    assert torch.equal(everything.xs[-1], final.xs[-1])


# ------------------------------------------------------------------------------------------------- errors


def test_wrong_diffusion_shape_names_expected_and_actual_shapes():
    class BadDiagonal(Diagonal):
        def diffusion(self, t, x):
            return torch.ones(BATCH, DIM + 1, dtype=x.dtype)

    class BadScalar(Scalar):
        def diffusion(self, t, x):
            return torch.ones_like(x)

    class BadGeneral(General):
        def diffusion(self, t, x):
            return torch.ones(BATCH, DIM + 1, M, dtype=x.dtype)

    cases = [(BadDiagonal, "(5, 3)", "got (5, 4)"), (BadScalar, "(5, 3, 1)", "got (5, 3)"),
             (BadGeneral, "(5, 3, 'm')", "got (5, 4, 2)")]
    for sde_class, expected, actual in cases:
        with pytest.raises(ValueError, match="diffusion") as info:
            solvers.sdesolve(sde_class(), x0_for(), GRIDS["uniform"], generator=seeded())
        assert expected in str(info.value) and actual in str(info.value), str(info.value)


def test_a_broadcastable_diagonal_diffusion_is_accepted():
    class Constant(Diagonal):
        def diffusion(self, t, x):
            return torch.tensor([0.1, 0.2, 0.3], dtype=x.dtype)

    sol = solvers.sdesolve(Constant(), x0_for(), GRIDS["uniform"], generator=seeded())
    assert sol.xs.shape == (1, BATCH, DIM)


def test_wrong_drift_shape_and_type():
    class Narrow(Diagonal):
        def drift(self, t, x):
            return x[:, :2]

    class NotATensor(Diagonal):
        def drift(self, t, x):
            return 0.0

    with pytest.raises(ValueError, match=re.escape("state's shape (5, 3), got (5, 2)")):
        solvers.sdesolve(Narrow(), x0_for(), GRIDS["uniform"], generator=seeded())
    with pytest.raises(ValueError, match="got float"):
        solvers.sdesolve(NotATensor(), x0_for(), GRIDS["uniform"], generator=seeded())


def test_drift_dtype_mismatch():
    class Single(Diagonal):
        def drift(self, t, x):
            return super().drift(t, x).float()

    with pytest.raises(ValueError, match="torch.float32.*torch.float64"):
        solvers.sdesolve(Single(), x0_for(torch.float64), GRIDS["uniform"], generator=seeded())


def test_a_stratified_grid_must_be_sampled_first():
    with pytest.raises(TypeError, match=re.escape("grid.sample(generator)")):
        solvers.sdesolve(Diagonal(), x0_for(), solvers.UniformGrid(0.0, 1.0, 5).stratified())
    with pytest.raises(TypeError, match="solvers.Grid"):
        solvers.sdesolve(Diagonal(), x0_for(), torch.linspace(0, 1, 5))


@pytest.mark.parametrize(
    "x0, error, message",
    [
        ([[0.0, 1.0]], TypeError, "torch.Tensor, got list"),
        (np.zeros((2, 3)), TypeError, "torch.Tensor, got ndarray"),
        (torch.zeros(2, 3, dtype=torch.int64), TypeError, "floating dtype, got torch.int64"),
        (torch.zeros(3), ValueError, "(batch, *dims)"),
        (torch.tensor([[0.0, math.nan, 1.0]]), ValueError, "NaN"),
        (torch.tensor([[0.0, math.inf, 1.0]]), ValueError, "infinite"),
    ],
    ids=["list", "ndarray", "int", "1-D", "nan", "inf"],
)
def test_invalid_initial_states(x0, error, message):
    with pytest.raises(error, match=re.escape(message)):
        solvers.sdesolve(Diagonal(), x0, GRIDS["uniform"], generator=seeded())


def test_generator_and_brownian_together_are_refused():
    w = solvers.BrownianPath(0.0, 1.0, (BATCH, DIM), dtype=torch.float64)
    with pytest.raises(ValueError, match="not both"):
        solvers.sdesolve(Diagonal(), x0_for(), GRIDS["uniform"], generator=seeded(), brownian=w)


@pytest.mark.parametrize("noise, shape", [("diagonal", (BATCH, DIM + 1)), ("general", (BATCH, M + 1)),
                                          ("scalar", (BATCH, 2))])
def test_brownian_increments_of_the_wrong_size(noise, shape):
    w = solvers.BrownianPath(0.0, 1.0, shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(f"increment of shape {shape}")):
        solvers.sdesolve(SDES[noise](), x0_for(), GRIDS["uniform"], brownian=w)


@pytest.mark.parametrize("blowup", ["inf", "nan"])
@pytest.mark.parametrize("grid_name", ["uniform", "reversed"])
def test_a_blow_up_names_the_step_that_produced_it(blowup, grid_name):
    """The drift fails at node k - 1 (inf or NaN from there on): the state after step k, at node k, is the
    first one that is not finite, and the error names step k and its time."""
    grid, k = GRIDS[grid_name], 4
    nodes = grid.nodes()
    bad_from = nodes[k - 1]

    class BlowUp(Diagonal):
        def drift(self, t, x):
            reached = t >= bad_from if grid.increasing else t <= bad_from
            return torch.where(reached, torch.full_like(x, math.nan if blowup == "nan" else math.inf), -x)

    x0 = x0_for()
    with pytest.raises(FloatingPointError, match=f"at step {k} ") as info:
        solvers.sdesolve(BlowUp(), x0, grid, generator=seeded())
    assert f"t={nodes[k]:.6g}" in str(info.value)
    # check_finite=False skips the check (and its replay)
    sol = solvers.sdesolve(BlowUp(), x0, grid, generator=seeded(), check_finite=False)
    assert not bool(torch.isfinite(sol.xs).all())


def test_a_blow_up_with_the_global_generator_is_reported_the_same_way():
    grid = GRIDS["uniform"]
    bad_from = grid.nodes()[6]

    class BlowUp(Diagonal):
        def diffusion(self, t, x):
            return torch.where(t >= bad_from, torch.full_like(x, math.nan), torch.full_like(x, 0.1))

    with pytest.raises(FloatingPointError, match="at step 7 "):
        solvers.sdesolve(BlowUp(), x0_for(), grid)


def test_a_submodule_or_tensor_named_f_or_g_is_refused():
    sde = Diagonal()
    with pytest.raises(AttributeError, match="'f'"):
        sde.f = nn.Linear(3, 3)
    with pytest.raises(AttributeError, match="'g'"):
        sde.g = nn.Parameter(torch.ones(3))
    sde.f_net = nn.Linear(3, 3)  # the suggested name is fine

    class Init(solvers.SDE):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(3, 3)

    with pytest.raises(AttributeError, match="torchsde"):
        Init()


def test_euler_maruyama_refuses_a_stratonovich_sde():
    class Strat(Diagonal):
        sde_type = solvers.SDEType.STRATONOVICH

    with pytest.raises(ValueError, match="Itô.*Stratonovich"):
        solvers.sdesolve(Strat(), x0_for(), GRIDS["uniform"], generator=seeded())

    class TorchsdeStrat(TorchsdeStyle):
        sde_type = "stratonovich"

    with pytest.raises(ValueError, match="Stratonovich"):
        solvers.sdesolve(TorchsdeStrat(Net()), x0_for(), GRIDS["uniform"], generator=seeded())


def test_objects_that_are_not_sdes_are_refused_by_name():
    class HalfTorchsde(nn.Module):
        noise_type = "diagonal"

        def f(self, t, y):
            return y

    with pytest.raises(TypeError, match="lacks g, sde_type"):
        solvers.sdesolve(HalfTorchsde(), x0_for(), GRIDS["uniform"])

    class Misspelt(Diagonal):
        noise_type = "diagonl"

    with pytest.raises(ValueError, match="diagonl"):
        solvers.sdesolve(Misspelt(), x0_for(), GRIDS["uniform"])


# ------------------------------------------------------------------------------------------------- memory


def live_states_during_solve(steps: int) -> int:
    """Most states alive at once while a no-grad, final-state-only solve runs (weak references)."""
    refs: list[weakref.ref] = []
    most = 0

    class Watched(Diagonal):
        def drift(self, t, x):
            nonlocal most
            refs.append(weakref.ref(x))
            most = max(most, sum(r() is not None for r in refs[-50:]))  # a leak keeps recent states alive
            return super().drift(t, x)

    x0 = x0_for()
    with torch.no_grad():
        sol = solvers.sdesolve(Watched(), x0, solvers.UniformGrid(0.0, 1.0, steps), generator=seeded())
    assert sol.xs.shape == (1, BATCH, DIM)
    gc.collect()
    assert sum(r() is not None for r in refs) <= 1  # only x0 (held here) outlives the solve
    return most


def test_states_are_not_kept_alive_by_a_final_state_solve():
    assert live_states_during_solve(100) <= 2  # x0 (the caller's) and the current state
    assert live_states_during_solve(1000) <= 2


PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch, solvers
    torch.set_num_threads(1)

    class OU(solvers.SDE):
        def drift(self, t, x):
            return -x

        def diffusion(self, t, x):
            return torch.full_like(x, 0.5)

    x0 = torch.zeros(256, 512, dtype=torch.float64)  # 1 MiB per state
    peaks = []
    for steps in (10, 10, 100):  # the first solve warms torch and the allocator up
        with torch.no_grad():
            solvers.sdesolve(OU(), x0, solvers.UniformGrid(0.0, 1.0, steps),
                             generator=torch.Generator().manual_seed(0))
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    print(peaks[1], peaks[2])
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_peak_memory_of_a_final_state_solve_does_not_grow_with_steps():
    """Peak resident memory of a fresh process: 100 steps of a 1 MiB state need no more than 10 steps
    (keeping the states would add 90 MiB). CPU tensors are invisible to tracemalloc, hence ru_maxrss."""
    script = [sys.executable, "-c", PEAK_MEMORY_SCRIPT]
    out = subprocess.run(script, capture_output=True, text=True, check=True, timeout=120)
    short, long = (int(v) for v in out.stdout.split())
    assert long - short < 16 * 1024, f"peak RSS grew by {(long - short) / 1024:.1f} MiB from 10 to 100 steps"
