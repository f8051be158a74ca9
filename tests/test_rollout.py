"""The stop-gradient boundary of the generator rollout, and the teacher's anchor rollout."""

import pytest
import torch

from models.flow import ode_rollout, sampling_sigmas
from models.losses import anchor_velocity, diversity_loss, dmd_loss
from models.rollout import generator_rollout, teacher_anchor


class PerStepGenerator(torch.nn.Module):
    """v(x, t) = a_i x + b_i, with its own (a_i, b_i) for each of the N steps: contributions told apart."""

    def __init__(self, sigmas: torch.Tensor):
        super().__init__()
        self.sigmas = sigmas[:-1]
        n = self.sigmas.numel()
        self.a = torch.nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.b = torch.nn.Parameter(torch.linspace(-0.3, 0.3, n))

    def forward(self, x, t):
        i = int((self.sigmas - t[0]).abs().argmin())
        assert bool((t == self.sigmas[i]).all())
        return self.a[i] * x + self.b[i]


def _losses(detach_first_step: bool):
    sigmas = sampling_sigmas(4, 3.0)
    gen = PerStepGenerator(sigmas)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 2, generator=g)
    rollout = generator_rollout(gen, eps, sigmas, detach_first_step)
    x0_teacher, x0_critic = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    x_t = 0.5 * rollout.x_gen.detach() + 0.5 * torch.randn(3, 2, generator=g)
    l_dmd = dmd_loss(rollout.x_gen, x0_teacher, x0_critic, x_t).loss
    l_div = diversity_loss(rollout.v_first, anchor_velocity(eps, torch.randn(3, 2, generator=g), 0.9)).loss
    return gen, l_dmd, l_div


def _grads(gen, loss):
    gen.zero_grad()
    loss.backward()
    return gen.a.grad.clone(), gen.b.grad.clone()


def test_dmd_term_reaches_only_steps_2_to_n():
    gen, l_dmd, _ = _losses(detach_first_step=True)
    a, b = _grads(gen, l_dmd)
    assert a[0] == 0 and b[0] == 0
    assert bool((a[1:] != 0).all()) and bool((b[1:] != 0).all())


def test_diversity_term_reaches_only_step_1():
    gen, _, l_div = _losses(detach_first_step=True)
    a, b = _grads(gen, l_div)
    assert a[0] != 0 and b[0] != 0
    assert bool((a[1:] == 0).all()) and bool((b[1:] == 0).all())


def test_without_the_stop_gradient_the_dmd_term_reaches_step_1():
    gen, l_dmd, _ = _losses(detach_first_step=False)
    a, b = _grads(gen, l_dmd)
    assert a[0] != 0 and b[0] != 0


def test_a_flag_per_row_cuts_the_dmd_term_from_step_1_of_those_rows_only():
    """Trials trained together, DMD (no stop-gradient) beside DP-DMD (the stop-gradient): one rollout, a flag per row."""
    sigmas = sampling_sigmas(4, 3.0)
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    grads = []
    for detach in (torch.tensor([False, False, True, True]), False, True):
        gen = PerStepGenerator(sigmas)
        first = eps.clone().requires_grad_(True)  # step 1's gradient, row by row, is what reaches its input
        rollout = generator_rollout(gen, first, sigmas, detach)
        rollout.x_gen.pow(2).sum().backward()
        grads.append(torch.zeros_like(first) if first.grad is None else first.grad)  # None: no path at all
    mixed, plain, detached = grads
    torch.testing.assert_close(mixed[:2], plain[:2])
    assert bool((mixed[2:] == 0).all()) and bool((detached == 0).all()) and bool((plain != 0).all())


def test_rollout_values_do_not_depend_on_the_stop_gradient():
    sigmas = sampling_sigmas(4, 3.0)
    gen = PerStepGenerator(sigmas)
    eps = torch.randn(4, 2)
    a = generator_rollout(gen, eps, sigmas, True)
    b = generator_rollout(gen, eps, sigmas, False)
    torch.testing.assert_close(a.x_gen, b.x_gen)
    torch.testing.assert_close(a.x_gen, ode_rollout(gen, eps, sigmas))
    torch.testing.assert_close(a.x_first, eps + (sigmas[1] - 1) * gen(eps, torch.ones(4)))


def test_teacher_anchor_runs_k_euler_steps():
    sigmas = sampling_sigmas(30, 3.0)
    eps = torch.randn(2, 3)
    field = lambda x, t: 0.7 * x - t[:, None]  # noqa: E731
    anchor = teacher_anchor(field, eps, sigmas, 5)
    x = eps
    for i in range(5):
        x = x + (sigmas[i + 1] - sigmas[i]) * field(x, sigmas[i].expand(2))
    torch.testing.assert_close(anchor.z, x)
    assert anchor.t == sigmas[5]
    assert anchor.t == pytest.approx(0.9353, abs=5e-5)


@pytest.mark.parametrize("k", [0, 31])
def test_teacher_anchor_rejects_k_outside_the_schedule(k):
    with pytest.raises(ValueError, match="anchor_step"):
        teacher_anchor(lambda x, t: x, torch.randn(1, 2), sampling_sigmas(30, 3.0), k)
