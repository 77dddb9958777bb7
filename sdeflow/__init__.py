"""DiffFlow (Diffusion Normalizing Flow, Zhang & Chen 2021) on the :mod:`solvers` layer."""

from .loss import BackwardNoiseCost as BackwardNoiseCost
from .loss import PathKL as PathKL
from .loss import path_kl as path_kl
from .model import DiffFlow as DiffFlow
from .nets import TimeMLP as TimeMLP
from .sample import sample as sample
from .sample import sample_trajectory as sample_trajectory

__all__ = ["BackwardNoiseCost", "PathKL", "path_kl", "DiffFlow", "TimeMLP", "sample", "sample_trajectory"]
