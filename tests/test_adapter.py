"""The teacher-adapter interface: conditioning plumbing and CFG through one doubled batch."""

import pytest
import torch

from models.adapter import Conditioning, TeacherAdapter
from models.flow import cfg_combine


class AffineAdapter(TeacherAdapter):
    """v = x * scale + offset(prompt): the conditioning is a per-row offset."""

    family = "affine"

    @property
    def latent_shape(self):
        return (2,)

    def encode_prompts(self, prompts):
        return Conditioning({"offset": torch.tensor([[float(len(p)), -float(len(p))] for p in prompts])})

    def network_velocity(self, net, x_t, t, cond):
        return net(x_t) * t[:, None] + cond.tensors["offset"]


def test_guided_velocity_equals_cfg_of_two_calls():
    adapter, net = AffineAdapter(), torch.nn.Linear(2, 2)
    x, t = torch.randn(3, 2), torch.rand(3)
    cond, uncond = adapter.encode_prompts(["ab", "abc", "a"]), adapter.negative_conditioning(3)
    expected = cfg_combine(adapter.velocity(net, x, t, uncond), adapter.velocity(net, x, t, cond), 3.5)
    torch.testing.assert_close(adapter.guided_velocity(net, x, t, cond, uncond, 3.5), expected)
    torch.testing.assert_close(adapter.velocity_fn(net, cond, uncond, 3.5)(x, t), expected)
    torch.testing.assert_close(adapter.velocity_fn(net, cond)(x, t), adapter.velocity(net, x, t, cond))


def test_x0_uses_the_flow_conversion():
    adapter, net = AffineAdapter(), torch.nn.Linear(2, 2)
    x, t = torch.randn(3, 2), torch.rand(3)
    cond = adapter.encode_prompts(["a", "b", "c"])
    torch.testing.assert_close(adapter.x0(net, x, t, cond), x - t[:, None] * adapter.velocity(net, x, t, cond))


def test_guided_velocity_fn_needs_a_scale():
    adapter = AffineAdapter()
    with pytest.raises(ValueError, match="guidance_scale"):
        adapter.velocity_fn(torch.nn.Identity(), adapter.encode_prompts(["a"]), adapter.negative_conditioning(1))


def test_conditioning_plumbing():
    a = Conditioning({"e": torch.arange(6.0).reshape(3, 2), "ids": torch.tensor([1, 2, 3])})
    assert a.batch_size == 3
    assert a[1:].batch_size == 2
    empty = Conditioning({"e": torch.zeros(1, 2), "ids": torch.tensor([0])})
    mixed = a.where(torch.tensor([True, False, True]), empty.expand(3))
    torch.testing.assert_close(mixed.tensors["ids"], torch.tensor([0, 2, 0]))
    torch.testing.assert_close(mixed.tensors["e"][1], torch.tensor([2.0, 3.0]))
    assert Conditioning.cat([a, a]).batch_size == 6
    assert a.to(dtype=torch.float64).tensors["ids"].dtype == torch.long
    with pytest.raises(ValueError, match="disagree"):
        Conditioning({"e": torch.zeros(2, 1), "ids": torch.zeros(3)})
    with pytest.raises(ValueError, match="batch-1"):
        a.expand(4)
