import json
import math

import numpy as np
import pytest
import torch

from sdeflow.data import DATASETS, Scaler, dataset_names, load_points, make_dataset

N_MODES = {
    "olympic_rings": 5,
    "four_rings": 4,
    "two_spirals": 2,
    "checkerboard": 8,
    "swiss_roll": 4,
    "moons": 2,
    "8gaussians": 8,
    "pinwheel": 5,
    "tree": 4,
    "carpet": 4,
}
MIN_FRACTION = {"tree": 0.1}  # the trunk quadrants hold less ink; every other set has equal modes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_names():
    assert dataset_names() == list(DATASETS)
    assert set(N_MODES) == set(dataset_names())


@pytest.mark.parametrize("name", list(N_MODES))
def test_dataset_shapes_determinism_modes(name):
    n = 4000
    x, y = DATASETS[name](n, gen(0))
    assert x.shape == (n, 2) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.long
    assert torch.isfinite(x).all()
    x2, y2 = DATASETS[name](n, gen(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = DATASETS[name](n, gen(1))
    assert not torch.allclose(x, x3)
    k = N_MODES[name]
    assert y.min() >= 0 and y.max() < k
    fractions = torch.bincount(y, minlength=k).double() / n
    assert fractions.min() >= MIN_FRACTION.get(name, 0.5 / k), fractions


def test_olympic_rings_geometry():
    x, y = DATASETS["olympic_rings"](5000, gen(0))
    centers = torch.tensor([[-2.2, 0.5], [0.0, 0.5], [2.2, 0.5], [-1.1, -0.5], [1.1, -0.5]])
    radius = (x - centers[y]).norm(dim=1)
    assert (radius - 1).abs().median() < 0.05
    assert (torch.bincount(y, minlength=5) >= 0.1 * len(y)).all()
    # the five rings are distinct: their label-wise means are the centres
    means = torch.stack([x[y == k].mean(0) for k in range(5)])
    assert torch.allclose(means, centers, atol=0.1)


def test_four_rings_radii():
    x, y = DATASETS["four_rings"](4000, gen(0))
    assert ((x.norm(dim=1) - (y + 1).float()).abs() < 0.4).all()


def test_checkerboard_only_dark_squares():
    x, y = DATASETS["checkerboard"](4000, gen(0))
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8
    assert x.abs().max() <= 2


@pytest.mark.parametrize("name", ["tree", "carpet"])
def test_image_density_follows_ink(name):
    x, _ = DATASETS[name](3000, gen(0))
    assert x.abs().max() <= 1
    if name == "carpet":
        # the central hole (middle ninth of the picture) is empty
        assert not ((x.abs() < 1 / 3 - 0.01).all(dim=1)).any()
    else:
        # no ink in the top corners, above the canopy
        assert not ((x[:, 1] > 0.95) & (x[:, 0].abs() > 0.9)).any()


def test_scaler_roundtrip_and_standardisation():
    x, _ = DATASETS["swiss_roll"](5000, gen(0))
    s = Scaler.fit(x)
    assert math.isclose(s.scale * x.abs().max().item(), 0.85, rel_tol=1e-6)
    z = s.transform(x)
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(2), atol=1e-5)
    # float32: exact up to float32 rounding of the input magnitude; float64: to 1e-12
    assert (s.inverse(z) - x).abs().max() <= 1e-6 * x.abs().max()
    x64 = x.double()
    assert (s.inverse(s.transform(x64)) - x64).abs().max() < 1e-12


def test_scaler_state_dict_plain_python():
    x, _ = DATASETS["moons"](1000, gen(0))
    s = Scaler.fit(x)
    state = json.loads(json.dumps(s.state_dict()))
    s2 = Scaler.from_state_dict(state)
    assert torch.equal(s2.transform(x), s.transform(x))
    assert isinstance(state["scale"], float) and all(isinstance(v, float) for v in state["mean"])


def test_scaler_rejects_degenerate():
    with pytest.raises(ValueError):
        Scaler.fit(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="constant"):
        Scaler.fit(torch.tensor([[1.0, 2.0], [1.0, 3.0]]))


def test_load_points_csv_npy(tmp_path):
    pts = np.array([[0.5, -1.0], [2.0, 3.0], [1e-3, 4.5]])
    (tmp_path / "a.csv").write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in pts) + "\n")
    (tmp_path / "b.csv").write_text("\n".join(f"{a},{b}" for a, b in pts))
    np.save(tmp_path / "c.npy", pts)
    for fname in ("a.csv", "b.csv", "c.npy"):
        got = load_points(tmp_path / fname)
        assert got.dtype == torch.float32 and got.shape == (3, 2)
        assert torch.allclose(got, torch.tensor(pts, dtype=torch.float32))


def test_load_points_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_points(tmp_path / "missing.csv")
    (tmp_path / "p.txt").write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match="extension"):
        load_points(tmp_path / "p.txt")
    (tmp_path / "three.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="3 columns"):
        load_points(tmp_path / "three.csv")
    np.save(tmp_path / "three.npy", np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        load_points(tmp_path / "three.npy")
    (tmp_path / "nan.csv").write_text("x,y\n1,2\nnan,3\n4,5\n")
    with pytest.raises(ValueError, match="line 3"):
        load_points(tmp_path / "nan.csv")
    arr = np.zeros((5, 2))
    arr[2, 1] = np.inf
    np.save(tmp_path / "inf.npy", arr)
    with pytest.raises(ValueError, match="row 2"):
        load_points(tmp_path / "inf.npy")
    (tmp_path / "one.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="at least 2"):
        load_points(tmp_path / "one.csv")
    (tmp_path / "text.csv").write_text("1,2\nfoo,bar\n")
    with pytest.raises(ValueError, match="line 2"):
        load_points(tmp_path / "text.csv")


def test_make_dataset_names_and_files(tmp_path):
    x, y = make_dataset("8gaussians", 100, gen(3))
    x2, y2 = DATASETS["8gaussians"](100, gen(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)

    pts = np.arange(20, dtype=float).reshape(10, 2)
    np.save(tmp_path / "u.npy", pts)
    sub, lab = make_dataset(str(tmp_path / "u.npy"), 4, gen(0))
    assert sub.shape == (4, 2) and (lab == 0).all()
    assert len({tuple(r) for r in sub.tolist()}) == 4  # without replacement
    assert all(tuple(r) in {tuple(p) for p in pts.tolist()} for r in sub.tolist())
    assert torch.equal(sub, make_dataset(tmp_path / "u.npy", 4, gen(0))[0])
    assert not torch.equal(sub, make_dataset(tmp_path / "u.npy", 4, gen(1))[0])
    big, _ = make_dataset(tmp_path / "u.npy", 25, gen(0))
    assert big.shape == (25, 2)
    assert {tuple(r) for r in big.tolist()} == {tuple(p) for p in pts.tolist()}

    with pytest.raises(ValueError, match="olympic_rings"):
        make_dataset("olympic", 10, gen(0))
