"""Precision where it matters: anchors integrated in float32, and flow times that stay float32 when the
networks train in bf16 (the generator trains at the timesteps its exported scheduler samples at)."""

import json

import pytest
import torch

from helpers import tiny_config
from models.flow import ode_rollout, sampling_sigmas, training_sigmas
from models.losses import anchor_velocity
from models.families.toy2d import Toy2DAdapter
from orchestrator.precompute import precompute
from workers.context import LocalContext
from workers.evaluate import GENERATOR_META
from workers.teacher import load_teacher
from workers.train import GENERATOR_DIR, store_source, train


class RecordingAdapter(Toy2DAdapter):
    """Toy2D, noting the dtype and value of every t a network is called at."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.times: list[torch.Tensor] = []

    def network_velocity(self, net, x_t, t, cond):
        self.times.append(t.detach().clone())
        return super().network_velocity(net, x_t, t, cond)


@pytest.mark.parametrize("zero_stage", [2, 0])  # 0: DeepSpeed's bf16 optimizer without ZeRO, which trains on CPUs too
def test_bf16_training_calls_the_networks_at_the_exported_scheduler_times(tmp_path, zero_stage):
    # shift 3: the generator's times 0.8577, 0.6022, 0.0089 have no exact bf16 form
    config = tiny_config(tmp_path, "teacher.shift=3.0", "distributed.precision=bf16", f"distributed.zero_stage={zero_stage}",
                         "schedule.num_generator_updates=2", "schedule.checkpoint_every=0")
    store, _ = precompute(config, use_ray=False, progress=False)
    plain, net = load_teacher(config, "cpu", torch.bfloat16)
    adapter = RecordingAdapter(plain.num_classes)
    train(config, LocalContext(tmp_path / "run", resume=False), store_source(store), store.negative(),
          teacher=(adapter, net))

    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-0000002" / GENERATOR_DIR / GENERATOR_META).read_text())
    exported = torch.tensor(meta["sigmas"][:-1], dtype=torch.float32)
    torch.testing.assert_close(torch.tensor(meta["timesteps"]) / 1000, exported, atol=1e-6, rtol=0)
    allowed = torch.cat([exported, training_sigmas(config.teacher.shift)])
    times = torch.cat(adapter.times)
    assert all(t.dtype == torch.float32 for t in adapter.times)
    distance = (times[:, None] - allowed[None]).abs().min(dim=1).values
    assert float(distance.max()) == 0.0  # every call at an exact float32 schedule time
    for sigma in exported:  # the generator's rollout visited each of its times
        assert bool((times == sigma).any())


def test_anchor_targets_match_a_float64_rollout_when_training_in_bf16(tmp_path):
    for k in (1, 5):
        config = tiny_config(tmp_path, f"loss.anchor_step={k}", "distributed.precision=bf16")
        store, _ = precompute(config, use_ray=False, progress=False)
        batch = next(store.batches(16))
        assert batch.eps.dtype == batch.z.dtype == batch.t_anchor.dtype == torch.float32

        _, teacher = load_teacher(config)
        teacher = teacher.double()
        ids, null = batch.cond.tensors["class_ids"], store.negative().tensors["class_ids"].expand(16)

        def guided(x, t):
            v_u, v_c = teacher(x, t, null), teacher(x, t, ids)
            return v_u + config.teacher.guidance_scale * (v_c - v_u)

        sigmas = sampling_sigmas(config.teacher.num_steps, config.teacher.shift).double()[: k + 1]
        with torch.no_grad():
            z = ode_rollout(guided, batch.eps.double(), sigmas)
        ours, exact = anchor_velocity(batch.eps, batch.z, batch.t_anchor).double(), anchor_velocity(
            batch.eps.double(), z, sigmas[-1])
        error = float((ours - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
        assert error < 1e-5, (k, error)
