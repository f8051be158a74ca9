"""The sd3 family on tiny random StableDiffusion3Pipelines built in code: the adapter against the pipeline
itself, what each role loads, clear errors, and precompute -> distill on 2 Ray workers -> export ->
StableDiffusion3Pipeline.from_pretrained -> a 4-step sample."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from models.families import sd3
from models.adapter import LoadOptions
from models.flow import sampling_sigmas
from models.sampling import Sampler, sample, seeded_noise
from orchestrator.recipe import resolve
from models.tiny_pipelines import tiny_sd3_transformer
from sd_models import prompt_file, save_tiny_sd3, tiny_sd3_inputs
from workers.config import ConfigError
from workers.teacher import load_teacher

PROMPTS = ["a photo of a red cat", "a painting of a blue house", "a green tree in the snow", "a dog"]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipeline")


def sd3_config(tmp_path, teacher_path, *overrides):
    prompts = prompt_file(tmp_path / "prompts.txt", PROMPTS)
    return resolve(None, ["teacher.family=sd3", f"teacher.path={teacher_path}", "teacher.num_steps=6",
                          "loss.anchor_step=2", f"trajectories.prompts={prompts}", f"evaluation.prompts={prompts}",
                          f"storage.output_dir={tmp_path / 'out'}", *overrides])


def test_sd35_medium_config_builds_the_released_network():
    adapter, net = sd3.random_teacher(device="meta")
    assert adapter.latent_shape == (16, 128, 128)
    # 2.24B parameters plus the 384 x 384 x 1536 positional table (a buffer): the released model's "2.5B".
    assert sum(p.numel() for p in net.parameters()) == 2_243_171_520
    assert sum(b.numel() for b in net.buffers()) == 384 * 384 * 1536
    with_dual = [i for i, block in enumerate(net.transformer_blocks) if block.attn2 is not None]
    assert with_dual == list(range(13)) and len(net.transformer_blocks) == 24
    assert sd3.conditioning_shapes() == {"prompt_embeds": (333, 4096), "pooled_projections": (2048,)}


def test_adapter_reproduces_the_pipeline(teacher_path):
    from diffusers import StableDiffusion3Pipeline

    adapter, net = sd3.load_teacher(teacher_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher_path)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = PROMPTS[:2], [5, 6]
    cond = adapter.encode_prompts(prompts)
    embeds, negative, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"))
    torch.testing.assert_close(cond.tensors["prompt_embeds"], embeds)
    torch.testing.assert_close(cond.tensors["pooled_projections"], pooled)
    assert cond.tensors["prompt_embeds"].shape == (2, 77 + sd3.MAX_SEQUENCE_LENGTH, 32)
    torch.testing.assert_close(adapter.negative_conditioning(2).tensors["prompt_embeds"], negative)

    # Our guided Euler sampler on our sigmas is the pipeline's own sampling loop, CFG against "" included.
    eps = seeded_noise(seeds, adapter.latent_shape)
    ours = sample(adapter, net, prompts, seeds, Sampler(sampling_sigmas(4, 3.0), 3.5))
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.5, latents=eps.clone(), height=64, width=64,
                  output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    images = adapter.decode(ours)
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1


def test_each_role_loads_only_what_it_needs(tmp_path, teacher_path):
    config = sd3_config(tmp_path, teacher_path)
    adapter, _ = load_teacher(config, text_encoders=False)
    assert adapter.text_pipeline is None and adapter.vae is None
    with pytest.raises(RuntimeError, match="trajectory store"):
        adapter.encode_prompts(["a dog"])
    with pytest.raises(RuntimeError, match="vae=True"):
        adapter.decode(torch.zeros(1, *adapter.latent_shape))
    adapter, net = load_teacher(config, vae=True, dtype=torch.bfloat16)
    assert net.dtype == torch.bfloat16 and adapter.text_pipeline.text_encoder_3.dtype == torch.bfloat16
    assert adapter.vae is not None


def test_loading_a_pipeline_keeps_the_libraries_console_output_to_errors(tmp_path, teacher_path, capfd):
    """A bar per pipeline component and per weight file and advice to install accelerate filled a newcomer's
    console before the command's own plan (sd3 and sdxl load through the same function)."""
    capfd.readouterr()
    load_teacher(sd3_config(tmp_path, teacher_path), vae=True)
    out = capfd.readouterr()
    console = out.out + out.err
    assert "Loading" not in console and "accelerate" not in console and "torch_dtype" not in console, console


def test_the_sd3_tiny_recipe_builds_its_teacher_in_code_once(tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    from models import tiny_pipelines
    from workers.evaluate import eval_prompts, training_prompts
    from workers.teacher import teacher_dir

    config = resolve("sd3-tiny", [f"storage.output_dir={tmp_path}"])
    assert config.teacher.path == "builtin:sd3-tiny"  # kept as given, not made a local path
    path = teacher_dir(config)
    assert path == tmp_path / "teacher_cache" / "builtin-sd3-tiny"
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    assert sum(p.numel() for p in pipe.transformer.parameters()) > 0
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no half-built copy left

    built = []
    monkeypatch.setattr(tiny_pipelines, "pipeline", lambda *a: built.append(a))
    assert teacher_dir(config) == path and not built  # the next command reuses it
    assert len(training_prompts(config)) == 48 and len(eval_prompts(config)) == 4
    assert set(" ".join(training_prompts(config)).split()) <= set(tiny_pipelines.WORDS)

    with pytest.raises(ConfigError, match="teacher.family=sd3"):
        resolve("sd3-tiny", [f"storage.output_dir={tmp_path}", "teacher.family=sdxl"])
    with pytest.raises(ConfigError, match="builtin:sd3-tiny, builtin:sdxl-tiny"):
        resolve("sd3-tiny", [f"storage.output_dir={tmp_path}", "teacher.path=builtin:sd9"])


@pytest.mark.slow
def test_the_sd3_tiny_recipe_runs_as_the_readme_says(tmp_path, capfd):
    """The README's first real-teacher run, on the 2-core machine: distil, sample, evaluate, and the export
    loaded by the diffusers pipeline class; a console without the libraries' loading chatter."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from orchestrator.cli import main

    out = [f"storage.output_dir={tmp_path}"]
    assert main(["distill", "--no-ray", "--recipe", "sd3-tiny", *out]) == 0
    console = "".join(capfd.readouterr())
    assert "[precompute] plan:" in console and "[distill] generator update 40/40" in console
    assert "Loading" not in console and "accelerate" not in console, console
    (generator,) = (tmp_path / "runs").glob("*-distill-sd3-tiny/generator")
    assert main(["sample", "--recipe", "sd3-tiny", "--generator", str(generator), "--prompt", "a red cat",
                 "--seeds", "0-3", "--out", str(tmp_path / "samples"), *out]) == 0
    assert np.load(tmp_path / "samples" / "samples.npz")["sample"].shape == (4, 3, 64, 64)
    assert main(["evaluate", "--recipe", "sd3-tiny", "--generator", str(generator), *out]) == 0
    assert "pixel_diversity" in capfd.readouterr().out
    pipe = StableDiffusion3Pipeline.from_pretrained(generator)
    image = pipe("a red cat", num_inference_steps=4, guidance_scale=1.0, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_resolution_sets_the_latent_shape_and_is_checked(tmp_path, teacher_path):
    adapter, _ = load_teacher(sd3_config(tmp_path, teacher_path, "teacher.resolution=32"), text_encoders=False)
    assert adapter.latent_shape == (16, 4, 4)
    with pytest.raises(ConfigError, match="teacher.resolution.*multiple of 16"):
        load_teacher(sd3_config(tmp_path, teacher_path, "teacher.resolution=40"), text_encoders=False)


def test_config_errors_name_the_fix(tmp_path, teacher_path, monkeypatch):
    with pytest.raises(ConfigError, match="teacher.path.*no embedded teacher"):
        resolve(None, ["teacher.family=sd3"])
    with pytest.raises(ConfigError, match="teacher.path.*neither an existing directory"):
        resolve(None, ["teacher.family=sd3", f"teacher.path={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="teacher.path"):
        resolve(None, ["teacher.family=sd3", "teacher.path=gs://bucket/model"])
    monkeypatch.chdir(tmp_path)
    hub = resolve(None, ["teacher.family=sd3", "teacher.path=stabilityai/stable-diffusion-3.5-medium"])
    assert hub.teacher.path == "stabilityai/stable-diffusion-3.5-medium"  # not made into a local path
    s3 = resolve(None, ["teacher.family=sd3", "teacher.path=s3://models/sd35m"])
    assert s3.teacher.path == "s3://models/sd35m"
    with pytest.raises(FileNotFoundError, match="hub id.*could not be fetched"):  # HF_HUB_OFFLINE=1 in conftest
        load_teacher(resolve(None, ["teacher.family=sd3", "teacher.path=nobody-here/no-such-model"]))
    with pytest.raises(ConfigError, match="teacher.shift.*set teacher.shift=3.0"):
        load_teacher(sd3_config(tmp_path, teacher_path, "teacher.shift=1.0"), text_encoders=False)


def test_unsupported_pipelines_and_stochastic_schedulers_are_refused(tmp_path, teacher_path):
    import shutil

    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        sd3.load_teacher(teacher_path / "transformer")
    other = tmp_path / "other"
    shutil.copytree(teacher_path, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*supported pipelines: StableDiffusion3Pipeline"):
        sd3.load_teacher(other)
    (other / "model_index.json").write_text(json.dumps(index))
    FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True).save_pretrained(other / "scheduler")
    with pytest.raises(ValueError, match="stochastic.*deterministic ODE"):
        sd3.load_teacher(other)
    shutil.rmtree(other / "scheduler")
    EulerDiscreteScheduler().save_pretrained(other / "scheduler")
    with pytest.raises(ValueError, match="EulerDiscreteScheduler.*FlowMatchEulerDiscreteScheduler"):
        sd3.load_teacher(other)


def test_training_prompts_must_be_given(tmp_path, teacher_path):
    from orchestrator.precompute import training_prompts

    config = resolve(None, ["teacher.family=sd3", f"teacher.path={teacher_path}"])
    with pytest.raises(ValueError, match="trajectories.prompts"):
        training_prompts(config)


def test_precompute_distill_on_two_workers_export_and_sample_with_the_standard_pipeline(ray_cluster, tmp_path,
                                                                                        teacher_path):
    from diffusers import StableDiffusion3Pipeline

    from orchestrator.distill import run_distill
    from orchestrator.precompute import precompute
    from workers.evaluate import load_generator

    config = sd3_config(tmp_path, teacher_path, "trajectories.seeds_per_prompt=4", "trajectories.rows_per_shard=8",
                        "trajectories.batch_size=8", "trajectories.cpus_per_actor=0.5",
                        "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
                        "distributed.batch_size_per_worker=2", "schedule.num_generator_updates=2",
                        "schedule.critic_updates_per_generator=2", "schedule.log_every=1",
                        "generator.optim.lr=1e-3", "critic.optim.lr=1e-3")
    # the store first, in this process (the actor pool's precompute has tests of its own, test_ray.py); the run
    # finds it complete
    precompute(config, use_ray=False, progress=False)
    result = run_distill(config)
    assert result.metrics["generator_update"] == 2 and result.metrics["skipped_steps"] == 0

    store, summary = precompute(config, progress=False)
    assert summary.reused and store.columns["cond.prompt_embeds"].shape == (333, 32)
    assert store.negative().tensors["pooled_projections"].shape == (1, 64)

    export = result.generator_dir
    meta = json.loads((export / "dpdmd_generator.json").read_text())
    assert meta["family"] == "sd3" and len(meta["timesteps"]) == 4
    pipe = StableDiffusion3Pipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    torch.testing.assert_close(pipe.scheduler.timesteps, torch.tensor(meta["timesteps"]))
    teacher = sd3.load_teacher(teacher_path, LoadOptions(text_encoders=False, vae=False))[1]
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), teacher.parameters()))

    seeds = [11, 12]
    latents = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, output_type="latent",
                   latents=seeded_noise(seeds, (16, 8, 8))).images
    images = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, output_type="np",
                  latents=seeded_noise(seeds, (16, 8, 8))).images
    assert images.shape == (2, 64, 64, 3) and (images >= 0).all() and (images <= 1).all()
    adapter, net, sampler = load_generator(export)  # the sample command's path: the same 4 steps, no CFG
    assert sampler.guidance_scale is None
    torch.testing.assert_close(sample(adapter, net, PROMPTS[:2], seeds, sampler), latents, atol=1e-4, rtol=1e-4)


def test_the_train_function_loads_the_transformer_alone(tmp_path, teacher_path, monkeypatch):
    from orchestrator.precompute import precompute
    from workers.context import LocalContext
    from workers.train import store_source, train

    config = sd3_config(tmp_path, teacher_path, "trajectories.seeds_per_prompt=2", "schedule.num_generator_updates=1",
                        "schedule.critic_updates_per_generator=1", "distributed.batch_size_per_worker=2")
    store, _ = precompute(config, use_ray=False, progress=False)
    loaded: list[LoadOptions] = []
    real = sd3.load_teacher
    monkeypatch.setattr(sd3, "FAMILY", dataclasses.replace(
        sd3.FAMILY, load_teacher=lambda path, options: loaded.append(options) or real(path, options)))
    progress = train(config, LocalContext(tmp_path / "run"), store_source(store), store.negative())
    assert progress.generator_updates == 1
    assert [(o.text_encoders, o.vae) for o in loaded] == [(False, False)]

    import numpy as np

    from orchestrator import cli
    from orchestrator.recipe import save

    generator = tmp_path / "run" / "checkpoints" / "step-0000001" / "generator"
    pickles = [p.name for p in generator.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")]
    assert not pickles and list(generator.rglob("*.safetensors"))  # the export: what the pipeline class loads
    out = tmp_path / "samples"
    assert cli.main(["sample", "--recipe", str(save(config, tmp_path / "recipe")), "--generator", str(generator),
                     "--prompt", "a red cat", "--seeds", "0-1", "--out", str(out)]) == 0
    assert np.load(out / "samples.npz")["sample"].shape == (2, 3, 64, 64)  # decoded images
    assert (out / "samples.png").stat().st_size > 1000


def test_a_teacher_on_s3_is_fetched_once_into_the_cache(tmp_path, teacher_path, s3_server):
    import boto3

    from workers.teacher import FETCHED, teacher_dir

    endpoint = s3_server.endpoint
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="models")
    files = sorted(p for p in teacher_path.rglob("*") if p.is_file())
    for path in files:
        s3.upload_file(str(path), "models", f"sd3/tiny/{path.relative_to(teacher_path)}")
    config = sd3_config(tmp_path, "s3://models/sd3/tiny", f"storage.s3_endpoint_url={endpoint}",
                        f"storage.teacher_cache={tmp_path / 'cache'}")
    adapter, net = load_teacher(config, text_encoders=False)
    local = teacher_dir(config)
    assert local.parent == tmp_path / "cache" and (local / FETCHED).is_file()
    assert sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file() and p.name != FETCHED) == \
        sorted(p.relative_to(teacher_path) for p in files)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [local.name]  # no temp folders left
    reference = sd3.load_teacher(teacher_path, LoadOptions(text_encoders=False, vae=False))[1]
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), reference.parameters()))
    missing = sd3_config(tmp_path, "s3://models/nothing-here", f"storage.s3_endpoint_url={endpoint}",
                         f"storage.teacher_cache={tmp_path / 'cache'}")
    with pytest.raises(FileNotFoundError, match="holds no files"):
        load_teacher(missing)
    s3_server.stop()
    assert teacher_dir(config) == local  # fetched once: later calls never touch S3 again


@pytest.mark.parametrize("name, resolution", [("sd35m", 1024), ("sd35m-512", 512)])
def test_the_sd35m_recipes_hold_the_papers_settings(name, resolution):
    config = resolve(name)
    t, loss, dist = config.teacher, config.loss, config.distributed
    assert (t.family, t.path, t.resolution) == ("sd3", "stabilityai/stable-diffusion-3.5-medium", resolution)
    assert (t.guidance_scale, t.num_steps, t.shift, t.dtype) == (3.5, 30, 3.0, "fp32")
    assert (loss.anchor_step, loss.diversity_weight, loss.first_step_detached) == (5, 0.05, True)
    assert not resolve(name, ["loss.diversity_weight=0"]).loss.first_step_detached  # its DMD baseline
    assert config.schedule.critic_updates_per_generator == 5 and config.schedule.num_generator_updates == 6000
    assert config.generator.optim.lr == config.critic.optim.lr == 1e-5 and config.generator.num_steps == 4
    assert (dist.num_workers, dist.batch_size_per_worker, dist.precision, dist.use_gpu) == (8, 4, "bf16", True)
    assert dist.zero_stage >= 2  # optimizer state and gradients sharded
    assert t.resolution // sd3.SD3_VAE_SCALE_FACTOR % sd3.SD35_MEDIUM_TRANSFORMER["patch_size"] == 0


def test_checkpointing_that_keeps_attention_runs_attention_once_for_the_same_gradients():
    """critic/generator.gradient_checkpointing=attention: backward recomputes each block but not its attention
    (diffusers' checkpointing runs every attention twice), the gradients are the uncheckpointed ones, and the
    network's weights, state dict and deep copies are as without it."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from workers.train import _trainable

    class AttentionCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            self.calls += "scaled_dot_product" in name and "backward" not in name
            return func(*args, **(kwargs or {}))

    teacher, args = tiny_sd3_transformer(), tiny_sd3_inputs()

    def run(net):
        with AttentionCalls() as calls:
            out = net(**args).sample
            out.pow(2).mean().backward()
        return calls.calls, [p.grad for p in net.parameters()]

    (plain, g_plain), (whole, g_whole), (kept, g_kept) = (
        run(_trainable(teacher, mode, "critic")) for mode in (False, True, "attention"))
    assert plain == 3 and whole == 6 and kept == 3  # two joint attentions and the first block's second one
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_kept))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_whole, g_kept))

    net = _trainable(teacher, "attention", "critic")
    assert list(net.state_dict()) == list(teacher.state_dict())
    twin = copy.deepcopy(net)
    with torch.no_grad():
        next(twin.transformer_blocks[0].parameters()).add_(1.0)
        assert not torch.allclose(net(**args).sample, twin(**args).sample)  # the copy runs its own weights
    with pytest.raises(ConfigError, match="generator.gradient_checkpointing"):
        _trainable(torch.nn.Linear(2, 2), "attention", "generator")


def test_checkpointing_that_keeps_attention_compiles_each_block_as_one_graph():
    """Its point is inside compiled blocks (distributed.compile=true): a graph break there runs the block eagerly
    under the selective policy's dispatch mode, slower than whole-block checkpointing. diffusers marks its block
    classes allow_in_graph, through which Dynamo cannot call the class's forward."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from workers.train import _trainable

    teacher, args = tiny_sd3_transformer(), tiny_sd3_inputs()
    eager = _trainable(teacher, "attention", "critic")
    net = _trainable(teacher, "attention", "critic")
    backward_graphs = []

    def keep_backward(graph, inputs):
        backward_graphs.append(graph)
        return graph

    # Inductor's partitioner, which decides from the policy what backward recomputes
    backend = aot_autograd(fw_compiler=lambda graph, inputs: graph, bw_compiler=keep_backward,
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    for block in net.transformer_blocks:
        block.compile(backend=backend, fullgraph=True)  # a graph break raises
    net(**args).sample.pow(2).mean().backward()
    eager(**args).sample.pow(2).mean().backward()
    with torch.no_grad():
        assert torch.allclose(net(**args).sample, eager(**args).sample, atol=1e-6)
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(net.parameters(), eager.parameters()))
    torch._dynamo.reset()
    ops = [str(node.target) for graph in backward_graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert backward_graphs and any("scaled_dot_product" in op and "backward" in op for op in ops)
    assert not [op for op in ops if "scaled_dot_product" in op and "backward" not in op]  # attention not rerun
    assert any(op.startswith("aten.mm") or op.startswith("aten.addmm") for op in ops)  # the rest of the block is
