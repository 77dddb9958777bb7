"""Learn the drift of an Ornstein–Uhlenbeck process from simulated paths, with `solvers` alone.

The true process, on states x in R^2, with one rate per coordinate (theta_1, theta_2)::

    dx = theta * (mu - x) dt + sigma dW

1. Simulate PATHS paths on a uniform grid with `solvers.sdesolve`, keeping every node
   (`SaveAt(t0=True, steps=True)`). These are the observations.
2. Fit a small MLP drift f(t, x) -> R^2 and a scalar sigma by maximum likelihood. Under the
   Euler–Maruyama discretisation each observed increment is Gaussian given where it starts::

       x_{k+1} | x_k ~ N(x_k + f(t_k, x_k) dt, sigma^2 dt I)

   so the negative log-likelihood of one transition is |dx - f dt|^2 / (2 sigma^2 dt) + D log sigma + const.
3. Check the fit three ways: the learned drift against theta (mu - x) on a lattice of points; the
   stationary mean and variance of the fitted SDE (simulated with `sdesolve`) against the closed forms
   mu and sigma^2 / (2 theta); and the sensitivity d x(t) / d x(0) of the fitted SDE, taken through the
   solve by `solvers.DiscreteAdjoint`, against exp(-theta t).

The drift is the hard part: its statistical error shrinks like 1 / sqrt(total observed time), whatever dt,
while sigma is pinned by the increments' quadratic variation almost at once.

Run:  python examples/fit_ou_drift.py            (about 15 s on one CPU core)
      python examples/fit_ou_drift.py --help
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor, nn

import solvers

# -- defaults (each one is also a command-line flag) -----------------------------------------------------
THETA = (1.0, 2.0)  # mean-reversion rate of each coordinate, 1/time
MU = (1.0, -0.5)  # long-run mean
SIGMA = 0.5  # noise level, the same for both coordinates
PATHS = 1024  # observed paths
HORIZON = 4.0  # each path covers [0, HORIZON]
STEPS = 200  # Euler–Maruyama steps per path: dt = HORIZON / STEPS, also the observation interval
START_SPREAD = 2.0  # paths start uniformly in mu +- START_SPREAD, so the drift is also seen away from mu
WIDTH = 64  # hidden width of the drift MLP
ITERATIONS = 500  # Adam steps on the negative log-likelihood
BATCH = 4096  # transitions per Adam step, drawn at random from all PATHS * STEPS
LR = 1e-2  # Adam learning rate, decayed tenfold over the run (cosine)
CHECK_PATHS = 4000  # paths simulated from the fitted SDE for the moment and sensitivity checks
STATIONARY_HORIZON = 6.0  # long enough for exp(-min(theta) t) to be negligible
SENSITIVITY_HORIZON = 1.0  # t at which d x(t) / d x(0) is compared with exp(-theta t)
SEED = 0  # seeds the data, the initialisation, the minibatches and the check simulations
THREADS = 1  # torch CPU threads: batches this small gain nothing from more (0: torch's default)


class OrnsteinUhlenbeck(solvers.SDE):
    """The true SDE: diagonal noise, the same sigma on each coordinate."""

    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, theta: Tensor, mu: Tensor, sigma: float):
        super().__init__()
        self.theta, self.mu, self.sigma = theta, mu, sigma

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.theta * (self.mu - x)

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.full_like(x, self.sigma)


class NeuralSDE(solvers.SDE):
    """The model: an MLP drift of (t, x) and one learnable sigma, stored as its log to stay positive.

    The network is called ``drift_net``: an SDE may not hold a module named ``f`` or ``g``, which are
    torchsde's method names (see docs/solvers.md).
    """

    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, dim: int, width: int, horizon: float):
        super().__init__()
        self.drift_net = nn.Sequential(
            nn.Linear(dim + 1, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, dim),
        )
        self.log_sigma = nn.Parameter(torch.zeros(()))
        self.horizon = horizon  # time enters the network as t / horizon, in [0, 1]

    def drift_at(self, t: Tensor, x: Tensor) -> Tensor:
        """The drift with one time per row: ``t`` ``(batch,)``, ``x`` ``(batch, dim)``."""
        return self.drift_net(torch.cat([(t / self.horizon)[:, None], x], dim=1))

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        # inside a solve t is 0-dim: the same time for every row
        return self.drift_at(t.expand(x.shape[0]), x)

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return self.log_sigma.exp().expand_as(x)


def transition_nll(model: NeuralSDE, t: Tensor, x: Tensor, x_next: Tensor, dt: float) -> Tensor:
    """Mean negative Euler–Maruyama log-likelihood of the transitions ``x -> x_next`` (rows), in nats."""
    mean = x + model.drift_at(t, x) * dt
    variance = torch.exp(2 * model.log_sigma) * dt
    dim = x.shape[1]
    nll = 0.5 * (x_next - mean).pow(2).sum(1) / variance + 0.5 * dim * torch.log(2 * math.pi * variance)
    return nll.mean()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--theta", type=float, nargs=2, default=THETA, help="mean-reversion rates")
    p.add_argument("--mu", type=float, nargs=2, default=MU, help="long-run mean")
    p.add_argument("--sigma", type=float, default=SIGMA, help="noise level")
    p.add_argument("--paths", type=int, default=PATHS, help="observed paths")
    p.add_argument("--horizon", type=float, default=HORIZON, help="length of each observed path")
    p.add_argument("--steps", type=int, default=STEPS, help="observation steps per path")
    p.add_argument("--start-spread", type=float, default=START_SPREAD, help="paths start in mu +- this")
    p.add_argument("--width", type=int, default=WIDTH, help="hidden width of the drift MLP")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="Adam steps")
    p.add_argument("--batch", type=int, default=BATCH, help="transitions per Adam step")
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate")
    p.add_argument("--check-paths", type=int, default=CHECK_PATHS, help="paths for the fitted-SDE checks")
    p.add_argument("--stationary-horizon", type=float, default=STATIONARY_HORIZON, help="t of the moment check")
    p.add_argument("--sensitivity-horizon", type=float, default=SENSITIVITY_HORIZON,
                   help="t of the d x(t) / d x(0) check")
    p.add_argument("--seed", type=int, default=SEED, help="seed of every random draw")
    p.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (0: torch's default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the MLP's initialisation draws from torch's global generator
    g = torch.Generator().manual_seed(args.seed)  # every other random draw comes from this one
    theta, mu = torch.tensor(args.theta), torch.tensor(args.mu)
    true_sde = OrnsteinUhlenbeck(theta, mu, args.sigma)
    dim = 2

    # -- 1. observations ---------------------------------------------------------------------------
    grid = solvers.UniformGrid(0.0, args.horizon, args.steps)
    dt = args.horizon / args.steps
    x0 = mu + args.start_spread * (2 * torch.rand(args.paths, dim, generator=g) - 1)
    observed = solvers.sdesolve(true_sde, x0, grid, generator=g, save=solvers.SaveAt(t0=True, steps=True))
    # observed.xs is (steps + 1, paths, 2): transition k of every path goes from node k to node k + 1
    t_all = observed.ts[:-1, None].expand(-1, args.paths).reshape(-1)
    x_all = observed.xs[:-1].reshape(-1, dim)
    x_next_all = observed.xs[1:].reshape(-1, dim)
    print(f"observed {args.paths} paths x {args.steps} steps of dt = {dt:g} ({len(x_all)} transitions); "
          f"theta = {tuple(args.theta)}, mu = {tuple(args.mu)}, sigma = {args.sigma}")

    # -- 2. maximum likelihood -----------------------------------------------------------------------
    model = NeuralSDE(dim, args.width, args.horizon)
    with torch.no_grad():
        # Start sigma at the realised volatility sum |dx|^2 / (D dt * transitions): the noise, of size
        # sigma sqrt(dt), dominates each increment next to the drift's f dt, so this is nearly sigma already.
        realised_variance = (x_next_all - x_all).pow(2).sum(1).mean() / (dim * dt)
        model.log_sigma.fill_(0.5 * realised_variance.log().item())
    print(f"sigma from the realised volatility: {model.log_sigma.exp().item():.4f}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.iterations, eta_min=args.lr / 10)
    for it in range(1, args.iterations + 1):
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
        loss = transition_nll(model, t_all[idx], x_all[idx], x_next_all[idx], dt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if it == 1 or it % max(args.iterations // 4, 1) == 0:
            print(f"  iteration {it:4d}  NLL per transition (batch) {loss.item():8.4f}  "
                  f"sigma {model.log_sigma.exp().item():.4f}")
    model.requires_grad_(False)  # fitted: the checks below differentiate with respect to x(0) only
    fitted_nll = transition_nll(model, t_all, x_all, x_next_all, dt).item()
    true_nll = true_transition_nll(true_sde, x_all, x_next_all, dt)
    print(f"NLL per transition on all the data: fitted {fitted_nll:.4f}, true SDE {true_nll:.4f} nats")

    # -- 3a. the learned drift against theta (mu - x) -----------------------------------------------
    # where the data is dense: a 3 x 3 lattice around mu, one stationary standard deviation apart
    stationary_std = args.sigma / torch.sqrt(2 * theta)
    t_mid = args.horizon / 2
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    lattice = mu + torch.cartesian_prod(offsets, offsets) * stationary_std
    learned = model.drift_at(torch.full((len(lattice),), t_mid), lattice)
    exact = true_sde.drift(torch.tensor(t_mid), lattice)
    print(f"\nlearned drift at t = {t_mid:g} vs theta (mu - x), at x = mu + {{-1, 0, 1}} x stationary std")
    print(f"{'x1':>7} {'x2':>7} | {'true f1':>8} {'true f2':>8} | {'fit f1':>8} {'fit f2':>8} | {'rel. error':>10}")
    for x, f, h in zip(lattice, exact, learned, strict=True):
        norm = f.norm().item()
        rel = f"{(h - f).norm().item() / norm:10.3f}" if norm > 1e-9 else f"{'(f = 0)':>10}"
        print(f"{x[0]:7.3f} {x[1]:7.3f} | {f[0]:8.3f} {f[1]:8.3f} | {h[0]:8.3f} {h[1]:8.3f} | {rel}")
    # one number for the whole box: |f_fit - f| / |f| in the root-mean-square sense, on a finer lattice
    fine = torch.linspace(-1.0, 1.0, 9)
    box = mu + torch.cartesian_prod(fine, fine) * stationary_std
    exact_box = true_sde.drift(torch.tensor(t_mid), box)
    error = model.drift_at(torch.full((len(box),), t_mid), box) - exact_box
    relative = (error.pow(2).sum() / exact_box.pow(2).sum()).sqrt().item()
    print(f"relative RMS drift error over the box (9 x 9 lattice): {relative:.3f}")

    # -- 3b. stationary moments of the fitted SDE ----------------------------------------------------
    long_grid = solvers.UniformGrid(0.0, args.stationary_horizon, round(args.stationary_horizon / dt))
    x_start = mu.expand(args.check_paths, dim)
    with torch.no_grad():
        x_fit = solvers.sdesolve(model, x_start, long_grid, generator=g).xs[-1]
        x_true = solvers.sdesolve(true_sde, x_start, long_grid, generator=g).xs[-1]
    print(f"\nstationary moments at t = {args.stationary_horizon:g} over {args.check_paths} paths "
          f"(closed form: mean mu, variance sigma^2 / (2 theta))")
    print(f"{'':8} {'closed form':>12} {'true SDE':>10} {'fitted SDE':>11}")
    rows = [("mean x1", mu[0], x_true[:, 0].mean(), x_fit[:, 0].mean()),
            ("mean x2", mu[1], x_true[:, 1].mean(), x_fit[:, 1].mean()),
            ("var x1", stationary_std[0] ** 2, x_true[:, 0].var(), x_fit[:, 0].var()),
            ("var x2", stationary_std[1] ** 2, x_true[:, 1].var(), x_fit[:, 1].var()),
            ("sigma", args.sigma, args.sigma, model.log_sigma.exp())]
    for name, closed_form, simulated_true, simulated_fit in rows:
        print(f"{name:8} {float(closed_form):12.4f} {float(simulated_true):10.4f} {float(simulated_fit):11.4f}")
    standard_error = stationary_std.max().item() / math.sqrt(args.check_paths)
    print(f"(Monte-Carlo standard error of a mean ~{standard_error:.4f}; Euler–Maruyama's own stationary "
          f"variance is sigma^2 / (2 theta - theta^2 dt))")

    # -- 3c. sensitivity d x(t) / d x(0), through the exact discrete adjoint --------------------------
    # For the OU process x(t) - mu = exp(-theta t) (x(0) - mu) + noise, so the Jacobian is diag(exp(-theta t))
    # on every path; Euler–Maruyama gives diag((1 - theta dt)^n). The fitted SDE's Jacobian varies from path to
    # path; its average should be close. DiscreteAdjoint stores only states and increments, not the graph.
    short_grid = solvers.UniformGrid(0.0, args.sensitivity_horizon, round(args.sensitivity_horizon / dt))
    t_s, n = args.sensitivity_horizon, short_grid.steps
    print(f"\nsensitivity d x(t) / d x(0) at t = {t_s:g} from x(0) = mu, averaged over {args.check_paths} paths "
          f"(DiscreteAdjoint)")
    print(f"{'':14} {'exp(-theta t)':>13} {'(1-theta dt)^n':>15} {'true SDE':>9} {'fitted SDE':>11}")
    jacobians = [mean_jacobian(sde, x_start, short_grid, g) for sde in (true_sde, model)]
    for i in range(dim):
        for j in range(dim):
            continuous = math.exp(-args.theta[i] * t_s) if i == j else 0.0
            discrete = (1 - args.theta[i] * dt) ** n if i == j else 0.0
            print(f"d x{i + 1}/d x{j + 1}(0)  {continuous:13.4f} {discrete:15.4f} "
                  f"{jacobians[0][i, j].item():9.4f} {jacobians[1][i, j].item():11.4f}")
    implied = [-math.log(jacobians[1][i, i].item()) / t_s for i in range(dim)]
    print(f"implied rates -log(J_ii) / t of the fitted SDE: {implied[0]:.3f}, {implied[1]:.3f} "
          f"(true {args.theta[0]:g}, {args.theta[1]:g})")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


def true_transition_nll(sde: OrnsteinUhlenbeck, x: Tensor, x_next: Tensor, dt: float) -> float:
    """The per-transition NLL under the true drift and sigma: what a perfect fit would score."""
    mean = x + sde.drift(torch.tensor(0.0), x) * dt
    variance = sde.sigma**2 * dt
    dim = x.shape[1]
    nll = 0.5 * (x_next - mean).pow(2).sum(1) / variance + 0.5 * dim * math.log(2 * math.pi * variance)
    return nll.mean().item()


def mean_jacobian(sde: solvers.SDE, x0: Tensor, grid: solvers.Grid, generator: torch.Generator) -> Tensor:
    """``E[d x(t1) / d x(0)]``, shape ``(dim, dim)``, by one backward pass through the solve per output row.

    The paths are independent, so the gradient of ``sum over paths of x_i(t1)`` with respect to ``x0`` holds
    row ``i`` of every path's Jacobian.
    """
    x0 = x0.clone().requires_grad_(True)
    x_end = solvers.sdesolve(sde, x0, grid, generator=generator, adjoint=solvers.DiscreteAdjoint()).xs[-1]
    rows = [torch.autograd.grad(x_end[:, i].sum(), x0, retain_graph=True)[0].mean(0) for i in range(x0.shape[1])]
    return torch.stack(rows)


if __name__ == "__main__":
    main()
