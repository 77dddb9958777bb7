"""Command line: a tiny end-to-end run, resume, sample, evaluate, and clean usage errors (status 2)."""

import json
import runpy
import sys

import numpy as np
import pytest

from sdeflow.cli import OUTPUTS, main

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
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()


def test_python_dash_m_exits_with_the_status(tmp_path, monkeypatch, capsys):
    # runpy executes sdeflow/__main__.py as `python -m sdeflow` would, without a second interpreter
    monkeypatch.setattr(sys, "argv", ["sdeflow", "train", "--data", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("sdeflow", run_name="__main__")
    assert exit_.value.code == 2 and "unknown dataset" in capsys.readouterr().err
