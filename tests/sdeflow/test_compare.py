"""The comparison: a tiny budget writes every output, the table has every N of every sampler, a rerun with
reuse skips training and reproduces the scores, mismatched budgets and checkpoints are refused."""

import dataclasses
import json

import pytest
import torch

from sdeflow import compare
from sdeflow.cli import main
from sdeflow.compare import (
    OUTPUTS,
    Budget,
    compare_models,
    default_configs,
)
from sdeflow.families import DDPMFamily
from sdeflow.train import Trainer

TINY = Budget(iterations=3, batch_size=32, width=16, depth=2, train_size=256, samples=80)
STEPS = (2, 4)
RUN = dict(steps=STEPS, nll_points=24, figure_steps=4, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, compare_models("8gaussians", default_configs(TINY), out, **RUN)


def test_writes_outputs_and_a_row_for_every_sampler_and_n(tiny_run):
    out, result = tiny_run
    assert all((out / name).is_file() for name in OUTPUTS)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ddpm.pt", "diffflow.pt", "ffjord.pt"]
    expected = {"diffflow": ["sde", "ode"], "ddpm": ["sde", "ode"], "ffjord": ["ode"]}
    assert [m.name for m in result.models] == list(expected)
    table = (out / "table.md").read_text()
    for m in result.models:
        assert [(s.sampler, s.steps) for s in m.scores] == [(k, n) for k in expected[m.name] for n in STEPS]
        for s in m.scores:
            assert f"| {m.name} | {s.sampler} | {s.steps} | {s.evaluations} |" in table
            assert s.quality.n_samples == TINY.samples and s.sample_time_s > 0 and s.non_finite == 0
            # the bound belongs to the SDE samplers; every score comes with a floor
            assert (s.bound_nll is not None) is (s.sampler == "sde")
            assert s.quality.excess_kl_floor > 0 and s.quality.coverage_floor > 0
        assert m.iterations == TINY.iterations and not m.reused and m.exact_nll_gap is not None
    # evaluations per sample: Euler-Maruyama one call per field and step, RK4 four
    assert result.model("diffflow").score("sde", 4).evaluations == 8
    assert result.model("diffflow").score("ode", 4).evaluations == 32
    assert result.model("ddpm").score("sde", 4).evaluations == 4
    assert result.model("ffjord").score("ode", 2).evaluations == 8
    assert "**floor**" in table and "PowerGrid(t0=0.001, t1=0.05, steps=N, exponent=0.9)" in table
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["data"] == "8gaussians" and saved["steps"] == list(STEPS)
    assert [m["name"] for m in saved["models"]] == list(expected)
    assert saved["models"][0]["scores"][0]["quality"]["excess_kl"] == result.models[0].scores[0].quality.excess_kl
    with pytest.raises(KeyError, match="no ode score at N = 3"):
        result.model("ffjord").score("ode", 3)


def test_reuse_skips_training_and_reproduces_the_scores(tiny_run, monkeypatch):
    out, first = tiny_run

    def no_training(*args, **kwargs):
        raise AssertionError("reuse must not train")

    monkeypatch.setattr(Trainer, "train", no_training)
    again = compare_models("8gaussians", default_configs(TINY, ("ddpm", "ffjord")), out, reuse=True, **RUN)
    for m in again.models:
        assert m.reused
        assert [s.quality for s in m.scores] == [s.quality for s in first.model(m.name).scores]
        assert m.exact_nll == first.model(m.name).exact_nll


def test_reuse_continues_a_shorter_run(tmp_path):
    short = default_configs(dataclasses.replace(TINY, iterations=2), ("ddpm",))
    full = default_configs(TINY, ("ddpm",))
    # the schedule is part of the configuration: keep it equal so that only the length differs
    full = {"ddpm": dataclasses.replace(full["ddpm"], lr_decay_every=short["ddpm"].lr_decay_every,
                                        checkpoint_every=short["ddpm"].checkpoint_every)}
    compare_models("moons", short, tmp_path, **RUN)
    continued = compare_models("moons", full, tmp_path, reuse=True, **RUN).model("ddpm")
    assert continued.iterations == 3 and not continued.reused
    straight = Trainer(full["ddpm"], "moons")
    straight.train(progress=False)
    assert torch.equal(Trainer.from_checkpoint(tmp_path / "checkpoints" / "ddpm.pt").model.score.net.out.weight,
                       straight.model.score.net.out.weight)


def test_refuses_mismatches(tmp_path, tiny_run):
    out, _ = tiny_run
    configs = default_configs(TINY, ("ddpm", "ffjord"))
    with pytest.raises(ValueError, match="must share the budget; they differ in batch_size: 64 vs 32"):
        compare_models("moons", {**configs, "ffjord": dataclasses.replace(configs["ffjord"], batch_size=64)},
                       tmp_path, **RUN)
    with pytest.raises(ValueError, match="the key must be its model"):
        compare_models("moons", {"ffjord": configs["ddpm"]}, tmp_path, **RUN)
    with pytest.raises(ValueError, match="unknown dataset 'moon'"):
        compare_models("moon", configs, tmp_path, **RUN)
    with pytest.raises(ValueError, match="figure_steps 30 is not one of steps"):
        compare_models("moons", configs, tmp_path, **{**RUN, "figure_steps": 30})
    other = {"ddpm": dataclasses.replace(configs["ddpm"], score_lr=0.5)}
    with pytest.raises(ValueError, match="trained with other settings.*score_lr"):
        compare_models("8gaussians", other, out, reuse=True, **RUN)
    with pytest.raises(ValueError, match="unknown model"):
        default_configs(TINY, ("flow",))
    with pytest.raises(ValueError, match="Budget.width"):
        Budget(width=0)


def test_default_budget_networks_have_about_100k_parameters():
    config = default_configs()["ffjord"]
    params = sum(p.numel() for p in Trainer(dataclasses.replace(config, train_size=64, eval_size=16), "moons")
                 .model.parameters())
    assert params == 101_738


def test_non_finite_samples_are_counted_and_scored_as_leaked_mass(tmp_path, monkeypatch):
    real = DDPMFamily.sample

    def half_broken(self, *args, **kwargs):
        y = real(self, *args, **kwargs)
        y[: len(y) // 2] = float("nan")
        return y

    monkeypatch.setattr(DDPMFamily, "sample", half_broken)
    result = compare_models("moons", default_configs(TINY, ("ddpm",)), tmp_path, **RUN)
    s = result.model("ddpm").score("sde", 2)
    assert s.non_finite == TINY.samples // 2
    assert s.quality.precision <= 0.5  # the broken half lies in no data point's k-NN ball
    assert f"({TINY.samples // 2} non-finite)" in (tmp_path / "table.md").read_text()


def cli(argv: list[str]) -> int:
    return main(["compare", *argv])


def test_command_line(tmp_path, capsys, monkeypatch):
    argv = ["--data", "moons", "--out", str(tmp_path / "run"), "--models", "ddpm", "--iterations", "2",
            "--batch", "32", "--width", "16", "--depth", "2", "--train-size", "256", "--samples", "60",
            "--steps", "2,3", "--figure-steps", "3", "--nll-points", "20", "--no-ode", "--quiet"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "| ddpm | sde | 3 |" in printed and "| ddpm | ode |" not in printed and "wrote" in printed
    assert cli(argv) == 2
    assert "is not empty; pass --reuse" in capsys.readouterr().err
    assert cli([*argv, "--reuse", "--force"]) == 2
    assert "choose one" in capsys.readouterr().err
    monkeypatch.setattr(compare.Trainer, "train", lambda *a, **k: pytest.fail("reuse must not train"))
    assert cli([*argv, "--reuse"]) == 0
    assert cli([*argv, "--models", "ddpm,flow"]) == 2
    assert "unknown model(s) ['flow']" in capsys.readouterr().err
