"""The train function in a single process (no Ray): update isolation, non-finite losses, resume."""

import json

import pytest
import torch

from helpers import tiny_config
from models.flow import interpolate
from models.losses import NonFiniteLossError, critic_loss
from orchestrator.precompute import precompute
from workers.context import LocalContext
from workers.distill import Distiller
from workers.engines import build_engine, distributed
from workers.distill import copy_for_training
from workers.evaluate import load_generator
from workers.teacher import load_teacher
from workers.train import ENGINE_TAGS, GENERATOR_DIR, store_source, train


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill")
    precompute(tiny_config(path), use_ray=False, progress=False)
    return path


def _store(config):
    return precompute(config, use_ray=False, progress=False)[0]


def _params(module):
    params = list(module.parameters())
    if hasattr(params[0], "ds_id"):  # ZeRO-3 partitions them: gathered to be read
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_critic_steps_leave_the_generator_and_generator_steps_the_critic(out):
    config = tiny_config(out, "distributed.zero_stage=2")
    with distributed(False):
        _critic_and_generator_steps(config)


def _critic_and_generator_steps(config):
    adapter, teacher = load_teacher(config)
    generator = build_engine(copy_for_training(teacher), config.generator.optim, config)
    critic = build_engine(copy_for_training(teacher), config.critic.optim, config)
    store = _store(config)
    d = Distiller(config, adapter, teacher, generator, critic, torch.device("cpu"), torch.Generator().manual_seed(0),
                  store.negative())
    g0, c0, t0 = _params(generator.module), _params(critic.module), _params(teacher)
    prompts = next(store.prompt_batches(8))
    d.critic_step(prompts, d.generator_samples([prompts])[0], "critic")
    g1, c1 = _params(generator.module), _params(critic.module)
    assert _same(g0, g1) and not _same(c0, c1)
    d.generator_step(next(store.batches(8)), "generator")
    g2, c2 = _params(generator.module), _params(critic.module)
    assert not _same(g1, g2) and _same(c1, c2)
    assert _same(t0, _params(teacher))  # the teacher never moves


def _poisoned(store, at_batch):
    """The store's data with a NaN in the anchor of generator batch at_batch."""
    def source(config, ctx, progress):
        data = store_source(store)(config, ctx, progress)

        def anchors(clean):
            for i, batch in enumerate(clean):
                if i == at_batch:
                    batch.z = batch.z.clone()
                    batch.z[0, 0] = float("nan")
                yield batch
        data.anchors = anchors(data.anchors)
        return data
    return source


def test_a_nan_stops_the_run_naming_the_step_and_the_term(out, tmp_path):
    config = tiny_config(out)
    store = _store(config)
    with pytest.raises(NonFiniteLossError) as info:
        train(config, LocalContext(tmp_path / "run", resume=False), _poisoned(store, 0), store.negative())
    assert "generator update 1" in str(info.value)
    assert "div.target" in info.value.terms


def test_skip_mode_skips_on_every_rank_and_counts(out, tmp_path):
    config = tiny_config(out, "schedule.on_nonfinite=skip")
    store = _store(config)
    progress = train(config, LocalContext(tmp_path / "run", resume=False), _poisoned(store, 0), store.negative())
    assert progress.generator_updates == 4 and progress.skipped_steps == 1
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped_steps"] == 1


def test_resume_continues_to_the_same_weights(out, tmp_path):
    config = tiny_config(out)
    store = _store(config)
    straight = train(config, LocalContext(tmp_path / "a", resume=False), store_source(store), store.negative())
    assert (straight.generator_updates, straight.critic_updates) == (4, 8)
    assert (straight.rows_consumed, straight.prompt_rows_consumed) == (32, 64)  # anchors: generator updates only

    half = tiny_config(out, "schedule.num_generator_updates=2")
    train(half, LocalContext(tmp_path / "b", resume=False), store_source(store), store.negative())
    resumed = train(config, LocalContext(tmp_path / "b", resume=True), store_source(store), store.negative())
    assert (resumed.generator_updates, resumed.critic_updates) == (4, 8)
    assert (resumed.rows_consumed, resumed.prompt_rows_consumed) == (32, 64)

    # a checkpoint of the layout before the engines had tags of their own (their files in the export's
    # directory) resumes too
    old = tmp_path / "c"
    train(half, LocalContext(old, resume=False), store_source(store), store.negative())
    step = old / "checkpoints" / "step-0000002"
    for tag in ENGINE_TAGS:
        for file in (step / ENGINE_TAGS[tag]).iterdir():
            (step / tag).mkdir(exist_ok=True)
            file.rename(step / tag / file.name)
        (step / ENGINE_TAGS[tag]).rmdir()
    train(config, LocalContext(old, resume=True), store_source(store), store.negative())

    # the newest two checkpoints stay, as a Ray Train run keeps them (all four stayed before)
    train(tiny_config(out, "schedule.checkpoint_every=1"), LocalContext(tmp_path / "d", resume=False),
          store_source(store), store.negative())
    assert sorted(p.name for p in (tmp_path / "d" / "checkpoints").iterdir()) == ["latest", "step-0000003",
                                                                                  "step-0000004"]

    _, a, _ = load_generator(tmp_path / "a" / "checkpoints" / "step-0000004" / GENERATOR_DIR)
    for run in ("b", "c"):
        _, b, sampler = load_generator(tmp_path / run / "checkpoints" / "step-0000004" / GENERATOR_DIR)
        for x, y in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    assert sampler.guidance_scale is None and len(sampler.sigmas) == config.generator.num_steps + 1


def test_the_export_holds_no_pickles_and_the_engines_sit_beside_it(out, tmp_path):
    """The export (what `dpdmd sample` and the diffusers pipeline class load) was also DeepSpeed's checkpoint
    directory of the generator: its pickled module and optimizer states, several times the model's bytes, went
    wherever the generator was shared, and loading them runs code."""
    config = tiny_config(out, "schedule.num_generator_updates=2")
    store = _store(config)
    train(config, LocalContext(tmp_path, resume=False), store_source(store), store.negative())
    step = tmp_path / "checkpoints" / "step-0000002"
    export = step / GENERATOR_DIR
    files = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
    assert "dpdmd_generator.json" in files and any(f.endswith(".safetensors") for f in files), files
    assert not [f for f in files if f.rsplit(".", 1)[-1] in ("pt", "pth", "pkl", "pickle", "bin", "ckpt")], files
    for tag in ENGINE_TAGS.values():  # DeepSpeed's own checkpoint, for --resume
        assert list((step / tag).glob("*model_states.pt")), tag
    _, net, _ = load_generator(export)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_gradient_checkpointing_is_refused_where_the_network_lacks_it(out, tmp_path):
    from workers.config import ConfigError

    config = tiny_config(out, "generator.gradient_checkpointing=true")
    store = _store(config)
    with pytest.raises(ConfigError, match="generator.gradient_checkpointing"):
        train(config, LocalContext(tmp_path / "run", resume=False), store_source(store), store.negative())


def test_bf16_zero3_on_cpu_trains_and_the_evaluate_command_reads_the_generator(out, tmp_path, capsys):
    from orchestrator import cli

    config = tiny_config(out, "distributed.precision=bf16", "distributed.zero_stage=3")
    store = _store(config)
    progress = train(config, LocalContext(tmp_path / "run", resume=False), store_source(store), store.negative())
    assert progress.generator_updates == 4
    generator = tmp_path / "run" / "checkpoints" / "step-0000004" / GENERATOR_DIR
    _, net, _ = load_generator(generator)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert cli.main(["evaluate", "--generator", str(generator), f"storage.output_dir={tmp_path}",
                     "evaluation.seeds_per_prompt=10"]) == 0
    assert "| generator |" in capsys.readouterr().out


def test_torchrun_two_ranks_without_ray_consume_each_anchor_row_once_and_critic_updates_consume_none(tmp_path):
    """`dpdmd distill --no-ray` under torchrun (rank 0 fills the store, both ranks stream their own rows), with
    the rows each rank's updates consumed recorded (tests/record_rows.py). One run for two properties (each was a
    run of its own)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import TINY_DISTILL, TINY_STORE, TINY_TEACHER

    overrides = [*TINY_TEACHER, *TINY_STORE, *TINY_DISTILL, f"storage.output_dir={tmp_path}",
                 "trajectories.seeds_per_prompt=0", "schedule.num_generator_updates=6", "distributed.num_workers=2"]
    config = tiny_config(tmp_path, *overrides[len(TINY_TEACHER) + len(TINY_STORE) + len(TINY_DISTILL) + 1:])
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tests/record_rows.py", str(tmp_path), *overrides],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    store, summary = precompute(config, use_ray=False, progress=False)
    assert summary.reused and store.num_rows == 96  # rank 0 sized it for 2 ranks x 6 updates x 8 rows
    run = next((tmp_path / "runs").glob("*-distill-toy2d"))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["generator_update"] == 6 and lines[-1]["critic_updates"] == 12
    assert (run / "checkpoints" / "step-0000006" / "rng_rank1.pt").is_file()  # both ranks checkpointed
    load_generator(run / GENERATOR_DIR)

    logs = [json.loads((tmp_path / f"rows_rank{r}.json").read_text()) for r in (0, 1)]
    rows = [tuple(row) for log in logs for row in log["anchor_rows"]]
    assert len(rows) == 2 * 6 * 8 and len(set(rows)) == len(rows)  # every generator row new, across both ranks
    for log in logs:
        assert len(log["anchor_rows"]) == 6 * 8  # one anchor batch per generator update, none for the critic
        assert log["prompt_batches"] == 6 * 2  # one prompt batch per critic update
        assert (log["progress"]["rows_consumed"], log["progress"]["prompt_rows_consumed"]) == (48, 96)


def test_an_in_process_run_leaves_the_environment_as_it_found_it(out, tmp_path):
    import os

    before = dict(os.environ)
    config = tiny_config(out)
    store = _store(config)
    train(config, LocalContext(tmp_path / "run", resume=False), store_source(store), store.negative())
    assert dict(os.environ) == before  # no RANK, MASTER_PORT, LOCAL_RANK, DS_ACCELERATOR left for child processes


def _engines() -> int:
    import gc

    from deepspeed import DeepSpeedEngine

    gc.collect()
    return sum(issubclass(type(o), DeepSpeedEngine) for o in gc.get_objects())


def test_train_releases_both_engines_when_it_returns(out, tmp_path):
    # DeepSpeed's gradient hooks keep an engine alive past its last reference; a process that trains twice
    # (sweeps without Ray, benchmarks) must not hold the first run's engines and optimizer state.
    config = tiny_config(out)
    store = _store(config)
    before = _engines()
    train(config, LocalContext(tmp_path / "run", resume=False), store_source(store), store.negative(), save=False)
    assert _engines() == before


def test_optimizer_parameter_groups_take_the_same_update(out, tmp_path, monkeypatch):
    """The ZeRO step goes group by group through a float32 copy of each group's gradient; cutting the
    parameters into groups changes nothing but the order in which the clipping norm adds up its parts."""
    import workers.engines as engines

    config = tiny_config(out, "distributed.zero_stage=2", "generator.optim.grad_clip=0.01")
    store = _store(config)

    def losses(name: str) -> list[dict]:
        cycles: list[dict] = []
        train(config, LocalContext(tmp_path / name, resume=False), store_source(store), store.negative(),
              on_cycle=lambda progress, metrics: cycles.append(dict(metrics)), save=False)
        return cycles

    whole = losses("whole")
    monkeypatch.setattr(engines, "OPTIMIZER_GROUP_NUMEL", 2000)
    assert len(engines.parameter_groups(list(load_teacher(config)[1].parameters()))) >= 3
    grouped = losses("grouped")
    assert len(whole) == len(grouped) == config.schedule.num_generator_updates
    for a, b in zip(whole, grouped):
        for key in ("loss_dmd", "loss_div", "loss_critic"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("settings", [("distributed.precision=bf16", "distributed.zero_stage=2"),
                                      ("distributed.zero_stage=1",),
                                      ("distributed.precision=bf16", "critic.optim.offload=true"),
                                      ("critic.optim.offload=true",), ("distributed.zero_stage=3",),
                                      ("distributed.precision=bf16", "distributed.zero_stage=3")])
def test_an_update_with_non_finite_gradients_is_not_applied(out, settings):
    """A finite loss whose gradients hold a NaN (here put there by a hook on one critic weight): the update
    leaves every weight as it was and raises, naming the gradients; in skip mode it is counted and the next
    clean update applies. Under ZeRO-1/2 DeepSpeed's own per-parameter bf16 check is off (workers/engines.py):
    without the guard the NaN would reach every weight through the clipping. Under ZeRO-3, and with the optimizer
    offloaded, DeepSpeed skips the update itself, and the run reports it the same way."""
    config = tiny_config(out, *settings)
    skip = tiny_config(out, *settings, "schedule.on_nonfinite=skip")
    with distributed(False):
        adapter, teacher = load_teacher(config)
        critic = build_engine(copy_for_training(teacher), config.critic.optim, config)
        generator = build_engine(copy_for_training(teacher), config.generator.optim, config)
        store = _store(config)
        prompts = next(store.prompt_batches(8))
        for cfg in (config, skip):
            d = Distiller(cfg, adapter, teacher, generator, critic, torch.device("cpu"),
                          torch.Generator().manual_seed(0), store.negative())
            x_gen = d.generator_samples([prompts])[0]
            before = _params(critic.module)
            hook = next(critic.module.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
            if cfg is config:
                with pytest.raises(NonFiniteLossError, match="gradients"):
                    d.critic_step(prompts, x_gen, "critic update 1")
            else:
                assert d.critic_step(prompts, x_gen, "critic update 1") == {"skipped": 1.0} and d.skipped == 1
            hook.remove()
            after = _params(critic.module)
            assert _same(before, after) and all(torch.isfinite(p).all() for p in after)
        assert "loss_critic" in d.critic_step(prompts, x_gen, "critic update 2")
        assert not _same(after, _params(critic.module)) and all(torch.isfinite(p).all() for p in critic.module.parameters())


def test_the_clipping_norm_is_deepspeeds_from_one_kernel_per_group(out, monkeypatch):
    """ZeRO-1/2's global gradient norm (clipping, skipped updates) comes from torch._foreach_norm: the value
    DeepSpeed's own per-gradient loop gives (to the bit: with float32 accumulation the CPU demo's digits moved),
    without a vector_norm call per gradient (908 per SD3.5 update).
    bf16 ZeRO-2 as the SD3.5 recipes run it; ZeRO-1 goes through the same optimizer method."""
    config = tiny_config(out, "distributed.precision=bf16", "distributed.zero_stage=2")
    with distributed(False):
        adapter, teacher = load_teacher(config)
        critic = build_engine(copy_for_training(teacher), config.critic.optim, config)
        store = _store(config)
        d = Distiller(config, adapter, teacher, critic, critic, torch.device("cpu"), torch.Generator().manual_seed(0),
                      store.negative())
        prompts = next(store.prompt_batches(8))
        x_gen = d.generator_samples([prompts])[0]
        t, eps2 = d._draw_t(len(x_gen)), d._noise(x_gen.shape)  # critic_step's loss, not its step: the
        loss = critic_loss(adapter.velocity(critic.module, interpolate(x_gen, eps2, t), t, prompts.cond), x_gen, eps2)
        critic.backward(loss.loss)  # gradients stay in the optimizer
        optimizer = critic.optimizer
        calls = []
        vector_norm = torch.linalg.vector_norm
        monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: calls.append(1) or vector_norm(*a, **k))
        fused = optimizer.scaled_global_norm()
        fused_calls = len(calls)
        vars(optimizer).pop("get_grad_norm_direct", None)  # DeepSpeed's own method again
        own = optimizer.scaled_global_norm()
        gradients = sum(len(g) for g in optimizer.averaged_gradients.values())
        assert fused_calls <= len(optimizer.bit16_groups) and len(calls) - fused_calls >= gradients > 1
        assert torch.isfinite(fused) and float(fused) > 0
        assert float(fused) == float(own)  # to the bit: float32 runs (the CPU demo) clip as they did before


def test_what_outlives_the_first_cycle_is_frozen_for_the_collector_until_train_ends(out, tmp_path):
    """Python's full collections walked every long-lived object of a run (about a million for SD3.5: 0.6-0.8 s
    with every thread waiting, every few cycles); from the first cycle on they sit in the permanent generation,
    and train() gives them back when it returns or fails."""
    import gc

    config = tiny_config(out)
    store = _store(config)
    sentinel = [object()]  # alive through the run, tracked by the collector
    seen = []

    def on_cycle(progress, metrics):
        seen.append((gc.get_freeze_count(), any(o is sentinel for o in gc.get_objects())))

    train(config, LocalContext(tmp_path / "run", resume=False), store_source(store), store.negative(),
          on_cycle=on_cycle, save=False)
    assert len(seen) == 4 and all(frozen > 0 and not walked for frozen, walked in seen)
    assert gc.get_freeze_count() == 0 and any(o is sentinel for o in gc.get_objects())

    with pytest.raises(NonFiniteLossError):  # a run that fails after the first cycle thaws them too
        train(config, LocalContext(tmp_path / "failed", resume=False), _poisoned(store, 1), store.negative(),
              save=False)
    assert gc.get_freeze_count() == 0


OFFLOAD = ("generator.optim.offload=true", "critic.optim.offload=true")


def _losses(config, run_dir, resume=False) -> list[float]:
    store = _store(config)
    seen: list[dict] = []
    train(config, LocalContext(run_dir, resume=resume), store_source(store), store.negative(),
          on_cycle=lambda progress, metrics: seen.append(dict(metrics)))
    return [m[key] for m in seen for key in ("loss_critic", "loss_dmd")]


@pytest.mark.parametrize("settings", [("distributed.precision=fp32",), ("distributed.precision=bf16",),
                                      ("distributed.zero_stage=3",)])
def test_an_offloaded_optimizer_updates_in_host_memory_as_the_devices_would_and_resumes(out, tmp_path, settings):
    """generator.optim.offload / critic.optim.offload: DeepSpeed's ZeRO-Offload with the client AdamW (its own
    CPU Adam is a C++ build it would demand), the float32 master weights in host memory, DeepSpeed's own overflow
    check; every cycle's losses those of the run without it, and a resumed run ends where the straight one does."""
    config = tiny_config(out, *settings, *OFFLOAD)
    with distributed(False):
        engine = build_engine(copy_for_training(load_teacher(config)[1]), config.critic.optim, config)
        plain = build_engine(copy_for_training(load_teacher(config)[1]), tiny_config(out, *settings).critic.optim,
                             config)
        if config.distributed.zero_stage == 3:
            assert engine.optimizer.offload_optimizer and not plain.optimizer.offload_optimizer
        else:
            assert engine.optimizer.cpu_offload and not plain.optimizer.cpu_offload
    offloaded = _losses(config, tmp_path / "offloaded")
    assert offloaded == pytest.approx(_losses(tiny_config(out, *settings), tmp_path / "plain"), rel=1e-5, abs=1e-7)
    _losses(tiny_config(out, *settings, *OFFLOAD, "schedule.num_generator_updates=2"), tmp_path / "half")
    resumed = _losses(config, tmp_path / "half", resume=True)
    assert resumed == pytest.approx(offloaded[4:], rel=1e-5, abs=1e-7)  # updates 3 and 4


def test_offloading_an_optimizer_needs_zero_and_is_refused_for_trials_trained_together(out):
    from workers.config import ConfigError
    from workers.trials import check_batchable

    with pytest.raises(ConfigError, match=r"critic\.optim\.offload.*zero_stage 1, 2 or 3"):
        tiny_config(out, "distributed.zero_stage=0", "critic.optim.offload=true")
    with pytest.raises(ConfigError, match=r"generator\.optim\.offload.*set it to false"):
        check_batchable([tiny_config(out, "generator.optim.offload=true")])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_an_offloaded_optimizer_keeps_its_state_in_host_memory_and_trains_as_on_the_gpu(out, tmp_path):
    """ZeRO-Offload on a GPU: pinned host copies, PyTorch's fused AdamW on the CPU, the bf16 weights copied back
    to the GPU after each step; the run's losses those of the optimizer on the GPU, to bf16's rounding (the two
    compute the clipping norm differently: on one H100, 2026-12-07, the losses of four cycles differed by up to
    0.46%, relative)."""
    settings = ("distributed.use_gpu=true", "distributed.precision=bf16")
    config = tiny_config(out, *settings, *OFFLOAD)
    with distributed(True):
        engine = build_engine(copy_for_training(load_teacher(config, torch.device("cuda"))[1]), config.critic.optim,
                              config)
        assert engine.optimizer.cpu_offload
        assert all(p.device.type == "cpu" and p.is_pinned() for p in engine.optimizer.single_partition_of_fp32_groups)
        assert all(p.device.type == "cuda" for p in engine.module.parameters())
    offloaded = _losses(config, tmp_path / "offloaded")
    on_gpu = _losses(tiny_config(out, *settings), tmp_path / "on-gpu")
    assert offloaded == pytest.approx(on_gpu, rel=1e-2, abs=1e-4)
