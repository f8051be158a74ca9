"""Config precedence (defaults <- recipe <- overrides), every validation error path, and saving."""

import re
import subprocess
import sys

import pytest
import yaml

from orchestrator import cli
from orchestrator.recipe import builtin_recipes, dump, resolve, save
from workers.config import ConfigError, RunConfig
from workers.configure import build, config_keys, to_dict


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"loss": {"diversity_weight": 0.2, "anchor_step": 10},
                                    "teacher": {"guidance_scale": 5.0}}))
    return path


def test_precedence_defaults_recipe_overrides(recipe_file):
    config = resolve(recipe_file, ["loss.diversity_weight=0.3"])
    assert config.loss.diversity_weight == 0.3  # override beats recipe
    assert config.loss.anchor_step == 10  # recipe beats default
    assert config.teacher.guidance_scale == 5.0
    assert config.loss.normaliser == RunConfig().loss.normaliser  # default where neither speaks
    assert config.schedule.critic_updates_per_generator == 5


def test_override_creates_missing_sections_and_parses_yaml_values():
    config = resolve(None, ["generator.optim.betas=[0.0, 0.99]", "loss.detach_first_step=false",
                            "generator.shift=null", "tracking.run_name=my run"])
    assert config.generator.optim.betas == [0.0, 0.99]
    assert config.loss.detach_first_step is False
    assert config.generator.shift is None
    assert config.tracking.run_name == "my run"


def test_ints_and_dotless_exponents_are_accepted_for_floats(tmp_path):
    assert resolve(None, ["teacher.guidance_scale=4"]).teacher.guidance_scale == 4.0
    assert resolve(None, ["generator.optim.lr=3e-4"]).generator.optim.lr == 3e-4
    path = tmp_path / "r.yaml"
    path.write_text("critic:\n  optim:\n    lr: 1e-5\n")  # YAML 1.1 reads this as a string
    assert resolve(path).critic.optim.lr == 1e-5
    with pytest.raises(ConfigError, match="expected float"):
        resolve(None, ["generator.optim.lr=fast"])


def test_unknown_key_is_named_with_a_suggestion(recipe_file):
    with pytest.raises(ConfigError) as info:
        resolve(recipe_file, ["loss.anchor_stp=3"])
    assert info.value.key == "loss.anchor_stp"
    assert "did you mean 'loss.anchor_step'" in str(info.value)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError) as info:
        resolve(None, ["optimiser.lr=1"])
    assert info.value.key == "optimiser.lr" or info.value.key == "optimiser"
    assert "valid keys here" in str(info.value)


def test_unknown_key_in_a_recipe_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher:\n  familly: toy2d\n")
    with pytest.raises(ConfigError, match="teacher.familly.*did you mean 'teacher.family'"):
        resolve(path)


INVALID = [
    ("teacher.family=nope", "teacher.family"),
    ("teacher.guidance_scale=-1", "teacher.guidance_scale"),
    ("teacher.num_steps=0", "teacher.num_steps"),
    ("teacher.shift=0", "teacher.shift"),
    ("teacher.dtype=fp16", "teacher.dtype"),
    ("teacher.resolution=-1", "teacher.resolution"),
    ("teacher.path=/no/such/teacher/dir", "teacher.path"),
    ("teacher.train.steps=0", "teacher.train.steps"),
    ("teacher.train.batch_size=0", "teacher.train.batch_size"),
    ("teacher.train.width=0", "teacher.train.width"),
    ("teacher.train.lr=0", "teacher.train.lr"),
    ("teacher.train.cfg_dropout=0", "teacher.train.cfg_dropout"),
    ("generator.num_steps=0", "generator.num_steps"),
    ("generator.shift=-1", "generator.shift"),
    ("generator.optim.lr=0", "generator.optim.lr"),
    ("generator.optim.weight_decay=-1", "generator.optim.weight_decay"),
    ("generator.optim.betas=[0.9]", "generator.optim.betas"),
    ("generator.optim.betas=[0.9, 1.0]", "generator.optim.betas"),
    ("generator.optim.betas=[0.9, x]", "generator.optim.betas[1]"),
    ("generator.optim.grad_clip=-1", "generator.optim.grad_clip"),
    ("critic.optim.lr=-1e-5", "critic.optim.lr"),
    ("loss.diversity_weight=-0.1", "loss.diversity_weight"),
    ("loss.anchor_step=0", "loss.anchor_step"),
    ("loss.anchor_step=31", "loss.anchor_step"),
    ("loss.normaliser=l2", "loss.normaliser"),
    ("loss.detach_first_step=maybe", "loss.detach_first_step"),
    ("schedule.critic_updates_per_generator=0", "schedule.critic_updates_per_generator"),
    ("schedule.num_generator_updates=0", "schedule.num_generator_updates"),
    ("schedule.checkpoint_every=-1", "schedule.checkpoint_every"),
    ("schedule.log_every=0", "schedule.log_every"),
    ("schedule.on_nonfinite=ignore", "schedule.on_nonfinite"),
    ("trajectories.seeds_per_prompt=-1", "trajectories.seeds_per_prompt"),
    ("trajectories.max_reuse=0", "trajectories.max_reuse"),
    ("trajectories.rows_per_shard=0", "trajectories.rows_per_shard"),
    ("trajectories.batch_size=0", "trajectories.batch_size"),
    ("trajectories.num_actors=0", "trajectories.num_actors"),
    ("trajectories.seed_offset=-1", "trajectories.seed_offset"),
    ("trajectories.cpus_per_actor=0", "trajectories.cpus_per_actor"),
    ("trajectories.gpus_per_actor=-1", "trajectories.gpus_per_actor"),
    ("evaluation.seeds_per_prompt=1", "evaluation.seeds_per_prompt"),
    ("evaluation.seed_offset=-1", "evaluation.seed_offset"),
    ("evaluation.batch_size=0", "evaluation.batch_size"),
    ("distributed.num_workers=0", "distributed.num_workers"),
    ("distributed.cpus_per_worker=0", "distributed.cpus_per_worker"),
    ("distributed.zero_stage=4", "distributed.zero_stage"),
    ("distributed.precision=fp16", "distributed.precision"),
    ("distributed.batch_size_per_worker=0", "distributed.batch_size_per_worker"),
    ("distributed.use_gpu=1", "distributed.use_gpu"),
    ("distributed.compile_mode=fast", "distributed.compile_mode"),
    ("distributed.compile_mode=reduce-overhead", "distributed.compile_mode"),  # without compile=true
    ("tracking.experiment=' '", "tracking.experiment"),
    ("storage.output_dir=''", "storage.output_dir"),
    ("tracking.tracking_uri=https://me:secret@mlflow.example.com", "tracking.tracking_uri"),
    ("storage.trajectory_root=s3://key:secret@bucket/prefix", "storage.trajectory_root"),
    ("storage.s3_endpoint_url=http://user:pw@localhost:9000", "storage.s3_endpoint_url"),
    ("storage.s3_endpoint_url=http://localhost:9000/?X-Amz-Signature=planted", "storage.s3_endpoint_url"),
    ("storage.trajectory_root=s3://bucket/prefix?token=planted", "storage.trajectory_root"),
    ("sweep.num_samples=0", "sweep.num_samples"),
    ("sweep.max_concurrent_trials=-1", "sweep.max_concurrent_trials"),
    ("sweep.trial_cpus=0", "sweep.trial_cpus"),
    ("sweep.scheduler=hyperband", "sweep.scheduler"),
    ("sweep.quality_drop_from_best=-1", "sweep.quality_drop_from_best"),
    ("sweep.quality_drop_from_dmd=-1", "sweep.quality_drop_from_dmd"),
    ("seed=-1", "seed"),
    ("seed=1.5", "seed"),
    ("schedule.num_generator_updates=true", "schedule.num_generator_updates"),
    ("name=3", "name"),
]


@pytest.mark.parametrize("override,key", INVALID)
def test_every_invalid_value_names_its_key(override, key):
    with pytest.raises(ConfigError) as info:
        resolve(None, [override])
    assert info.value.key == key
    assert len(info.value.message) > 10  # says what is expected, not just "invalid"


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_that_record_cuda_graphs_are_refused_with_the_mode_to_use(capsys, mode):
    """Both were accepted, and on a GPU the first compiled cycle failed when a block's CUDA-graph replay overwrote
    an output still needed; the refusal comes before anything loads."""
    assert cli.main(["config", "distributed.compile=true", f"distributed.compile_mode={mode}"]) == 2
    err = capsys.readouterr().err
    assert "distributed.compile_mode" in err and "CUDA graphs" in err and "max-autotune-no-cudagraphs" in err
    assert "Traceback" not in err
    for fine in ("default", "max-autotune-no-cudagraphs"):
        assert resolve(None, ["distributed.compile=true", f"distributed.compile_mode={fine}"]).distributed.compile
    # with compile off the answer is the same (not "turn compile on", which would meet this refusal next), and a
    # mistyped mode is told the modes that work, not the refused ones
    with pytest.raises(ConfigError, match="CUDA graphs"):
        resolve(None, [f"distributed.compile_mode={mode}"])
    with pytest.raises(ConfigError) as info:
        resolve(None, ["distributed.compile=true", "distributed.compile_mode=fast"])
    assert "max-autotune-no-cudagraphs" in info.value.message and repr(mode) not in info.value.message


def test_a_token_in_a_storage_url_is_refused_without_being_repeated(capsys, tmp_path):
    """A signature in the query of storage.s3_endpoint_url was written to config.yaml (the run's and the
    store's) and to MLflow params; credentials in a URL's user part were refused already."""
    url = "http://localhost:9000/?X-Amz-Signature=planted-secret"
    assert cli.main(["config", f"storage.s3_endpoint_url={url}"]) == 2
    err = capsys.readouterr().err
    assert "storage.s3_endpoint_url" in err and "query string" in err and "planted-secret" not in err
    local = tmp_path / "runs#1"  # a local path may hold '#' and '?'
    assert resolve(None, [f"storage.output_dir={local}"]).storage.output_dir == str(local)


@pytest.mark.parametrize("override", ["loss.diversity_weight", "=3", "loss..x=1", ".x=1"])
def test_malformed_overrides_show_the_expected_form(override):
    with pytest.raises(ConfigError, match="section.key=value"):
        resolve(None, [override])


def test_override_below_a_value_is_refused(recipe_file):
    with pytest.raises(ConfigError, match="is a value, not a section"):
        resolve(recipe_file, ["loss.anchor_step.x=1"])  # set by the recipe
    with pytest.raises(ConfigError) as info:
        resolve(None, ["seed.x=1"])  # only a default
    assert info.value.key == "seed"


def test_section_given_a_value_is_refused():
    with pytest.raises(ConfigError) as info:
        resolve(None, ["loss=3"])
    assert info.value.key == "loss"


def test_missing_recipe_lists_the_builtins():
    with pytest.raises(ConfigError, match="toy2d"):
        resolve("no-such-recipe")


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve(path)


def test_saved_config_resolves_back_to_the_same_config(tmp_path, recipe_file):
    config = resolve(recipe_file, ["loss.diversity_weight=0.07", "generator.shift=2.0"])
    path = save(config, tmp_path / "run")
    assert path.name == "config.yaml"
    assert resolve(path) == config
    assert yaml.safe_load(path.read_text()) == to_dict(config)


@pytest.mark.parametrize("name", builtin_recipes())
def test_builtin_recipes_resolve(name):
    assert isinstance(resolve(name), RunConfig)


def test_every_key_can_be_overridden_with_its_own_value():
    config = resolve(None)
    data = to_dict(config)
    keys = config_keys()
    assert {"loss.diversity_weight", "loss.anchor_step", "teacher.train.lr", "distributed.zero_stage"} <= set(keys)
    for key in keys:
        value = data
        for part in key.split("."):
            value = value[part]
        assert resolve(None, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]) == config, key


def _float_keys() -> list[str]:
    """Every config key whose field takes a float (alone, in a list, or or None), found from the dataclasses."""
    import dataclasses
    import typing

    def takes_float(tp) -> bool:
        return tp is float or any(takes_float(arg) for arg in typing.get_args(tp))

    found = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            tp, key = hints[field.name], f"{prefix}{field.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{key}.")
            elif takes_float(tp):
                found.append((key, typing.get_origin(tp) is list))
    walk(RunConfig, "")
    return found


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999", "nan", "inf", "-Infinity"])
def test_every_float_key_refuses_a_number_that_is_not_finite(value):
    """`loss.diversity_weight=.inf`, `generator.optim.lr=.inf` and `teacher.guidance_scale=.inf` were accepted
    (exit 0, the value printed back); .nan was refused only where a bound happened to compare against it. YAML
    reads `nan` and `inf` without their dot as strings: they were refused as "expected float, got 'nan' (str)"."""
    keys = _float_keys()
    assert {"loss.diversity_weight", "generator.optim.lr", "teacher.guidance_scale"} <= {k for k, _ in keys}
    for key, is_list in keys:
        given = f"[{value}]" if is_list else value
        with pytest.raises(ConfigError, match="finite number") as err:
            resolve("toy2d", [f"{key}={given}"])
        assert err.value.key.startswith(key), (key, err.value.key)


def test_the_config_command_names_a_number_that_is_not_finite(capsys):
    assert cli.main(["config", "--recipe", "toy2d", "loss.diversity_weight=.inf"]) == 2
    err = capsys.readouterr().err
    assert "loss.diversity_weight" in err and "finite number" in err and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("sweep.space=no-such-space", "no search space 'no-such-space'"),
    ("sweep.metric=loss_dmdd", "not a metric a dp-dmd run reports: give one of loss_generator, loss_dmd"),
    ("sweep.metric=loss_gan", "not a metric a dp-dmd run reports"),  # dmd-gan's
])
def test_the_config_command_checks_what_a_sweep_would_read(capsys, override, message):
    """`dpdmd config` printed a config whose search space did not exist, and a sweep.metric no trial reports
    (Tune's scheduler refused it only at the first trial's first report, after the stores were computed)."""
    assert cli.main(["config", "--recipe", "toy2d", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert cli.main(["config", "--recipe", "toy2d", "loss.method=dmd-gan", "sweep.metric=loss_gan"]) == 0
    assert cli.main(["config", "--recipe", "toy2d", "sweep.metric=live_objective", "evaluation.every=10"]) == 0


@pytest.mark.parametrize("overrides, detached", [
    ([], True),  # DP-DMD at the paper's lambda
    (["loss.diversity_weight=0"], False),  # plain DMD
    (["loss.method=dmd"], False),
    (["loss.method=dmd-regression"], False),  # the two earlier remedies, as their own papers train them
    (["loss.method=dmd-gan"], False),
    (["loss.diversity_weight=0", "loss.detach_first_step=true"], True),  # the "detach alone" ablation
    (["loss.detach_first_step=false"], False),  # DP-DMD without its stop-gradient (collapses early, the paper says)
])
def test_the_stop_gradient_after_the_first_step_is_dp_dmds_alone_unless_forced(overrides, detached):
    for recipe in ("toy2d", "shapes", "sd35m", "sdxl"):
        assert resolve(recipe, overrides).loss.first_step_detached is detached, recipe


def test_seed_lists_read_as_written_and_a_range_counting_down_is_named():
    """`--seeds 5-3,1` sampled seed 1 alone: the empty range 5-3 was dropped without a word."""
    assert cli.parse_seeds("0-2,10") == [0, 1, 2, 10] and cli.parse_seeds("7") == [7]
    for text, message in (("5-3,1", "'5-3' counts down; write 3-5"), ("a-b", "not a seed list"),
                          ("-1", "not a seed list")):
        with pytest.raises(ConfigError, match=message):
            cli.parse_seeds(text)


def test_build_rejects_a_non_mapping_section():
    with pytest.raises(ConfigError, match="mapping"):
        build(RunConfig, {"teacher": [1, 2]})


def test_cli_config_prints_the_resolved_config(capsys):
    assert cli.main(["config", "--recipe", "toy2d", "loss.diversity_weight=0.1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"]["diversity_weight"] == 0.1
    assert printed["teacher"]["family"] == "toy2d"


def test_cli_reports_config_errors_before_any_work(capsys):
    assert cli.main(["train-teacher", "loss.lamda=0.1"]) == 2
    err = capsys.readouterr().err
    assert "loss.lamda" in err and "valid keys here" in err


def test_help_lists_the_real_subcommands():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("demo", "config", "train-teacher", "evaluate", "sample"):
        assert command in out


def test_dump_is_yaml_of_every_section():
    assert set(yaml.safe_load(dump(RunConfig()))) == {f.split(".")[0] for f in config_keys()}


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve(None, ["storage.output_dir=out", "storage.trajectory_root=s3://bucket/anchors"])
    assert config.storage.output_dir == str(tmp_path / "out")
    assert config.storage.trajectory_root == "s3://bucket/anchors"
    assert config.teacher.path == ""


@pytest.mark.parametrize("content, message", [
    (b"a red cat\ncaf\xe9 au lait\n", r"is not UTF-8 text \(line 2 holds the byte b'\\xe9'\): save it as UTF-8"),
    (b"", "holds no prompts: write one prompt a line"),
    (b"# only a comment\n\n   \n", "holds no prompts"),
    (b"a red cat\n" + b"x" * 5000 + b"\n", "line 2: 5000 characters, more than one prompt"),
])
def test_a_bad_prompt_file_is_refused_by_every_command_before_it_starts(tmp_path, capsys, content, message):
    """A prompt file that was not UTF-8 failed once a run had started, with a decode error naming neither the file
    nor the fix; `dpdmd config` did not read it at all."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    for key in ("trajectories.prompts", "evaluation.prompts"):
        for command in (["config"], ["distill", "--no-ray"], ["precompute", "--no-ray"]):
            code = cli.main([*command, "--recipe", "toy2d", f"{key}={prompts}", f"storage.output_dir={tmp_path}"])
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err, (command, err)
            assert f"{key}: prompt file {prompts}" in err, err
            assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]  # nothing started


def test_a_missing_prompt_file_is_named_and_good_ones_are_read(tmp_path):
    with pytest.raises(ConfigError, match="evaluation.prompts.*does not exist"):
        resolve("toy2d", [f"evaluation.prompts={tmp_path / 'nope.txt'}"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# held out\na red cat\n\n  a blue dog  \n", encoding="utf-8")
    from workers.evaluate import eval_prompts

    assert eval_prompts(resolve("toy2d", [f"evaluation.prompts={prompts}"])) == ["a red cat", "a blue dog"]


def test_a_config_error_crosses_a_process_boundary_whole():
    """Raised in a Ray worker, a ConfigError came back as "ConfigError.__init__() missing 1 required positional
    argument", under a traceback of Ray Train's, instead of its one line and exit code 2."""
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("critic.gradient_checkpointing", "set it to true")))
    assert (err.key, err.message, str(err)) == ("critic.gradient_checkpointing", "set it to true",
                                                "critic.gradient_checkpointing: set it to true")


def test_checkpointing_that_keeps_attention_is_refused_for_networks_without_transformer_blocks(tmp_path, capsys):
    """toy2d's MLP, the shapes UNet and SDXL's UNet have no transformer blocks: the setting passed every check and
    failed inside the training workers, which Ray Train restarted three times before a 177-line traceback."""
    for recipe in ("toy2d", "shapes", "sdxl"):
        for section in ("generator", "critic"):
            code = cli.main(["distill", "--no-ray", "--recipe", recipe, f"{section}.gradient_checkpointing=attention",
                             f"storage.output_dir={tmp_path}", "distributed.use_gpu=false",
                             "trajectories.gpus_per_actor=0"])
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err, (recipe, err)
            assert f"{section}.gradient_checkpointing: 'attention'" in err and "set it to true or false" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing started
    assert resolve("sd3-tiny", ["critic.gradient_checkpointing=attention"]).critic.gradient_checkpointing == "attention"
