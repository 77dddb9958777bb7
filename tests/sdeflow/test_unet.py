import pytest
import torch
from torch import nn

from sdeflow.unet import UNet, _num_groups, sinusoidal_time_embedding


def _small(image_size, channels: int, **kw) -> UNet:
    """A narrow net for fast shape checks; keyword arguments override."""
    args = dict(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1)
    return UNet(image_size, channels, **{**args, **kw})


def _randomize_output(net: UNet, seed: int = 0) -> UNet:
    """Replace the zero-initialised last conv by a random one, so that the output depends on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = net.conv_out.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.1)
        net.conv_out.bias.copy_(torch.randn(net.conv_out.bias.shape, generator=g, dtype=w.dtype) * 0.1)
    return net


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("size", "channels", "kw"),
    [
        (8, 1, dict(attention_resolutions=(4, 2))),
        (28, 1, dict(attention_resolutions=(14, 7))),  # 28 -> 14 -> 7
        (32, 3, dict(channel_mults=(1, 2, 2, 2), attention_resolutions=(16, 8))),
        (7, 1, dict(attention_resolutions=(4,))),  # odd: 7 -> 4 -> 2
        (12, 2, dict(attention_resolutions=(3,), num_heads=2)),  # 12 -> 6 -> 3
        ((12, 9), 1, dict(attention_resolutions=(5,))),  # rectangular: (12, 9) -> (6, 5) -> (3, 3)
    ],
)
def test_output_shape(size, channels, kw):
    torch.manual_seed(0)
    net = _randomize_output(_small(size, channels, **kw))
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, channels, h, w)
    out = net(x, torch.rand(3) * 0.05)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["digits", "mnist"])
def test_presets_run(preset):
    net = getattr(UNet, preset)()
    x = torch.randn(2, net.in_channels, *net.image_size)
    out = net(x, 0.01)
    assert out.shape == x.shape
    assert (out == 0).all()  # zero-initialised final conv: the initial field is exactly 0


def test_level_sizes_and_out_channels():
    assert UNet.mnist().level_sizes == [(28, 28), (14, 14), (7, 7)]
    assert UNet.digits().level_sizes == [(8, 8), (4, 4), (2, 2)]
    net = _small(8, 1, out_channels=3)
    assert net(torch.randn(2, 1, 8, 8), 0.01).shape == (2, 3, 8, 8)


def test_param_counts():
    with torch.device("meta"):  # counting only: skip the initialisation of 38M parameters
        counts = {name: _n_params(getattr(UNet, name)()) for name in ("digits", "mnist", "cifar10")}
        ddpm = _n_params(UNet.cifar10(scale_shift=False))
        score = _n_params(UNet.cifar10(base_channels=64))
    assert counts == {"digits": 299_937, "mnist": 6_946_881, "cifar10": 38_307_203}
    assert 100_000 < counts["digits"] < 500_000
    assert ddpm == 35_746_307  # Ho et al.'s CIFAR-10 network, parameter for parameter
    assert 8e6 < score < 10e6


def test_num_groups():
    assert [_num_groups(c) for c in (1, 3, 8, 16, 24, 64, 128, 256)] == [1, 1, 4, 8, 12, 32, 32, 32]
    for c in range(1, 300):
        assert c % _num_groups(c) == 0


@pytest.mark.parametrize("scale_shift", [True, False])
def test_t_forms_agree(scale_shift):
    torch.manual_seed(1)
    net = _randomize_output(_small(8, 1, attention_resolutions=(4,), scale_shift=scale_shift, dropout=0.1)).eval()
    x = torch.randn(4, 1, 8, 8)
    ref = net(x, 0.02)
    for t in (torch.tensor(0.02), torch.tensor([0.02]), torch.full((4,), 0.02), torch.full((4, 1), 0.02)):
        torch.testing.assert_close(net(x, t), ref)
    # a per-sample t acts on each sample separately
    ts = torch.tensor([0.001, 0.01, 0.03, 0.05])
    torch.testing.assert_close(net(x, ts), torch.cat([net(x[i : i + 1], float(ts[i])) for i in range(4)]))


def test_time_embedding_varies_over_diffflow_range():
    emb = sinusoidal_time_embedding(32)  # t_scale = 1/T = 20: p = 20000 t
    a, b = emb(0.001), emb(0.05)
    assert (a - b).norm() / a.norm() > 1.0
    assert (emb(0.0200) - emb(0.0215)).norm() / a.norm() > 0.5  # one step of a 30-step grid
    # the same embedding on the raw t (positions * t_scale = 1) hardly moves: what the scaling fixes
    raw = sinusoidal_time_embedding(32, t_scale=1e-3)
    assert (raw(0.001) - raw(0.05)).norm() / raw(0.001).norm() < 0.02
    # DDPM's convention on [0, 1] with t_scale = 1
    ddpm = sinusoidal_time_embedding(32, t_scale=1.0)
    assert (ddpm(0.0) - ddpm(1.0)).norm() / ddpm(0.0).norm() > 0.5
    # frequencies are DDPM's: angular 1 ... 1e-4 per position, position = 1000 t_scale t
    omega = ddpm.omega.double() / 1000
    torch.testing.assert_close(omega.max(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(omega.min(), torch.tensor(1e-4, dtype=torch.float64), rtol=1e-6, atol=0)


def test_network_time_embedding_and_output_depend_on_t():
    torch.manual_seed(2)
    net = _randomize_output(UNet.digits()).eval()
    e0, e1 = net.embed_time(0.001, 1), net.embed_time(0.05, 1)
    assert (e0 - e1).norm() / e0.norm() > 0.1
    x = torch.randn(8, 1, 8, 8)
    out = {t: net(x, t) for t in (0.001, 0.02, 0.0215, 0.05)}
    scale = out[0.001].norm()
    assert (out[0.001] - out[0.05]).norm() / scale > 0.02  # 0.07 at this seed
    assert (out[0.02] - out[0.0215]).norm() / scale > 0.01


@pytest.mark.parametrize("scale_shift", [True, False])
def test_gradients_reach_every_parameter(scale_shift):
    torch.manual_seed(3)
    net = _small(8, 1, attention_resolutions=(4, 2), scale_shift=scale_shift, dropout=0.1)
    x = torch.randn(4, 1, 8, 8)
    # default init: every parameter is in the graph (no unused parameters for DistributedDataParallel)
    net(x, torch.rand(4) * 0.05).square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    # with a non-zero last conv every parameter gets a non-zero gradient
    net.zero_grad(set_to_none=True)
    _randomize_output(net)
    net(x, torch.rand(4) * 0.05).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_float64():
    torch.manual_seed(4)
    net = _randomize_output(_small(8, 1, attention_resolutions=(4,))).eval()
    x = torch.randn(3, 1, 8, 8)
    out32 = net(x, 0.01)
    net = net.double()
    out64 = net(x.double(), torch.tensor(0.01, dtype=torch.float64))
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)
    out64.sum().backward()
    assert all(p.grad.dtype == torch.float64 for p in net.parameters())


def test_autocast_bf16():
    torch.manual_seed(5)
    net = _randomize_output(_small(8, 1, attention_resolutions=(4,))).eval()
    x = torch.randn(3, 1, 8, 8)
    ref = net(x, 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.full((3,), 0.01))
    assert out.dtype == torch.float32  # returned in x's dtype
    assert (out - ref).norm() / ref.norm() < 0.05
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_inputs_raise():
    net = _small(8, 1)
    for shape in [(2, 3, 8, 8), (2, 1, 7, 8), (2, 1, 8), (1, 8, 8), (2, 1, 28, 28)]:
        with pytest.raises(ValueError, match=r"shape \(B, 1, 8, 8\)"):
            net(torch.randn(shape), 0.01)
    with pytest.raises(ValueError, match="batch"):
        net(torch.randn(4, 1, 8, 8), torch.rand(5))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.randn(4, 1, 8, 8), torch.rand(4, 2))


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match=r"\[16\] match no level.*\[28, 14, 7\]"):
        UNet(28, 1, base_channels=8, attention_resolutions=(16,))
    with pytest.raises(ValueError, match="num_heads"):
        UNet(8, 1, base_channels=8, num_heads=3, attention_resolutions=(4,))
    with pytest.raises(ValueError, match="too small"):
        UNet(2, 1, base_channels=8, channel_mults=(1, 1, 1))
    with pytest.raises(ValueError, match="base_channels"):
        UNet(8, 1, base_channels=7)
