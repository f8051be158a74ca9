"""The paper's two earlier remedies as loss.method: dmd-regression (a perceptual regression onto the teacher's own
samples) and dmd-gan (a classifier head on the critic). Their losses by hand, what their gradients reach, the
teacher's samples in the store, and both trainers (one run, trials together) taking the same steps."""

import math

import pytest
import torch

from helpers import same_loss, train_each_alone
from models.families.shapes import domain
from models.families.shapes import teacher as shapes
from models.gan import CriticWithHead, feature_site
from models.losses import LossOutput, gan_critic_loss, gan_generator_loss, regression_loss, weighted_sum
from models.perceptual import RandomFeatureDistance
from models.sampling import Sampler, sample
from orchestrator.precompute import precompute
from orchestrator.recipe import resolve
from workers.config import ConfigError, reported_metrics
from workers.context import LocalContext
from workers.cycle import classifying
from workers.distill import Distiller, copy_for_training, critic_network
from workers.engines import build_engine, distributed
from workers.store import store_spec
from workers.teacher import load_teacher, teacher_dir
from workers.train import GENERATOR_DIR, store_source, train
from workers.trials import train_trials

TINY = ["distributed.batch_size_per_worker=2", "schedule.critic_updates_per_generator=2", "generator.num_steps=2",
        "schedule.checkpoint_every=1", "schedule.log_every=1", "trajectories.batch_size=8",
        "trajectories.rows_per_shard=8", "teacher.num_steps=6", "loss.anchor_step=2",
        "generator.optim.lr=1e-3", "critic.optim.lr=1e-3", "evaluation.seeds_per_prompt=2"]
UPDATES = 2
# (method, the weight key each trial sets, two trials' (seed, weight)); the second weight is large enough to count
METHODS = {"dmd-regression": ("loss.regression_weight", [(0, 0.0), (1, 0.5)]),
           "dmd-gan": ("loss.gan_generator_weight", [(0, 0.0), (1, 0.5)])}


# -- the losses by hand --------------------------------------------------------------------------------------------

def test_regression_loss_is_the_mean_distance_and_reaches_the_generator_sample_only():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    out = regression_loss(x, target, lambda a, b: (a - b).pow(2).sum(1))
    assert out.loss.item() == pytest.approx((5 + 2) / 2)
    out.loss.backward()
    assert torch.allclose(x.grad, torch.tensor([[1.0, 2.0], [-1.0, -1.0]]))  # d/dx of mean (x - y)^2 summed
    assert target.grad is None  # the teacher's sample is a constant
    assert set(out.watched) == {"reg.target", "reg.loss"} and out.metrics["loss_reg"] == out.loss


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0], requires_grad=True)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    critic = gan_critic_loss(real, fake)
    expected = (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(0.5) + softplus(3.0)) / 2
    assert critic.loss.item() == pytest.approx(expected)
    assert critic.metrics["gan_real_prob"].item() == pytest.approx((1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(1))) / 2)
    generator = gan_generator_loss(fake)
    assert generator.loss.item() == pytest.approx((softplus(-0.5) + softplus(-3.0)) / 2)
    generator.loss.backward()  # non-saturating: d/dl softplus(-l) = -sigmoid(-l), over the mean
    assert torch.allclose(fake.grad, -torch.sigmoid(-fake.detach()) / 2)


def test_a_term_of_weight_zero_is_left_out_even_where_it_is_not_finite():
    base = LossOutput(torch.tensor([1.0, 2.0]), {}, {"base.loss": torch.tensor([1.0, 2.0])})
    term = LossOutput(torch.tensor([float("nan"), 3.0]), {"loss_x": torch.tensor([0.0, 0.0])},
                      {"x.loss": torch.tensor([float("nan"), 3.0])})
    out = weighted_sum(base, {"x": (term, torch.tensor([0.0, 0.5]))}, "total")  # one weight per trial
    assert out.loss.tolist() == [1.0, 3.5] and bool(torch.isfinite(out.watched["x.loss"]).all())
    plain = weighted_sum(base, {"x": (term, 0.0)}, "total")  # one run, weight 0: not watched at all
    assert "x.loss" not in plain.watched and plain.metrics["loss_x"].tolist() == [0.0, 0.0]


def test_the_perceptual_distance_is_rebuilt_from_its_seed_and_sees_structure():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    a, b = RandomFeatureDistance(), RandomFeatureDistance()
    assert torch.equal(a(x, x.flip(0)), b(x, x.flip(0)))  # the same network wherever it is built
    assert a(x, x).abs().max() == 0 and bool((a(x, x.flip(0))[[0, 2]] > 0).all())
    assert not any(p.requires_grad for p in a.parameters())
    # a shift by one pixel changes few pixels' mean but the features: it counts more than the same pixel error
    # spread as noise would in pixels alone
    shifted = x.roll(1, dims=-1)
    assert a(x, shifted)[0] > (x - shifted).pow(2).mean()


def test_the_critic_head_reads_the_network_features_and_leaves_its_velocity_as_it_was():
    adapter, net = shapes.new_teacher(width=8, seed=0)
    assert feature_site(net) == ("mid_block", "map", 16)
    critic = CriticWithHead(copy_for_training(net))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.7])
    cond = adapter.encode_prompts(["a red circle", "a blue square"])
    plain = adapter.velocity(net, x, t, cond)
    assert torch.equal(adapter.velocity(critic, x, t, cond), plain)
    critic.classify = True
    assert torch.equal(adapter.velocity(critic, x, t, cond), plain)
    logits = critic.take_logits()
    assert logits.shape == (2,)
    with pytest.raises(RuntimeError, match="set classify"):
        critic.take_logits()
    from models.families.toy2d import Toy2DVelocityNet
    from models.gan import FeatureHead

    assert feature_site(Toy2DVelocityNet(hidden=32, depth=4)) == ("blocks.2", "vector", 32)
    assert FeatureHead("tokens", 16)(torch.randn(3, 7, 16)).shape == (3,)  # an SD3 block's image tokens


def test_the_head_reads_its_features_from_a_compiled_block_first_called_without_it():
    """distributed.compile compiles SD3's transformer blocks, the head's feature site among them. Whether Dynamo
    sees a hook added to a module after it compiled it depends on its hook guards (skip_nnmodule_hook_guards, on by
    default), so the head's hook is there from the start, idle until the critic classifies. The critic's first
    call is without the head (a DMD score), as in training."""
    import torch._dynamo
    from sd_models import tiny_sd3_inputs

    from models.tiny_pipelines import tiny_sd3_transformer

    eager, compiled = CriticWithHead(tiny_sd3_transformer()), CriticWithHead(tiny_sd3_transformer())
    assert eager.site == "transformer_blocks.1"
    torch._dynamo.reset()
    try:
        for block in compiled.net.transformer_blocks:
            block.compile(backend="eager")  # Dynamo's capture, which decides what runs; no code generation
        args = tiny_sd3_inputs()
        seen = {}
        for name, critic in (("eager", eager), ("compiled", compiled)):
            critic(**args)
            with classifying(critic):
                out = critic(**args).sample
                seen[name] = (out, critic.take_logits())
            critic(**args)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(seen["compiled"][0], seen["eager"][0], atol=1e-5)
    assert torch.allclose(seen["compiled"][1], seen["eager"][1], atol=1e-5)


# -- the store -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes-teacher")
    shapes.save_teacher(*shapes.new_teacher(width=8, seed=0), path)
    return path


def configs(tmp_path, teacher_path, method: str, *overrides: str):
    key, trials = METHODS[method]
    return [resolve("shapes", [f"teacher.path={teacher_path}", f"storage.output_dir={tmp_path}", *TINY,
                               f"schedule.num_generator_updates={UPDATES}", f"seed={seed}", f"loss.method={method}",
                               f"{key}={weight}", *overrides])
            for seed, weight in trials]


def test_the_baselines_store_holds_the_teachers_own_samples_under_a_key_of_its_own(tmp_path, teacher_path):
    config = configs(tmp_path, teacher_path, "dmd-gan")[0]
    plain = resolve("shapes", [f"teacher.path={teacher_path}", f"storage.output_dir={tmp_path}", *TINY])
    prompts = list(domain.prompts())
    assert store_spec(config, prompts, teacher_dir(config)).key != store_spec(plain, prompts, teacher_dir(plain)).key
    store, _ = precompute(config, use_ray=False, progress=False)
    batch = next(store.batches(8))
    adapter, net = load_teacher(config)
    t = config.teacher
    own = sample(adapter, net, [prompts[i] for i in batch.prompt_ids], batch.seeds.tolist(),
                 Sampler(adapter.sampling_sigmas(t.num_steps, t.shift), t.guidance_scale))
    assert torch.allclose(batch.x_teacher, own, atol=1e-5)  # the teacher's sampler, from the row's own noise
    critic_rows = next(store.prompt_batches(4, with_samples=True))
    assert critic_rows.x_teacher.shape == (4, 3, 32, 32)
    assert next(store.prompt_batches(4)).x_teacher is None  # DMD's and DP-DMD's critics read none


def test_unknown_methods_and_zero3_gan_runs_are_refused_naming_what_works():
    with pytest.raises(ConfigError, match="loss.method"):
        resolve("shapes", ["loss.method=gan"])
    # ZeRO-3 (DeepSpeed asserted mid-backward: "active_backward_submodules is empty") is refused before any work
    with pytest.raises(ConfigError, match="distributed.zero_stage.*dmd-gan.*zero_stage=2"):
        resolve("shapes", ["loss.method=dmd-gan", "distributed.zero_stage=3"])
    resolve("shapes", ["loss.method=dmd-regression", "distributed.zero_stage=3"])  # it never calls the critic


# -- what the gradients reach --------------------------------------------------------------------------------------

def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _distiller(config, store):
    """A single run's Distiller as train builds it (DeepSpeed engines on the CPU): (distiller, teacher, generator,
    critic). Call inside distributed(False)."""
    adapter, teacher = load_teacher(config)
    generator = build_engine(copy_for_training(teacher), config.generator.optim, config)
    critic = build_engine(critic_network(config, copy_for_training(teacher)), config.critic.optim, config)
    d = Distiller(config, adapter, teacher, generator, critic, torch.device("cpu"), torch.Generator().manual_seed(0),
                  store.negative())
    return d, teacher, generator, critic


def test_the_gan_head_trains_with_the_critic_and_the_generator_term_changes_neither(tmp_path, teacher_path):
    config = configs(tmp_path, teacher_path, "dmd-gan", "loss.gan_generator_weight=1.0", "loss.gan_critic_weight=1.0")[0]
    store, _ = precompute(config, use_ray=False, progress=False)
    with distributed(False):
        d, teacher, generator, critic = _distiller(config, store)
        head0, net0, t0 = _params(critic.module.head), _params(critic.module.net), _params(teacher)
        prompts = next(store.prompt_batches(2, with_samples=True))
        metrics = d.critic_step(prompts, d.generator_samples([prompts])[0], "critic")
        assert metrics["loss_gan_critic"] > 0 and "loss_critic_objective" in metrics
        head1, net1 = _params(critic.module.head), _params(critic.module.net)
        assert not _same(head0, head1) and not _same(net0, net1)  # the head trains with the critic
        g1 = _params(generator.module)
        metrics = d.generator_step(next(store.batches(2)), "generator")
        assert metrics["loss_gan"] > 0
        assert metrics["loss_generator"] == pytest.approx(metrics["loss_dmd"] + metrics["loss_gan"], rel=1e-5)
        assert not _same(g1, _params(generator.module))
        assert _same(head1, _params(critic.module.head)) and _same(net1, _params(critic.module.net))
        assert all(p.grad is None or not p.grad.any() for p in critic.module.parameters())
        assert all(p.requires_grad for p in critic.module.parameters())  # frozen only for the generator update
        assert _same(t0, _params(teacher))


def test_the_regression_term_moves_the_generator_toward_the_teachers_sample_only(tmp_path, teacher_path):
    config = configs(tmp_path, teacher_path, "dmd-regression", "loss.regression_weight=1.0")[0]
    store, _ = precompute(config, use_ray=False, progress=False)
    with distributed(False):
        d, teacher, generator, critic = _distiller(config, store)
        c0, t0 = _params(critic.module), _params(teacher)
        metrics = d.generator_step(next(store.batches(2)), "generator")
        assert metrics["loss_reg"] > 0
        assert metrics["loss_generator"] == pytest.approx(metrics["loss_dmd"] + metrics["loss_reg"], rel=1e-5)
        assert _same(c0, _params(critic.module)) and _same(t0, _params(teacher))


# -- both trainers, and resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_trials_together_train_each_baseline_as_train_trains_each_trial_alone(tmp_path, teacher_path, method):
    torch.set_num_threads(1)
    cs = configs(tmp_path, teacher_path, method)
    store, _ = precompute(cs[0], use_ray=False, progress=False)
    alone = train_each_alone(cs, tmp_path, store)
    assert all(set(cycle) == set(reported_metrics(method)) for run in alone for cycle in run)  # what sweep.metric takes
    together: list[dict] = []
    train_trials(cs, [tmp_path / "t0", tmp_path / "t1"], store, save=False,
                 on_cycle=lambda step, metrics: together.append({k: [float(x) for x in v] for k, v in metrics.items()}))
    term = {"dmd-regression": "loss_reg", "dmd-gan": "loss_gan"}[method]
    extra = ("loss_gan_critic", "gan_real_prob", "gan_fake_prob") if method == "dmd-gan" else ()
    for i in range(2):
        for cycle in range(UPDATES):
            for key in ("loss_critic", "loss_dmd", term, "loss_generator", *extra):
                assert same_loss(together[cycle][key][i], alone[i][cycle][key], cycle, cs[i]), (i, cycle, key)
    assert together[0]["loss_generator"][0] == pytest.approx(together[0]["loss_dmd"][0])  # weight 0: DMD alone
    assert together[0]["loss_generator"][1] > together[0]["loss_dmd"][1]  # weight 0.5: the term counts


def test_a_gan_run_trains_with_a_checkpointed_critic_and_refuses_anchors_computed_inline(tmp_path, teacher_path):
    """The SD recipes checkpoint the critic's activations, so its call for the generator's GAN term is recomputed in
    the generator's backward: with the critic unfrozen again before that backward it raised torch.utils.checkpoint's
    CheckpointError ("Recomputed values ... have different metadata"). The critic now stays frozen for the whole
    generator update."""
    config = configs(tmp_path, teacher_path, "dmd-gan", "critic.gradient_checkpointing=true",
                     "loss.gan_generator_weight=0.5")[1]
    store, _ = precompute(config, use_ray=False, progress=False)
    seen: list[dict] = []
    train(config, LocalContext(tmp_path / "run"), store_source(store), store.negative(), save=False,
          on_cycle=lambda progress, metrics: seen.append(dict(metrics)))
    assert len(seen) == UPDATES and all(math.isfinite(m["loss_gan"]) and m["loss_gan"] > 0 for m in seen)
    with pytest.raises(ConfigError, match="loss.method.*trajectory store"):  # the reference script's structure
        train(config, LocalContext(tmp_path / "inline"), save=False)


def test_a_gan_run_resumes_to_the_same_generator_bit_for_bit(tmp_path, teacher_path):
    from safetensors.torch import load_file

    config = configs(tmp_path, teacher_path, "dmd-gan", "loss.gan_generator_weight=0.5")[1]
    store, _ = precompute(config, use_ray=False, progress=False)
    train(config, LocalContext(tmp_path / "straight", resume=False), store_source(store), store.negative())
    half = configs(tmp_path, teacher_path, "dmd-gan", "loss.gan_generator_weight=0.5",
                   "schedule.num_generator_updates=1")[1]
    train(half, LocalContext(tmp_path / "resumed", resume=False), store_source(store), store.negative())
    train(config, LocalContext(tmp_path / "resumed", resume=True), store_source(store), store.negative())

    def exported(run):
        return load_file(next((tmp_path / run).glob(f"checkpoints/*{UPDATES}/{GENERATOR_DIR}/unet/*.safetensors")))
    straight, resumed = exported("straight"), exported("resumed")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


# -- the comparison ------------------------------------------------------------------------------------------------

def test_the_methods_space_groups_by_method_and_its_table_names_and_measures_from_dmd(tmp_path):
    from orchestrator.fidelity import check_space
    from orchestrator.results import aggregate, is_ours, setting_name
    from orchestrator.spaces import grid_points, load_space, trial_name
    from orchestrator.trial_runs import trial_groups

    space = load_space("methods")
    check_space(space)  # DMD is in it through loss.method, not lambda = 0
    points = grid_points(space)
    groups = trial_groups([(p, tmp_path / trial_name(p)) for p in points], together=3)
    assert [len(g) for g in groups] == [3, 2] * 4  # five seeds per method, never two methods in one process
    assert all(len({p["loss.method"] for p, _ in g}) == 1 for g in groups)
    assert setting_name({"loss.method": "dmd-gan"}, 0.05) == "DMD + GAN"
    assert setting_name({"loss.method": "dp-dmd", "loss.diversity_weight": 0.0}, 0.05) == "DMD"
    assert setting_name({"loss.method": "dmd-regression", "loss.regression_weight": 0.5}, 0.05) == \
        "DMD + regression (regression_weight=0.5)"
    assert is_ours({"loss.method": "dp-dmd"}, 0.05) and not is_ours({"loss.method": "dmd"}, 0.05)
    # a run whose recipe sets the method: a lambda grid there is no DMD, and no setting is named by lambda
    assert setting_name({"loss.diversity_weight": 0.0}, 0.05, "dmd-gan") == "DMD + GAN"
    for lambdas, method in (({"loss.method": {"grid": ["dmd-gan"]}}, "dp-dmd"), ({}, "dmd-gan")):
        with pytest.raises(ConfigError, match="needs DMD"):
            check_space({**lambdas, "loss.diversity_weight": {"grid": [0.0, 0.05]}, "seed": {"grid": [0, 1]}}, 0.05,
                        method)
    teacher = {"attribute_spread": 0.25, "feature_diversity": 0.14, "adherence": 1.0, "frechet_distance": 1.0}
    spread = {"dmd": 0.20, "dp-dmd": 0.23, "dmd-regression": 0.22, "dmd-gan": 0.21}
    rows = [{"params": p, **{f"eval_{k}": v for k, v in teacher.items()},
             "eval_attribute_spread": spread[p["loss.method"]] + 0.001 * (p["seed"] - 12)} for p in points]
    result = aggregate(rows, teacher, "shapes", 0.05, 0.02)
    names = [s["name"] for s in result["settings"]]
    assert names == ["DMD", "DP-DMD", "DMD + regression", "DMD + GAN"] and result["dmd"] == 0
    assert [round(s["gap_recovered"][0], 3) for s in result["settings"]] == [0.0, 0.6, 0.4, 0.2]
