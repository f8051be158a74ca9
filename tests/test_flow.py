"""Flow-matching conventions and the diffusers-derived schedules (docs/method.md)."""

import pytest
import torch

from models.flow import (cfg_combine, euler_step, expand_t, interpolate, ode_rollout, sampling_sigmas,
                         training_sigmas, velocity_from_x0, velocity_target, x0_from_velocity)


def test_teacher_sigmas_at_anchor_steps_with_shift_3():
    sigmas = sampling_sigmas(30, shift=3.0)
    assert sigmas.shape == (31,)
    expected = torch.tensor([0.9883, 0.9631, 0.9353, 0.8513])
    torch.testing.assert_close(sigmas[[1, 3, 5, 10]], expected, atol=5e-5, rtol=0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_four_step_generator_sigmas_with_shift_3():
    torch.testing.assert_close(sampling_sigmas(4, shift=3.0), torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]),
                               atol=5e-5, rtol=0)


def test_shift_1_is_the_linear_schedule():
    sigmas = sampling_sigmas(4, shift=1.0)
    # diffusers spaces the timesteps between 1 and its smallest training sigma (1/1000)
    torch.testing.assert_close(sigmas[:-1], torch.linspace(1.0, 0.001, 4), atol=1e-6, rtol=0)


def test_training_sigmas_are_the_shifted_1000_step_table():
    table = training_sigmas(shift=3.0)
    assert table.shape == (1000,)
    assert table[0] == pytest.approx(1.0)
    assert bool((table[1:] < table[:-1]).all())
    t = 0.5  # shift s maps t to s t / (1 + (s - 1) t)
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    i = int((unshifted - t).abs().argmin())
    assert table[i] == pytest.approx(3 * t / (1 + 2 * t), abs=1e-4)


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="num_steps"):
        sampling_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        sampling_sigmas(4, 0.0)


def test_cfg_combine_uses_w_exactly():
    v_u, v_c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])
    torch.testing.assert_close(cfg_combine(v_u, v_c, 0.0), v_u)
    torch.testing.assert_close(cfg_combine(v_u, v_c, 1.0), v_c)
    # v_u + 3.5 (v_c - v_u) = [1 + 3.5 * 2, -2 + 3.5 * 4]
    torch.testing.assert_close(cfg_combine(v_u, v_c, 3.5), torch.tensor([8.0, 12.0]))


def test_v_x0_round_trip_and_interpolant():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.rand(5, generator=g) * 0.98 + 0.01
    x_t = interpolate(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, t), v, atol=1e-4, rtol=0)
    torch.testing.assert_close(x0_from_velocity(x_t, velocity_from_x0(x_t, x0, t), t), x0, atol=1e-5, rtol=0)


def test_euler_step_by_hand():
    x, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, -2.0]])
    torch.testing.assert_close(euler_step(x, v, 1.0, 0.75), torch.tensor([[0.0, 2.5]]))


def test_ode_rollout_is_exact_on_a_single_point_flow():
    # the exact velocity towards one data point x0 is (x_t - x0) / t; Euler integrates it without error
    x0 = torch.tensor([[0.3, -1.2]])
    eps = torch.tensor([[1.5, 0.4]])
    out = ode_rollout(lambda x, t: (x - x0) / t[:, None], eps, sampling_sigmas(30, 3.0)[:-1])
    expected = interpolate(x0, eps, sampling_sigmas(30, 3.0)[-2])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_expand_t_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="shape"):
        expand_t(torch.ones(3), torch.ones(2, 4))
    assert expand_t(torch.ones(2), torch.ones(2, 3, 5, 5)).shape == (2, 1, 1, 1)
