"""Trainer: configuration, checkpoint round trip, bit-exact resume, NaN roll-back, atomic writes."""

import math

import numpy as np
import pytest
import torch
from trainer_state import all_state, assert_same_state

from sdeflow.families import DiffFlowFamily
from sdeflow.train import (
    DataSplit,
    TrainConfig,
    Trainer,
    atomic_write,
    build_model,
    evaluate_model,
    load_split,
    load_trained,
)

TINY = dict(width=16, depth=2, batch_size=64, steps=5, train_size=512, eval_size=64, eval_every=0,
            checkpoint_every=0, iterations=4)



def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


# -- configuration ------------------------------------------------------------------------------------------

def test_config_defaults_are_the_published_setting_and_validate():
    c = TrainConfig()
    assert (c.diffusion, c.t0, c.T, c.grid_exponent, c.steps) == (0.2, 0.001, 0.05, 0.9, 30)
    assert c.batch_size == 5000
    assert (c.drift_lr, c.score_lr, c.lr_decay, c.lr_decay_every, c.ema_decay, c.grad_clip) == \
        (1e-2, 1e-2, 0.95, 200, 0.999, 1.0)
    assert c.random_grid and c.iterations == 3000 and c.steps_schedule == () and c.final_steps == 30
    for bad in (dict(steps=0), dict(batch_size=-1), dict(t0=0.1, T=0.05), dict(drift_lr=float("nan")),
                dict(steps_schedule=((5, 10), (2, 20))), dict(steps_schedule=((0, 0),)), dict(grad_clip=0.0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_progressive_schedule_and_dict_round_trip():
    q = TrainConfig.quick(steps_schedule=((0, 10), (500, 20), (1000, 30)))
    assert [q.steps_at(i) for i in (0, 499, 500, 999, 1000, 10**6)] == [10, 10, 20, 20, 30, 30]
    assert q.final_steps == 30 and q.grid().steps == 30 and q.grid(7).steps == 7
    assert TrainConfig(steps=4, steps_schedule=((3, 8),)).steps_at(2) == 4
    d = q.to_dict()
    assert d["steps_schedule"] == [[0, 10], [500, 20], [1000, 30]]
    assert TrainConfig.from_dict(d) == q
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({**d, "bogus": 1})


def test_antithetic_switch_reaches_the_loss():
    a, b = Trainer(tiny(), "moons"), Trainer(tiny(antithetic=False), "moons")
    la, lb = a.step(), b.step()
    assert math.isfinite(la) and math.isfinite(lb) and la != lb


# -- data and construction ----------------------------------------------------------------------------------

def test_seed_fixes_split_and_init_without_touching_global_rng():
    before = torch.get_rng_state()
    a, b, c = Trainer(tiny(), "moons"), Trainer(tiny(), "moons"), Trainer(tiny(seed=1), "moons")
    assert torch.equal(torch.get_rng_state(), before)
    assert_same_state(a, b)
    assert torch.equal(a.split.train, b.split.train)
    assert not torch.equal(a.model.drift.out.weight, c.model.drift.out.weight)
    assert not torch.equal(a.split.train, c.split.train)
    # the EMA starts as a copy, the two networks are separate Adam groups
    assert torch.equal(a.ema.score.out.weight, a.model.score.out.weight)
    assert [g["name"] for g in a.optimizer.param_groups] == ["drift", "score"]


def test_file_split_is_disjoint(tmp_path):
    points = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
    np.save(tmp_path / "pts.npy", points)
    split = load_split(str(tmp_path / "pts.npy"), 10_000, 50, torch.Generator().manual_seed(0))
    assert len(split.heldout) == len(split.reference) == 20 and len(split.train) == 60
    rows = {tuple(r) for part in (split.train, split.heldout, split.reference) for r in part.tolist()}
    assert len(rows) == 100
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split("no_such_set", 10, 10, torch.Generator())


# -- checkpoints and exact resume ------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    trainer = Trainer(tiny(), "8gaussians")
    trainer.train(2, progress=False)
    trainer.evaluate()
    path = tmp_path / "checkpoint.pt"
    trainer.save(path)
    loaded = Trainer.from_checkpoint(path)
    assert_same_state(trainer, loaded)
    assert loaded.config == trainer.config and loaded.data == "8gaussians"
    assert loaded.scaler.state_dict() == trainer.scaler.state_dict()
    for name in ("train", "heldout", "heldout_labels", "reference"):
        assert torch.equal(getattr(loaded.split, name), getattr(trainer.split, name))
    assert loaded.history == trainer.history and len(loaded.history.evals) == 1
    raw = torch.load(path, weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "torch_rng", "iteration", "config",
            "scaler", "data", "history"} <= raw.keys()


def test_resume_is_bit_identical(tmp_path):
    # crosses a change of N (3 -> 5) and a learning-rate decay at the split point
    config = tiny(steps_schedule=((0, 3), (3, 5)), lr_decay_every=2, lr_decay=0.5)
    k = 3
    straight = Trainer(config, "moons")
    straight.train(2 * k, progress=False)

    first = Trainer(config, "moons")
    path = tmp_path / "checkpoint.pt"
    first.train(k, checkpoint=path, progress=False)
    del first
    resumed = Trainer.from_checkpoint(path)
    assert resumed.iteration == k
    resumed.train(2 * k, progress=False)
    assert_same_state(straight, resumed)


def test_periodic_checkpoints(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Trainer, "save", lambda self, path: saved.append(self.iteration))
    Trainer(tiny(checkpoint_every=2), "moons").train(5, checkpoint=tmp_path / "c.pt", progress=False)
    assert saved == [2, 4, 5]


def test_atomic_write_keeps_old_checkpoint_on_failure(tmp_path, monkeypatch):
    trainer = Trainer(tiny(), "moons")
    path = tmp_path / "checkpoint.pt"
    trainer.save(path)
    before = path.read_bytes()
    trainer.step()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left behind
    monkeypatch.undo()
    assert Trainer.from_checkpoint(path).iteration == 0


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, lambda f: f.write(b"old"))
    atomic_write(p, lambda f: f.write(b"new content"))
    assert p.read_bytes() == b"new content" and len(list(tmp_path.iterdir())) == 1


def test_from_checkpoint_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Trainer.from_checkpoint(tmp_path / "nothing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an sdeflow trainer checkpoint"):
        Trainer.from_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        Trainer.from_checkpoint(tmp_path / "junk.pt")


# -- NaN handling -------------------------------------------------------------------------------------------

def nan_loss_at(monkeypatch, trainer: Trainer, iteration: int, times: int | None) -> list[int]:
    """Make the DiffFlow loss NaN at ``iteration`` (``times`` attempts, None: forever)."""
    real = DiffFlowFamily.loss
    calls: list[int] = []

    def patched(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.iteration >= iteration and (times is None or len(calls) < times):
            calls.append(trainer.iteration)
            return out * float("nan")
        return out

    monkeypatch.setattr(DiffFlowFamily, "loss", patched)
    return calls


def test_transient_nan_is_retried_with_fresh_noise(monkeypatch):
    trainer = Trainer(tiny(), "moons")
    calls = nan_loss_at(monkeypatch, trainer, 2, times=2)
    trainer.train(4, progress=False)
    assert calls == [2, 2] and trainer.iteration == 4
    assert [e["iteration"] for e in trainer.history.nan_events] == [2, 2]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # the retries drew fresh batches and noise: the run differs from an undisturbed one
    clean = Trainer(tiny(), "moons")
    monkeypatch.undo()
    clean.train(4, progress=False)
    assert not torch.equal(clean.model.drift.out.weight, trainer.model.drift.out.weight)


def test_persistent_nan_raises_and_leaves_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny(max_nan_retries=3), "moons")
    path = tmp_path / "checkpoint.pt"
    trainer.train(2, checkpoint=path, progress=False)
    before = path.read_bytes()
    good = {k: v.clone() for k, v in all_state(trainer).items()}
    calls = nan_loss_at(monkeypatch, trainer, 2, times=None)
    with pytest.raises(FloatingPointError, match="iteration 2.*4 consecutive attempts"):
        trainer.train(6, checkpoint=path, progress=False)
    assert len(calls) == 4  # 1 attempt + max_nan_retries retries
    assert path.read_bytes() == before
    after = all_state(trainer)
    assert all(torch.equal(v, after[k]) for k, v in good.items())  # rolled back to the last good state
    assert trainer.iteration == 2


def test_non_finite_step_is_rolled_back(monkeypatch):
    trainer = Trainer(tiny(), "moons")
    trainer.train(1, progress=False)
    lr = trainer.optimizer.param_groups[1]["lr"]
    trainer.optimizer.param_groups[1]["lr"] = float("nan")  # the next step writes NaN into the score net
    trainer.step()
    assert trainer.iteration == 2
    assert "parameters became non-finite" in trainer.history.nan_events[0]["reason"]
    assert trainer.optimizer.param_groups[1]["lr"] == lr  # restored from the snapshot with the optimizer
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.ema.parameters())


def test_simulation_blow_up_counts_as_failure(monkeypatch):
    trainer = Trainer(tiny(max_nan_retries=0), "moons")

    def exploding(*args, **kwargs):
        raise FloatingPointError("the state became NaN or infinite at step 3")

    monkeypatch.setattr(DiffFlowFamily, "loss", exploding)
    with pytest.raises(FloatingPointError, match="iteration 0: simulation"):
        trainer.step()


# -- evaluation -------------------------------------------------------------------------------------------

def test_evaluate_model_reports_everything():
    trainer = Trainer(tiny(), "8gaussians")
    trainer.train(2, progress=False)
    split: DataSplit = trainer.split
    metrics, samples = evaluate_model(trainer.ema, trainer.config, trainer.scaler, split.heldout,
                                      split.reference, seed=0)
    assert samples.shape == (64, 2) and torch.isfinite(samples).all()
    for key in ("bound_nll", "ode_nll", "bound_nll_data", "ode_nll_data", "mmd2", "mmd2_floor", "hist_kl",
                "hist_kl_floor"):
        assert math.isfinite(metrics[key]), key
    assert metrics["ode_nll_data"] - metrics["ode_nll"] == pytest.approx(-metrics["scaler_log_det"])


# -- images -------------------------------------------------------------------------------------------------

DIGITS_TINY = dict(unet_channels=8, batch_size=16, steps=2, eval_size=32, eval_every=0, checkpoint_every=0,
                   iterations=4)


def tiny_digits(**overrides) -> TrainConfig:
    """The digits preset with a U-Net of 8 base channels (~20k parameters a field): milliseconds a step."""
    return TrainConfig.preset("digits", **{**DIGITS_TINY, **overrides})


def test_untrained_image_bound_is_the_closed_form_and_training_lowers_it():
    # The output convs start at zero, so f = s = 0: the backward noise is minus the forward noise, the path
    # terms cancel, and the bound is -log N(x0 + W) with W ~ N(0, (T - t0) I), whose mean over W is
    # |x0|^2 / 2 + D (T - t0) / 2 + D log(2 pi) / 2.
    trainer = Trainer(tiny_digits(drift_lr=3e-2, score_lr=3e-2), "digits")
    cfg, images = trainer.config, trainer.train_data.images
    x = trainer.heldout().reshape(cfg.eval_size, -1).double()
    dim = images.dim
    expected = (0.5 * x.pow(2).sum(1).mean() + 0.5 * dim * (cfg.T - cfg.t0 + math.log(2 * math.pi))).item()
    before = trainer.evaluate()
    assert before["nll"] == pytest.approx(expected, rel=2e-3)
    assert before["bpd"] == pytest.approx((expected + dim * math.log(17 / 2)) / (dim * math.log(2)), rel=2e-3)
    trainer.train(progress=False)
    after = trainer.evaluate()
    assert all(math.isfinite(loss) for loss in trainer.history.losses)
    assert after["bpd"] < before["bpd"] - 0.1  # the same noise both times (seeded evaluation generator)


def test_image_checkpoint_round_trip_and_bit_identical_resume(tmp_path):
    config = tiny_digits(steps_schedule=((0, 2), (2, 3)), lr_decay_every=2, lr_decay=0.5)
    straight = Trainer(config, "digits")
    straight.train(4, progress=False)
    first = Trainer(config, "digits")
    path = tmp_path / "checkpoint.pt"
    first.train(2, checkpoint=path, progress=False)
    raw = torch.load(path, weights_only=True)
    assert "split" not in raw and raw["event_shape"] == [1, 8, 8] and raw["levels"] == 17
    resumed = Trainer.from_checkpoint(path)
    assert_same_state(first, resumed)
    assert resumed.images and resumed.train_data.images.digest() == first.train_data.images.digest()
    resumed.train(4, progress=False)
    assert_same_state(straight, resumed)
    trained = load_trained(path)  # the EMA model without the data, for sampling
    assert trained.event_shape == (1, 8, 8) and trained.levels == 17 and trained.scaler is None
    for name, value in first.ema.state_dict().items():
        assert torch.equal(trained.ema.state_dict()[name], value), name


def test_resume_refuses_a_source_that_holds_other_images(tmp_path):
    trainer = Trainer(tiny_digits(), "digits")
    path = tmp_path / "checkpoint.pt"
    trainer.save(path)
    state = torch.load(path, weights_only=True)
    state["image_digest"] = "0" * 64  # as if the files had changed since training
    torch.save(state, path)
    with pytest.raises(ValueError, match="differ from those the run was trained on"):
        Trainer.from_checkpoint(path)


@pytest.mark.parametrize("size", [12, 16])
def test_image_models_of_other_sizes_attend_at_half_resolution(size):
    model = build_model(tiny_digits(), (3, size, size))
    assert model.drift.level_sizes[1] == ((size + 1) // 2,) * 2
    x = torch.zeros(2, 3, size, size)
    assert model.drift(x, 0.01).shape == x.shape and model.score(x, 0.01).shape == x.shape
