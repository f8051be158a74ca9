"""DP-DMD losses against hand-derived values; the DMD gradient direction; non-finite detection."""

import pytest
import torch

from models.losses import (NonFiniteLossError, anchor_velocity, critic_loss, diversity_loss, diversity_loss_x0,
                           dmd_gradient, dmd_loss, flow_matching_loss, generator_objective)


def test_anchor_velocity_by_hand():
    eps = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    z = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    # (eps - z) / (1 - t_K) with t_K = 0.5: [[1, 2], [-1, -2]]
    torch.testing.assert_close(anchor_velocity(eps, z, 0.5), torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    # per-sample t_K: rows divided by 0.5 and 0.75
    torch.testing.assert_close(anchor_velocity(eps, z, torch.tensor([0.5, 0.25])),
                               torch.tensor([[1.0, 2.0], [-2 / 3, -4 / 3]]))


def test_anchor_velocity_refuses_t_of_one():
    with pytest.raises(ValueError, match="t_anchor must be < 1"):
        anchor_velocity(torch.ones(1, 2), torch.ones(1, 2), 1.0)


def test_diversity_loss_value_and_gradient():
    v = torch.tensor([[1.0, 2.0], [0.0, 3.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    out = diversity_loss(v, target)
    assert out.loss.item() == pytest.approx((1 + 4 + 1 + 4) / 4)
    out.loss.backward()
    torch.testing.assert_close(v.grad, 2 * (v.detach() - target) / 4)


def test_diversity_loss_x0_form():
    x0_gen = torch.tensor([[1.0, -1.0]], requires_grad=True)
    x0_teacher = torch.tensor([[0.0, 1.0]])
    out = diversity_loss_x0(x0_gen, x0_teacher)
    assert out.loss.item() == pytest.approx((1 + 4) / 2)
    out.loss.backward()
    torch.testing.assert_close(x0_gen.grad, torch.tensor([[1.0, -2.0]]))


def _dmd_inputs():
    x_gen = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    x0_teacher = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    x0_critic = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    x_t = torch.tensor([[2.0, 4.0], [4.0, 2.0]])
    return x_gen, x0_teacher, x0_critic, x_t


def test_dmd_gradient_and_loss_by_hand_xt_normaliser():
    x_gen, x0_teacher, x0_critic, x_t = _dmd_inputs()
    # n = mean |x_t - x0_teacher| per sample = [mean(2, 2), mean(2, 2)] = [2, 2]
    # grad = (x0_critic - x0_teacher) / n = [[0.5, -0.5], [0, 1]]
    grad, n = dmd_gradient(x0_teacher, x0_critic, x_t, x_gen, "xt")
    torch.testing.assert_close(n.flatten(), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(grad, torch.tensor([[0.5, -0.5], [0.0, 1.0]]))
    out = dmd_loss(x_gen, x0_teacher, x0_critic, x_t, "xt")
    assert out.loss.item() == pytest.approx(0.5 * (0.25 + 0.25 + 0 + 1) / 4)


def test_dmd_gradient_by_hand_xgen_normaliser():
    x_gen, x0_teacher, x0_critic, x_t = _dmd_inputs()
    # n = mean |x_gen - x0_teacher| = [mean(1, 0), mean(1, 1)] = [0.5, 1]
    grad, n = dmd_gradient(x0_teacher, x0_critic, x_t, x_gen, "xgen")
    torch.testing.assert_close(n.flatten(), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(grad, torch.tensor([[2.0, -2.0], [0.0, 2.0]]))


@pytest.mark.parametrize("normaliser", ["xt", "xgen"])
def test_dmd_loss_gradient_is_grad_over_numel(normaliser):
    g = torch.Generator().manual_seed(3)
    x_gen = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    x0_teacher, x0_critic = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    x_t = 0.4 * x_gen.detach() + 0.6 * torch.randn(3, 2, 4, 4, generator=g)
    out = dmd_loss(x_gen, x0_teacher, x0_critic, x_t, normaliser)
    out.loss.backward()
    grad, _ = dmd_gradient(x0_teacher, x0_critic, x_t, x_gen, normaliser)
    torch.testing.assert_close(x_gen.grad, grad / x_gen.numel(), atol=1e-8, rtol=1e-6)
    # the step moves x_gen along -grad: towards the teacher's x0, away from the critic's
    assert (x_gen.grad * (x0_critic - x0_teacher)).sum() > 0


def test_dmd_loss_is_zero_when_critic_and_teacher_agree():
    x_gen, x0_teacher, _, x_t = _dmd_inputs()
    out = dmd_loss(x_gen, x0_teacher, x0_teacher.clone(), x_t)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(x_gen.grad) == 0


def test_dmd_loss_refuses_an_unknown_normaliser():
    x_gen, x0_teacher, x0_critic, x_t = _dmd_inputs()
    with pytest.raises(ValueError, match="normaliser"):
        dmd_loss(x_gen, x0_teacher, x0_critic, x_t, "dmd3")


def test_critic_loss_value_and_no_gradient_into_generator():
    x_gen = torch.tensor([[1.0, 0.0]], requires_grad=True)
    eps = torch.tensor([[0.0, 2.0]])
    v = torch.tensor([[0.0, 0.0]], requires_grad=True)
    out = critic_loss(v, x_gen, eps)
    # target eps - x_gen = [-1, 2]: mean((0 + 1)^2, (0 - 2)^2) = 2.5
    assert out.loss.item() == pytest.approx(2.5)
    out.loss.backward()
    assert x_gen.grad is None
    torch.testing.assert_close(v.grad, torch.tensor([[1.0, -2.0]]))


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    assert flow_matching_loss(eps - x0, x0, eps).loss.item() == 0.0


def test_generator_objective_adds_lambda_times_diversity():
    x_gen, x0_teacher, x0_critic, x_t = _dmd_inputs()
    dmd = dmd_loss(x_gen, x0_teacher, x0_critic, x_t)
    div = diversity_loss(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2))  # loss 2
    out = generator_objective(dmd, div, 0.05)
    assert out.loss.item() == pytest.approx(dmd.loss.item() + 0.05 * 2.0)
    assert generator_objective(dmd, div, 0.0).loss.item() == pytest.approx(dmd.loss.item())
    assert {"loss_dmd", "loss_div", "loss_generator"} <= out.metrics.keys()


def test_nan_in_the_teacher_prediction_is_reported_not_zeroed():
    x_gen, x0_teacher, x0_critic, x_t = _dmd_inputs()
    x0_teacher = x0_teacher.clone()
    x0_teacher[0, 0] = float("nan")
    out = dmd_loss(x_gen, x0_teacher, x0_critic, x_t)
    assert torch.isnan(out.loss)
    assert not bool(out.finite_flag())
    assert "dmd.x0_teacher" in out.nonfinite_terms()
    with pytest.raises(NonFiniteLossError, match="dmd.x0_teacher") as info:
        out.raise_if_nonfinite(where="generator step 7")
    assert "generator step 7" in str(info.value)


def test_zero_normaliser_is_caught():
    x_gen, x0_teacher, x0_critic, _ = _dmd_inputs()
    out = dmd_loss(x_gen, x0_teacher, x0_critic, x_t=x0_teacher.clone())
    assert "dmd.normaliser" in out.nonfinite_terms() or "dmd.loss" in out.nonfinite_terms()
    assert not bool(out.finite_flag())


def test_finite_losses_pass():
    x_gen, x0_teacher, x0_critic, x_t = _dmd_inputs()
    out = dmd_loss(x_gen, x0_teacher, x0_critic, x_t)
    assert bool(out.finite_flag()) and out.nonfinite_terms() == []
    out.raise_if_nonfinite()
