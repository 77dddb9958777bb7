"""Neural SDE solvers for PyTorch: SDEs, time grids, Euler–Maruyama, torchsde-backed solvers, adjoints,
ODEs and log-densities through torchdiffeq. Knows nothing of DiffFlow."""

from .adaptive import SRK as SRK
from .adaptive import AdaptiveSteps as AdaptiveSteps
from .adaptive import BacksolveAdjoint as BacksolveAdjoint
from .adaptive import EulerHeun as EulerHeun
from .adaptive import Heun as Heun
from .adaptive import Milstein as Milstein
from .adaptive import ReversibleAdjoint as ReversibleAdjoint
from .adaptive import ReversibleHeun as ReversibleHeun
from .adaptive import StratonovichMidpoint as StratonovichMidpoint
from .adaptive import TorchsdeEuler as TorchsdeEuler
from .adaptive import TorchsdeSolver as TorchsdeSolver
from .adjoint import Adjoint as Adjoint
from .adjoint import DirectAdjoint as DirectAdjoint
from .adjoint import DiscreteAdjoint as DiscreteAdjoint
from .brownian import AntitheticIncrements as AntitheticIncrements
from .brownian import BrownianPath as BrownianPath
from .euler import EulerMaruyama as EulerMaruyama
from .euler import SDESolver as SDESolver
from .grids import ExplicitGrid as ExplicitGrid
from .grids import Grid as Grid
from .grids import PowerGrid as PowerGrid
from .grids import ProfileGrid as ProfileGrid
from .grids import ReversedGrid as ReversedGrid
from .grids import StratifiedGrid as StratifiedGrid
from .grids import UniformGrid as UniformGrid
from .ode import ODE as ODE
from .ode import RK4 as RK4
from .ode import AdaptiveHeun as AdaptiveHeun
from .ode import AdaptiveODESolver as AdaptiveODESolver
from .ode import Bosh3 as Bosh3
from .ode import Dopri5 as Dopri5
from .ode import Euler as Euler
from .ode import ExactTrace as ExactTrace
from .ode import FixedGridODESolver as FixedGridODESolver
from .ode import FunctionODE as FunctionODE
from .ode import HutchinsonTrace as HutchinsonTrace
from .ode import LogDensity as LogDensity
from .ode import Midpoint as Midpoint
from .ode import ODEAdjoint as ODEAdjoint
from .ode import ODESolver as ODESolver
from .ode import TraceEstimator as TraceEstimator
from .ode import as_ode as as_ode
from .ode import log_density as log_density
from .ode import odesolve as odesolve
from .sde import SDE as SDE
from .sde import NoiseType as NoiseType
from .sde import SDEType as SDEType
from .sde import TimeReversedSDE as TimeReversedSDE
from .sde import TorchsdeSDE as TorchsdeSDE
from .sde import as_sde as as_sde
from .solution import PathCost as PathCost
from .solution import SaveAt as SaveAt
from .solution import Solution as Solution
from .solution import SolveStats as SolveStats
from .solution import Transition as Transition
from .solve import sdesolve as sdesolve

__all__ = [
    "Adjoint", "DirectAdjoint", "DiscreteAdjoint", "AntitheticIncrements", "BrownianPath", "EulerMaruyama", "SDESolver",
    "ExplicitGrid", "Grid", "PowerGrid", "ProfileGrid", "ReversedGrid", "StratifiedGrid", "UniformGrid",
    "SDE", "NoiseType", "SDEType", "TimeReversedSDE", "TorchsdeSDE", "as_sde",
    "PathCost", "SaveAt", "Solution", "SolveStats", "Transition", "sdesolve",
    "ODE", "FunctionODE", "as_ode", "ODESolver", "FixedGridODESolver", "AdaptiveODESolver",
    "Euler", "Midpoint", "RK4", "AdaptiveHeun", "Bosh3", "Dopri5", "ODEAdjoint", "odesolve",
    "TraceEstimator", "ExactTrace", "HutchinsonTrace", "LogDensity", "log_density",
    "AdaptiveSteps", "TorchsdeSolver", "TorchsdeEuler", "Milstein", "SRK", "Heun", "StratonovichMidpoint",
    "EulerHeun", "ReversibleHeun", "BacksolveAdjoint", "ReversibleAdjoint",
]
