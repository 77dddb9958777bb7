"""Data-parallel training: two gloo processes equal one process with the combined batch and the same noise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdeflow.train import TrainConfig, Trainer

CONFIG = dict(width=16, depth=2, batch_size=64, steps=3, train_size=512, eval_size=64, eval_every=0,
              checkpoint_every=0, iterations=3)
# images: U-Nets of 8 base channels on the 8x8 digits (fresh dequantisation noise per shard, group norm)
IMAGE_CONFIG = dict(unet_channels=8, batch_size=16, steps=2, eval_size=16, eval_every=0, checkpoint_every=0,
                    iterations=2)
SETTINGS = {"moons": lambda **kw: TrainConfig(**CONFIG, **kw),
            "digits": lambda **kw: TrainConfig.preset("digits", **IMAGE_CONFIG, **kw)}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def flat_parameters(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def _worker(rank: int, world: int, init_file: str, out: str, data: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(SETTINGS[data](), data)
        trainer.train(progress=False)
        torch.save({"params": flat_parameters(trainer), "losses": trainer.history.losses},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("data", ["moons", "digits"])
def test_two_processes_equal_one_process_with_the_combined_batch(tmp_path, data):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), data), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # DDP all-reduces the gradients: both processes take bit-identical steps
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # one process, the same global batch split into the same two shards (micro-batches) with their noise
    single = Trainer(SETTINGS[data](accumulate=2), data)
    single.train(progress=False)
    torch.testing.assert_close(ranks[0]["params"], flat_parameters(single), rtol=1e-5, atol=1e-6)
    assert ranks[0]["losses"] == pytest.approx(single.history.losses, rel=1e-6)
    # and not trivially: the start differs from the end, and one shard alone gives another result
    alone = Trainer(SETTINGS[data](), data)
    alone.train(progress=False)
    assert not torch.allclose(flat_parameters(alone), flat_parameters(single), rtol=1e-3, atol=1e-4)


def _run(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


TORCHRUN_ARGS = {
    "moons": ["--batch", "64", "--steps", "3", "--width", "16", "--depth", "2", "--eval-size", "64"],
    "digits": ["--preset", "digits", "--batch", "16", "--steps", "2", "--channels", "8", "--eval-size", "12"],
}


# the digits version runs the same code path as the 2D one (its data-parallel step is checked above, and its
# CLI resume in test_cli.py): slow only for its evaluation, so it runs with -m slow
@pytest.mark.parametrize("data", ["moons", pytest.param("digits", marks=pytest.mark.slow)])
def test_torchrun_training_resumes_like_one_process(tmp_path, data):
    common = ["--data", data, *TORCHRUN_ARGS[data], "--eval-every", "0", "--quiet"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdeflow", "train"]
    _run(*torchrun, "--out", str(tmp_path / "ddp"), "--iterations", "2", *common)
    _run(*torchrun, "--out", str(tmp_path / "ddp"), "--resume", "--iterations", "4", "--eval-every", "0",
         "--quiet")
    _run("-m", "sdeflow", "train", "--out", str(tmp_path / "one"), "--iterations", "4", "--accumulate", "2",
         *common)
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    for name, value in b["model"].items():
        torch.testing.assert_close(a["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "ddp" / "metrics.json").is_file() and (tmp_path / "ddp" / "samples.png").is_file()
