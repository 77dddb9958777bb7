import pytest
import torch

from sdeflow.nets import FourierTimeEmbedding, TimeMLP


def test_embedding_shapes():
    emb = FourierTimeEmbedding(n_freq=16)
    assert emb(0.01).shape == (32,)
    assert emb(torch.tensor(0.01)).shape == (32,)
    assert emb(torch.full((7,), 0.01)).shape == (7, 32)
    assert emb(torch.full((7, 1), 0.01)).shape == (7, 32)
    ts = torch.linspace(0.001, 0.05, 5)
    assert torch.allclose(emb(ts), torch.stack([emb(t) for t in ts]))
    with pytest.raises(ValueError):
        emb(torch.zeros(2, 3))


def test_embedding_varies_over_diffflow_range():
    emb = FourierTimeEmbedding()
    # features have norm sqrt(16) = 4; the ends of [0.001, 0.05] must be far apart
    assert (emb(0.001) - emb(0.05)).norm() > 2.0
    # neighbouring steps of a 30-step grid on [0.001, 0.05] are distinguishable
    assert (emb(0.0200) - emb(0.0215)).norm() > 0.5
    # also informative on [0, 1]
    assert (emb(0.0) - emb(1.0)).norm() > 2.0
    assert (emb(0.4) - emb(0.6)).norm() > 0.5


@pytest.mark.parametrize("t", [0.02, torch.tensor(0.02), torch.rand(64) * 0.05, torch.rand(64, 1) * 0.05])
def test_timemlp_output_shape(t):
    net = TimeMLP(2)
    x = torch.randn(64, 2)
    out = net(x, t)
    assert out.shape == (64, 2) and torch.isfinite(out).all()


def test_timemlp_batch_mismatch():
    with pytest.raises(ValueError, match="batch"):
        TimeMLP(2)(torch.randn(4, 2), torch.rand(5))


def test_timemlp_param_count():
    n = sum(p.numel() for p in TimeMLP(2).parameters())
    assert n == 37_762
    assert 30_000 <= n <= 100_000


def test_timemlp_matches_concat_layer():
    torch.manual_seed(0)
    net = TimeMLP(3, width=32, depth=2)
    x, t = torch.randn(10, 3), torch.rand(10)
    ref = net.out(net.body(net.inp(torch.cat([x, net.embed(t)], dim=1))))
    assert torch.allclose(net(x, t), ref, atol=1e-6)
    ref_scalar = net.out(net.body(net.inp(torch.cat([x, net.embed(0.3).expand(10, -1)], dim=1))))
    assert torch.allclose(net(x, 0.3), ref_scalar, atol=1e-6)


def test_timemlp_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = TimeMLP(2)
    x = torch.randn(128, 2)
    t = torch.rand(128) * 0.05
    net(x, t).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_timemlp_depends_on_time_and_float64():
    torch.manual_seed(0)
    net = TimeMLP(2).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    a, b = net(x, 0.001), net(x, 0.05)
    assert a.dtype == torch.float64
    assert (a - b).abs().max() > 1e-4
