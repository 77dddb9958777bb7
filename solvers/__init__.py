"""Neural SDE solvers for PyTorch: SDEs, time grids, Euler–Maruyama, torchsde-backed solvers, adjoints,
ODEs and log-densities through torchdiffeq. Knows nothing of DiffFlow."""

from .adjoint import Adjoint as Adjoint
from .adjoint import DirectAdjoint as DirectAdjoint
from .adjoint import DiscreteAdjoint as DiscreteAdjoint
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
    "Adjoint", "DirectAdjoint", "DiscreteAdjoint", "BrownianPath", "EulerMaruyama", "SDESolver",
    "ExplicitGrid", "Grid", "PowerGrid", "ProfileGrid", "ReversedGrid", "StratifiedGrid", "UniformGrid",
    "SDE", "NoiseType", "SDEType", "TimeReversedSDE", "TorchsdeSDE", "as_sde",
    "PathCost", "SaveAt", "Solution", "SolveStats", "Transition", "sdesolve",
]
