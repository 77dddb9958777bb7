"""DiffFlow (Diffusion Normalizing Flow, Zhang & Chen 2021) on the :mod:`solvers` layer."""

from .likelihood import bits_per_dim as bits_per_dim
from .likelihood import bound_nll as bound_nll
from .likelihood import ode_nll as ode_nll
from .loss import BackwardNoiseCost as BackwardNoiseCost
from .loss import PathKL as PathKL
from .loss import path_kl as path_kl
from .metrics import sample_quality as sample_quality
from .model import DiffFlow as DiffFlow
from .nets import TimeMLP as TimeMLP
from .sample import sample as sample
from .sample import sample_ode as sample_ode
from .sample import sample_trajectory as sample_trajectory
from .train import TrainConfig as TrainConfig
from .train import Trainer as Trainer

__all__ = [
    "bits_per_dim", "bound_nll", "ode_nll", "BackwardNoiseCost", "PathKL", "path_kl", "sample_quality",
    "DiffFlow", "TimeMLP", "sample", "sample_ode", "sample_trajectory", "TrainConfig", "Trainer",
]
