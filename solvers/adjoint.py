"""How gradients of a solve are taken.

=====================  ==============================  ======================  ===========================
adjoint                gradient                        activation memory       extra time
=====================  ==============================  ======================  ===========================
``DirectAdjoint``      backprop through the steps      grows with N            none (the reference)
``DiscreteAdjoint``    exact adjoint of Euler–Maruyama one step's, plus states  ~one forward pass
``BacksolveAdjoint``   torchsde's continuous adjoint   constant                an adjoint SDE solve
=====================  ==============================  ======================  ===========================

(``BacksolveAdjoint`` and the reversible-Heun pair live in :mod:`solvers.adaptive`, with torchsde.)

The discrete adjoint. Write the Euler–Maruyama step as ``x_{k+1} = Phi_k(x_k) + g_k dW_k`` and the loss
as ``L = sum_k <w, c_k(x_k, x_{k+1}, e_{k+1})> + l(saved states)``, where ``e_j`` are the network
evaluations at node ``j`` (drift, diffusion, the cost's own ``node`` terms). Every network is evaluated
at node ``j`` only through ``e_j``, so the gradient splits into node-local pieces. Walking back from
``j = N`` to ``0`` with the adjoint ``a_j = dL/dx_j``, one vector-Jacobian product at each node of

    <w, c_{j-1}(x_{j-1}, x_j, e_j(x_j))> + <a_{j+1}, Phi_j(x_j) + g_j(x_j) dW_j>

gives ``dL/dx_j`` (plus the direct pieces), the partial of ``c_{j-1}`` in ``x_{j-1}`` (carried to the
next node) and the parameter gradients. The forward pass builds no graph and stores only the states and
increments; each node is recomputed once. The result is backprop's gradient, reassociated: equal to
rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .euler import EulerMaruyama, Problem, SDESolver, euler_update
from .solution import Solution, Transition

__all__ = ["Adjoint", "DirectAdjoint", "DiscreteAdjoint"]


class Adjoint:
    """Base of the gradient strategies; ``solve`` runs ``solver`` on ``problem`` and returns a Solution."""

    def solve(self, solver: SDESolver, problem: Problem) -> Solution:
        raise NotImplementedError


def _solution(problem: Problem, saved: list[Tensor], cost: Tensor | None, stats: Any) -> Solution:
    return Solution(ts=problem.saved_times(), xs=torch.stack(saved, 0), cost=cost, stats=stats)


class DirectAdjoint(Adjoint):
    """Plain backpropagation through every step: exact, memory grows linearly with the number of steps."""

    def solve(self, solver: SDESolver, problem: Problem) -> Solution:
        trajectory = solver.integrate(problem)
        return _solution(problem, trajectory.saved, trajectory.cost, trajectory.stats)


class DiscreteAdjoint(Adjoint):
    """The exact discrete adjoint of :class:`EulerMaruyama` (DiffFlow's "stochastic adjoint").

    Gradients equal :class:`DirectAdjoint`'s to rounding, for the initial state, the SDE's parameters and
    the path cost's; activation memory is that of one step whatever the number of steps (the states and
    increments, ``2 N x batch x dims`` numbers, are stored). See the module docstring for the recursion.

    Example:
        >>> import solvers
        >>> class Lin(solvers.SDE):
        ...     def __init__(self): super().__init__(); self.a = torch.nn.Parameter(torch.tensor(-1.0))
        ...     def drift(self, t, x): return self.a * x
        ...     def diffusion(self, t, x): return 0.1 * torch.ones_like(x)
        >>> sol = solvers.sdesolve(Lin(), torch.ones(4, 2), solvers.UniformGrid(0.0, 1.0, 10),
        ...                        adjoint=solvers.DiscreteAdjoint(), generator=torch.Generator().manual_seed(0))
        >>> sol.xs[-1].sum().backward()
    """

    def solve(self, solver: SDESolver, problem: Problem) -> Solution:
        if not isinstance(solver, EulerMaruyama):
            raise TypeError(
                f"DiscreteAdjoint is the exact adjoint of EulerMaruyama; got {type(solver).__name__} "
                f"(use DirectAdjoint, or BacksolveAdjoint for torchsde solvers)"
            )
        params = trainable_parameters(problem.sde, problem.cost)
        box: dict[str, Any] = {}
        outputs = _DiscreteAdjointFunction.apply(solver, problem, box, problem.x0, *params)
        xs, cost = outputs[0], outputs[1]
        return Solution(ts=problem.saved_times(), xs=xs,
                        cost=cost if problem.cost is not None else None, stats=box["stats"])


def trainable_parameters(*modules: nn.Module | None) -> list[Tensor]:
    """The parameters of ``modules`` that require grad, each once (modules may share submodules)."""
    seen: dict[int, Tensor] = {}
    for module in modules:
        if isinstance(module, nn.Module):
            for p in module.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
    return list(seen.values())


class _DiscreteAdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, solver, problem, box, x0, *params):  # type: ignore[override]
        with torch.no_grad():
            trajectory = solver.integrate(problem, record=True)
        box["stats"] = trajectory.stats
        ctx.problem = problem
        ctx.params = params
        ctx.save_for_backward(*trajectory.states, *trajectory.increments)
        ctx.steps = len(trajectory.increments)
        xs = torch.stack(trajectory.saved, 0)
        cost = trajectory.cost if trajectory.cost is not None else x0.new_zeros(x0.shape[0])
        return xs, cost

    @staticmethod
    def backward(ctx, grad_xs, grad_cost):  # type: ignore[override]
        problem: Problem = ctx.problem
        params = ctx.params
        steps = ctx.steps
        tensors = ctx.saved_tensors
        states, increments = tensors[: steps + 1], tensors[steps + 1 :]
        sde, cost, nodes = problem.sde, problem.cost, problem.nodes
        noise_type = problem.noise_type
        ts = problem.times().unbind(0)
        grad_of_saved = dict(zip(problem.save, grad_xs.unbind(0), strict=True)) if grad_xs is not None else {}
        param_grads = [torch.zeros_like(p) for p in params]

        adjoint_next: Tensor | None = None  # a_{j+1}
        carry: Tensor | None = None  # d c_j / d x_j, found while processing node j + 1
        for j in range(steps, -1, -1):
            with torch.enable_grad():
                x = states[j].detach().requires_grad_(True)
                inputs = [x]
                objective = None
                if j < steps or cost is not None:
                    f, g = sde.drift(ts[j], x), sde.diffusion(ts[j], x)
                if j < steps and adjoint_next is not None:
                    dt = float(nodes[j + 1] - nodes[j])
                    objective = (adjoint_next * euler_update(noise_type, x, f, g, dt, increments[j], 1.0)).sum()
                if cost is not None and j > 0 and grad_cost is not None:
                    x_prev = states[j - 1].detach().requires_grad_(True)
                    inputs.append(x_prev)
                    step = Transition(ts[j - 1], ts[j], float(nodes[j] - nodes[j - 1]), x_prev, x,
                                      increments[j - 1], f, g, cost.node(ts[j], x))
                    term = (grad_cost * cost(step)).sum()
                    objective = term if objective is None else objective + term
                if objective is not None and objective.requires_grad:
                    grads = torch.autograd.grad(objective, inputs + list(params), allow_unused=True)
                else:
                    grads = [None] * (len(inputs) + len(params))
            adjoint = grads[0] if grads[0] is not None else torch.zeros_like(states[j])
            if carry is not None:
                adjoint = adjoint + carry
            if j in grad_of_saved:
                adjoint = adjoint + grad_of_saved[j]
            carry = grads[1] if len(inputs) > 1 else None
            for acc, grad in zip(param_grads, grads[len(inputs):], strict=True):
                if grad is not None:
                    acc.add_(grad)
            adjoint_next = adjoint
        return (None, None, None, adjoint_next, *param_grads)
