"""The sdxl family on tiny random StableDiffusionXLPipelines built in code: the EDM <-> flow conversions, the
adapter against the pipeline's own sampling loop, the teacher's x0 estimate at the anchor, what each role
loads, clear errors, and precompute -> distill on 2 Ray workers -> export -> StableDiffusionXLPipeline."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from models.families import sdxl
from models.adapter import Conditioning, LoadOptions
from models.flow import euler_step, x0_from_velocity
from models.rollout import teacher_anchor
from models.sampling import Sampler, sample, seeded_noise
from orchestrator.recipe import resolve
from models.tiny_pipelines import sdxl_scheduler
from sd_models import prompt_file, save_tiny_sd3, save_tiny_sdxl
from workers.config import ConfigError
from workers.teacher import load_teacher

PROMPTS = ["a photo of a red cat", "a painting of a blue house", "a green tree in the snow", "a dog"]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipeline")


def sdxl_config(tmp_path, teacher_path, *overrides):
    prompts = prompt_file(tmp_path / "prompts.txt", PROMPTS)
    return resolve(None, ["teacher.family=sdxl", f"teacher.path={teacher_path}", "teacher.shift=1.0",
                          "teacher.guidance_scale=8.0", "teacher.num_steps=6", "loss.anchor_step=2",
                          f"trajectories.prompts={prompts}", f"evaluation.prompts={prompts}",
                          f"storage.output_dir={tmp_path / 'out'}", *overrides])


class StubUNet(torch.nn.Module):
    """Returns a fixed eps_hat and records what the adapter feeds it."""

    def __init__(self, eps_hat: torch.Tensor):
        super().__init__()
        self.eps_hat, self.calls = eps_hat, []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict):
        self.calls.append((sample, timestep, added_cond_kwargs))
        return (self.eps_hat,)


def stub_conditioning(batch: int) -> Conditioning:
    return Conditioning({"prompt_embeds": torch.zeros(batch, 3, 8), "text_embeds": torch.zeros(batch, 4),
                         "time_ids": torch.zeros(batch, 6)})


def test_flow_velocity_is_the_epsilon_models_x0_and_eps():
    adapter = sdxl.SDXLAdapter(64, 4, 8, sdxl_scheduler())
    g = torch.Generator().manual_seed(0)
    x_edm, eps_hat = torch.randn(3, 4, 2, 2, generator=g) * 5, torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([adapter.log_sigmas[999].exp(), 1.0, adapter.log_sigmas[0].exp()])  # timesteps 999, ?, 0
    t = sdxl.sigma_to_t(sigma)
    torch.testing.assert_close(sdxl.t_to_sigma(t), sigma)
    x_t = x_edm / (1 + sigma).view(-1, 1, 1, 1)
    net = StubUNet(eps_hat)
    v = adapter.velocity(net, x_t, t, stub_conditioning(3))
    x0_hat = x_edm - sigma.view(-1, 1, 1, 1) * eps_hat
    torch.testing.assert_close(v, eps_hat - x0_hat, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0_hat, rtol=1e-5, atol=1e-4)
    # The UNet reads the pipeline's scale_model_input of x_edm at sigma's training timestep.
    model_input, timestep, _ = net.calls[0]
    torch.testing.assert_close(model_input, x_edm / (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(timestep, torch.tensor([999.0, adapter.timesteps(torch.tensor([1.0]))[0], 0.0]),
                               atol=1e-3, rtol=0)
    # A flow Euler step is the EulerDiscreteScheduler's step in sigma, on x_edm = (1 + sigma) x_t.
    scheduler = sdxl_scheduler()
    scheduler.set_timesteps(4)
    s, s_next = scheduler.sigmas[1], scheduler.sigmas[2]
    x_edm = torch.randn(1, 4, 2, 2, generator=g) * 3
    net = StubUNet(eps_hat[:1])
    t_now, t_next = sdxl.sigma_to_t(s), sdxl.sigma_to_t(s_next)
    v = adapter.velocity(net, x_edm / (1 + s), t_now.reshape(1), stub_conditioning(1))
    ours = euler_step(x_edm / (1 + s), v, t_now, t_next) * (1 + s_next)
    scheduler._step_index = 1
    theirs = scheduler.step(eps_hat[:1], scheduler.timesteps[1], x_edm).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_timesteps_and_schedules_are_the_schedulers():
    adapter = sdxl.SDXLAdapter(64, 4, 8, sdxl_scheduler())
    teacher = sdxl_scheduler()
    teacher.set_timesteps(30)
    sigmas = adapter.sampling_sigmas(30, 1.0, "teacher")
    torch.testing.assert_close(sigmas, teacher.sigmas / (1 + teacher.sigmas))
    torch.testing.assert_close(adapter.timesteps(sdxl.t_to_sigma(sigmas[:-1])), teacher.timesteps, atol=1e-3, rtol=0)
    # The generator's 4 steps start at the top training timestep ("trailing" spacing), as DMD2's SDXL student.
    generator = adapter.sampling_sigmas(4, 1.0, "generator")
    assert generator[-1] == 0 and abs(float(generator[0]) - 14.6146 / 15.6146) < 1e-4
    torch.testing.assert_close(adapter.timesteps(sdxl.t_to_sigma(generator[:-1])),
                               torch.tensor([999.0, 749.0, 499.0, 249.0]), atol=1e-3, rtol=0)
    training = adapter.training_sigmas(1.0)
    assert training.shape == (1000,) and bool((training[:-1] > training[1:]).all())
    torch.testing.assert_close(adapter.timesteps(sdxl.t_to_sigma(training)), torch.arange(999, -1, -1).float(),
                               atol=1e-3, rtol=0)
    # Starting states: the pipeline's latents * init_noise_sigma, divided by 1 + sigma_max.
    eps = torch.ones(1, 4, 2, 2)
    s = teacher.sigmas[0]
    torch.testing.assert_close(adapter.initial_state(eps, sigmas, "teacher"), eps * (s ** 2 + 1).sqrt() / (1 + s))
    torch.testing.assert_close(adapter.initial_state(eps, generator, "generator"), eps * generator[0])
    with pytest.raises(ValueError, match="teacher.shift=1.0"):
        adapter.sampling_sigmas(30, 3.0, "teacher")


def test_sdxl_base_config_builds_the_released_unet():
    adapter, net = sdxl.random_teacher(device="meta")
    assert adapter.latent_shape == (4, 128, 128)
    assert sum(p.numel() for p in net.parameters()) == 2_567_463_684
    assert sdxl.conditioning_shapes() == {"prompt_embeds": (77, 2048), "text_embeds": (1280,), "time_ids": (6,)}


def test_adapter_reproduces_the_pipeline_and_the_anchor_is_the_teachers_ode(teacher_path):
    from diffusers import StableDiffusionXLPipeline

    adapter, net = sdxl.load_teacher(teacher_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher_path)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = PROMPTS[:2], [5, 6]
    cond, negative = adapter.encode_prompts(prompts), adapter.negative_conditioning(2)
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    torch.testing.assert_close(cond.tensors["prompt_embeds"], embeds)
    torch.testing.assert_close(cond.tensors["text_embeds"], pooled)
    assert cond.tensors["prompt_embeds"].shape == (2, 77, 64)
    torch.testing.assert_close(cond.tensors["time_ids"], torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    # force_zeros_for_empty_prompt: the pipeline's CFG runs against zeros, and so does ours.
    torch.testing.assert_close(negative.tensors["prompt_embeds"], negative_embeds)
    torch.testing.assert_close(negative.tensors["text_embeds"], negative_pooled)
    assert not negative.tensors["prompt_embeds"].any()

    # Our guided Euler sampler (w = 8) is the pipeline's own loop with its EulerDiscreteScheduler; the
    # latents after each of its steps are our flow states times 1 + sigma.
    eps = seeded_noise(seeds, adapter.latent_shape)
    steps: list[torch.Tensor] = []

    def keep(pipe, i, t, kwargs):
        steps.append(kwargs["latents"].clone())
        return kwargs

    theirs = pipe(prompts, num_inference_steps=6, guidance_scale=8.0, latents=eps.clone(), height=64, width=64,
                  output_type="latent", callback_on_step_end=keep).images
    ours = sample(adapter, net, prompts, seeds, Sampler(adapter.sampling_sigmas(6, 1.0), 8.0))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # The anchor z_K (K = 2) is the pipeline's state after K steps, and x0_anchor its x0 estimate there:
    # with x_edm = x0_hat + sigma eps_hat at steps K and K + 1, x0_hat = (s' x_K - s x_K+1) / (s' - s).
    sigmas = adapter.sampling_sigmas(6, 1.0, "teacher")
    anchor = teacher_anchor(adapter.velocity_fn(net, cond, negative, 8.0), adapter.initial_state(eps, sigmas),
                            sigmas, 2, x0_estimate=True)
    scheduler = sdxl_scheduler()
    scheduler.set_timesteps(6)
    s, s_next = scheduler.sigmas[2], scheduler.sigmas[3]
    torch.testing.assert_close(anchor.z * (1 + s), steps[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(anchor.t, s / (1 + s))
    torch.testing.assert_close(anchor.x0, (s_next * steps[1] - s * steps[2]) / (s_next - s), atol=1e-4, rtol=1e-4)
    images = adapter.decode(ours)
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1


def test_each_role_loads_only_what_it_needs(tmp_path, teacher_path):
    config = sdxl_config(tmp_path, teacher_path)
    adapter, _ = load_teacher(config, text_encoders=False)
    assert adapter.text_pipeline is None and adapter.vae is None
    with pytest.raises(RuntimeError, match="trajectory store"):
        adapter.encode_prompts(["a dog"])
    with pytest.raises(RuntimeError, match="vae=True"):
        adapter.decode(torch.zeros(1, *adapter.latent_shape))
    adapter, net = load_teacher(config, vae=True, dtype=torch.bfloat16)
    assert net.dtype == torch.bfloat16 and adapter.text_pipeline.text_encoder_2.dtype == torch.bfloat16
    cond = adapter.encode_prompts(["a dog"]).to(dtype=torch.bfloat16)
    x = torch.randn(1, *adapter.latent_shape, dtype=torch.bfloat16)
    v = adapter.velocity(net, x, torch.tensor([0.9], dtype=torch.bfloat16), cond)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()


def test_resolution_sets_the_latent_shape_and_the_time_ids(tmp_path, teacher_path):
    adapter, _ = load_teacher(sdxl_config(tmp_path, teacher_path, "teacher.resolution=32"))
    assert adapter.latent_shape == (4, 4, 4)
    assert adapter.encode_prompts(["a dog"]).tensors["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    with pytest.raises(ConfigError, match="teacher.resolution.*multiple of 16"):
        load_teacher(sdxl_config(tmp_path, teacher_path, "teacher.resolution=40"), text_encoders=False)


def test_errors_name_the_fix(tmp_path, teacher_path):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           UniPCMultistepScheduler)

    with pytest.raises(ConfigError, match="teacher.path.*StableDiffusionXLPipeline directory"):
        resolve(None, ["teacher.family=sdxl"])
    with pytest.raises(ConfigError, match="teacher.path.*neither an existing directory"):
        resolve(None, ["teacher.family=sdxl", f"teacher.path={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sdxl.load_teacher(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        sdxl.load_teacher(teacher_path / "unet")
    with pytest.raises(ConfigError, match="teacher.shift.*set teacher.shift=1.0"):
        load_teacher(sdxl_config(tmp_path, teacher_path, "teacher.shift=3.0"), text_encoders=False)
    sd3_dir = save_tiny_sd3(tmp_path / "sd3")
    with pytest.raises(ConfigError, match="StableDiffusion3Pipeline.*set teacher.family=sd3") as info:
        sdxl.load_teacher(sd3_dir)
    assert info.value.key == "teacher.family"  # the family names the key: no message is read for it
    other = tmp_path / "other"
    shutil.copytree(teacher_path, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*StableDiffusionXLPipeline \\(teacher.family=sdxl\\)"):
        sdxl.load_teacher(other)
    (other / "model_index.json").write_text(json.dumps(index))

    base = sdxl_scheduler().config
    stochastic = {"EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler.from_config(base).config,
                  "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler.from_config(
                      base, algorithm_type="sde-dpmsolver++").config,
                  "DPMSolverSDEScheduler": base}  # its class needs torchsde: the config will do
    for name, config in stochastic.items():
        (other / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": name}))
        with pytest.raises(ValueError, match="stochastically.*deterministic ODE"):
            sdxl.load_teacher(other, LoadOptions(text_encoders=False, vae=False))
    shutil.rmtree(other / "scheduler")
    UniPCMultistepScheduler.from_config(base).save_pretrained(other / "scheduler")
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.*EulerDiscreteScheduler"):
        sdxl.load_teacher(other, LoadOptions(text_encoders=False, vae=False))
    shutil.rmtree(other / "scheduler")
    sdxl_scheduler(prediction_type="v_prediction").save_pretrained(other / "scheduler")
    with pytest.raises(ConfigError, match="v_prediction.*epsilon") as info:
        sdxl.load_teacher(other, LoadOptions(text_encoders=False, vae=False))
    assert info.value.key == "teacher.path"
    # DDIM (eta = 0, the pipeline's default) takes the same steps: accepted, with the same schedule.
    shutil.rmtree(other / "scheduler")
    DDIMScheduler.from_config(base).save_pretrained(other / "scheduler")
    adapter, _ = sdxl.load_teacher(other, LoadOptions(text_encoders=False, vae=False))
    euler, _ = sdxl.load_teacher(teacher_path, LoadOptions(text_encoders=False, vae=False))
    torch.testing.assert_close(adapter.sampling_sigmas(30, 1.0), euler.sampling_sigmas(30, 1.0))


def test_training_prompts_must_be_given(teacher_path):
    from orchestrator.precompute import training_prompts

    config = resolve(None, ["teacher.family=sdxl", f"teacher.path={teacher_path}", "teacher.shift=1.0"])
    with pytest.raises(ValueError, match="trajectories.prompts"):
        training_prompts(config)


def test_precompute_distill_on_two_workers_export_and_sample_with_the_standard_pipeline(ray_cluster, tmp_path,
                                                                                        teacher_path):
    from diffusers import StableDiffusionXLPipeline

    from orchestrator.distill import run_distill
    from orchestrator.precompute import precompute
    from workers.evaluate import load_generator

    config = sdxl_config(tmp_path, teacher_path, "trajectories.seeds_per_prompt=4", "trajectories.rows_per_shard=8",
                         "trajectories.batch_size=8", "trajectories.cpus_per_actor=0.5",
                         "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
                         "distributed.batch_size_per_worker=2", "schedule.num_generator_updates=2",
                         "schedule.critic_updates_per_generator=2", "schedule.log_every=1",
                         "generator.optim.lr=1e-3", "critic.optim.lr=1e-3", "loss.diversity_weight=0.5")
    # the store first, in this process (the actor pool's precompute has tests of its own, test_ray.py); the run
    # finds it complete
    precompute(config, use_ray=False, progress=False)
    result = run_distill(config)
    assert result.metrics["generator_update"] == 2 and result.metrics["skipped_steps"] == 0
    assert result.metrics["loss_div"] > 0

    # The store holds the added conditioning and the x-prediction diversity target; no text encoder needed.
    store, summary = precompute(config, progress=False)
    assert summary.reused and store.columns["cond.prompt_embeds"].shape == (77, 64)
    assert store.columns["cond.time_ids"].shape == (6,) and store.columns["x0_anchor"].shape == (4, 8, 8)
    assert not store.negative().tensors["prompt_embeds"].any()  # force_zeros_for_empty_prompt

    export = result.generator_dir
    meta = json.loads((export / "dpdmd_generator.json").read_text())
    assert meta["family"] == "sdxl" and meta["timesteps"] == [999.0, 749.0, 499.0, 249.0]
    pipe = StableDiffusionXLPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    torch.testing.assert_close(pipe.scheduler.timesteps, torch.tensor(meta["timesteps"]))
    torch.testing.assert_close(sdxl.sigma_to_t(pipe.scheduler.sigmas), torch.tensor(meta["sigmas"]))
    teacher = sdxl.load_teacher(teacher_path, LoadOptions(text_encoders=False, vae=False))[1]
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), teacher.parameters()))

    seeds = [11, 12]
    latents = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, output_type="latent",
                   latents=seeded_noise(seeds, (4, 8, 8))).images
    images = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, output_type="np",
                  latents=seeded_noise(seeds, (4, 8, 8))).images
    assert images.shape == (2, 64, 64, 3) and (images >= 0).all() and (images <= 1).all()
    adapter, net, sampler = load_generator(export)  # the sample command's path: the same 4 steps, no CFG
    assert sampler.guidance_scale is None and sampler.role == "generator"
    torch.testing.assert_close(sample(adapter, net, PROMPTS[:2], seeds, sampler), latents, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, resolution", [("sdxl", 1024), ("sdxl-512", 512)])
def test_the_sdxl_recipes_hold_the_papers_settings(name, resolution):
    config = resolve(name)
    t, loss, dist = config.teacher, config.loss, config.distributed
    assert (t.family, t.path, t.resolution) == ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", resolution)
    assert (t.guidance_scale, t.num_steps, t.shift, t.dtype) == (8.0, 30, 1.0, "fp32")
    assert (loss.anchor_step, loss.diversity_weight, loss.first_step_detached) == (5, 0.05, True)
    assert not resolve(name, ["loss.diversity_weight=0"]).loss.first_step_detached  # its DMD baseline
    assert config.schedule.critic_updates_per_generator == 5 and config.schedule.num_generator_updates == 6000
    assert config.generator.optim.lr == config.critic.optim.lr == 1e-5 and config.generator.num_steps == 4
    assert (dist.num_workers, dist.batch_size_per_worker, dist.precision, dist.use_gpu) == (8, 4, "bf16", True)
    assert dist.zero_stage >= 2  # optimizer state and gradients sharded
    assert config.generator_shift == 1.0 and t.resolution % 32 == 0  # SDXL's UNet halves the latent twice


def test_the_train_function_loads_the_unet_alone(tmp_path, teacher_path, monkeypatch):
    from orchestrator.precompute import precompute
    from workers.context import LocalContext
    from workers.train import store_source, train

    config = sdxl_config(tmp_path, teacher_path, "trajectories.seeds_per_prompt=2", "schedule.num_generator_updates=1",
                         "schedule.critic_updates_per_generator=1", "distributed.batch_size_per_worker=2")
    store, _ = precompute(config, use_ray=False, progress=False)
    loaded: list[LoadOptions] = []
    real = sdxl.load_teacher
    monkeypatch.setattr(sdxl, "FAMILY", dataclasses.replace(
        sdxl.FAMILY, load_teacher=lambda path, options: loaded.append(options) or real(path, options)))
    progress = train(config, LocalContext(tmp_path / "run"), store_source(store), store.negative())
    assert progress.generator_updates == 1
    assert [(o.text_encoders, o.vae) for o in loaded] == [(False, False)]


def test_compile_is_regional_on_the_unet_its_attention_blocks_one_by_one():
    """distributed.compile=true on SDXL compiles the UNet's BasicTransformerBlocks (diffusers' _repeated_blocks)
    and not the whole network: the whole UNet compiled ran past the GPU check's time limit on an H200."""
    from diffusers.models.attention import BasicTransformerBlock

    from models.tiny_pipelines import tiny_sdxl_pipeline
    from workers.engines import compile_network

    unet = tiny_sdxl_pipeline().unet
    compile_network(unet)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 4  # the tiny UNet's down path 1, middle 1, up path 2
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert unet._compiled_call_impl is None
    assert not any(m._compiled_call_impl is not None for m in unet.modules() if not isinstance(m, BasicTransformerBlock))
