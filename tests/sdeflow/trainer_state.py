"""Helpers shared by the trainer tests: the whole training state of a Trainer, and exact equality of two."""

import torch

from sdeflow.train import Trainer


def all_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor that defines the training state, flattened to names."""
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    for i, state in trainer.optimizer.state_dict()["state"].items():
        out.update({f"adam.{i}.{k}": v for k, v in state.items()})
    return out


def assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = all_state(a), all_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.iteration == b.iteration and a.ema_updates == b.ema_updates
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert [g["lr"] for g in a.optimizer.param_groups] == [g["lr"] for g in b.optimizer.param_groups]
    assert a.history.losses == b.history.losses
