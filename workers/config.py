"""Typed, self-validating configs for every component (the schema; workers/configure.py builds them from
plain data).

Values resolve as dataclass defaults <- YAML recipe <- dotted key=value overrides (orchestrator.recipe).
Every check runs before any work starts; each error names the dotted key and says how to fix it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from models.errors import ConfigError


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


# ----------------------------------------------------------------------------------------------------
# Components


@dataclass
class TeacherTrainConfig:
    """How `dpdmd train-teacher` trains an embedded family's teacher (flow matching with CFG dropout)."""

    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    cfg_dropout: float = 0.15  # fraction of rows trained on the empty prompt
    width: int = 256  # hidden width (MLP) or base channel count (image models)
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "width"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 < self.cfg_dropout < 1, "cfg_dropout",
               f"must be in (0, 1) so that the teacher also learns the unconditional velocity CFG needs, "
               f"got {self.cfg_dropout}")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


BUILT_IN_PREFIX = "builtin:"


def teacher_location(path: str) -> Literal["local", "s3", "hub", "builtin", "missing"]:
    """Where teacher.path points. A relative path that exists is local; one that does not and reads like
    owner/name is a hub id; builtin:NAME is a tiny random pipeline built in code (models/tiny_pipelines.py)."""
    from pathlib import Path

    from models.tiny_pipelines import BUILT_IN

    if path.startswith(BUILT_IN_PREFIX):
        return "builtin" if path.removeprefix(BUILT_IN_PREFIX) in BUILT_IN else "missing"
    if path.startswith("s3://"):
        return "s3" if len(path) > len("s3://") else "missing"
    if "://" not in path and Path(path).expanduser().is_dir():
        return "local"
    return "hub" if _HUB_ID.fullmatch(path) else "missing"


@dataclass
class TeacherConfig:
    """The frozen multi-step teacher and its sampler (docs/method.md: CFG scale w, scheduler shift, steps)."""

    family: str = "toy2d"
    # A local directory, an s3://bucket/prefix URL (fetched once into storage.teacher_cache) or a hub id
    # (owner/name, downloaded by huggingface_hub when online) of a saved teacher; builtin:sd3-tiny or
    # builtin:sdxl-tiny, a tiny random pipeline built once into storage.teacher_cache; "" = the embedded default.
    path: str = ""
    guidance_scale: float = 3.5  # w in v_u + w (v_c - v_u)
    num_steps: int = 30
    shift: float = 3.0
    # The teacher network's dtype in precompute. Anchor states, times and steps are fp32 either way; a bf16
    # network still puts 0.4% (toy2d) to 0.8% (shapes) relative RMS error into the K = 1 anchor target.
    dtype: Literal["fp32", "bf16"] = "fp32"
    resolution: int = 0  # image side in pixels for latent families; 0 = the model's native resolution
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)

    def __post_init__(self):
        from models.families import NAMES, get_family

        _check(self.family in NAMES, "family", f"unknown teacher family {self.family!r}; choose one of {sorted(NAMES)}")
        pipeline = get_family(self.family).pipeline_class
        _check(bool(self.path) or pipeline is None, "path",
               f"the {self.family} family has no embedded teacher: set teacher.path to a {pipeline} directory, an "
               "s3://bucket/prefix URL of one, or a hub id")
        if self.path:
            from models.tiny_pipelines import BUILT_IN

            location = teacher_location(self.path)
            built_in = ", ".join(BUILT_IN_PREFIX + name for name in BUILT_IN)
            _check(location != "missing", "path",
                   f"{self.path!r} is neither an existing directory, an s3://bucket/prefix URL, a hub id "
                   f"(owner/name) nor a built-in pipeline ({built_in}); give one of those")
            if location == "builtin":
                family = BUILT_IN[self.path.removeprefix(BUILT_IN_PREFIX)]
                _check(family == self.family, "path",
                       f"{self.path} is a {family} pipeline: set teacher.family={family} (it is {self.family})")
        _check(self.resolution >= 0, "resolution", f"must be >= 0 (0 = the model's native size), got {self.resolution}")
        _check(self.guidance_scale >= 0, "guidance_scale",
               f"must be >= 0 (1.0 is the conditional model alone), got {self.guidance_scale}")
        _check(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        _check(self.shift > 0, "shift", f"must be > 0 (1.0 is the linear schedule), got {self.shift}")


@dataclass
class OptimConfig:
    """AdamW settings (the paper's recipe: lr 1e-5, weight decay 0, clip 1.0)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # 0 disables clipping
    # ZeRO-Offload: this network's float32 master weights and AdamW moments (12 bytes per parameter, about 25 GiB
    # for SD3.5-Medium's transformer) leave the GPU for host memory (with a float32 gradient copy and a bf16 buffer
    # there, about 18 bytes per parameter of pinned host memory) and its update runs there (PyTorch's AdamW, its
    # fused kernel on a GPU machine); the GPU holds the bf16 weights and gradients. Costs a host update and two
    # transfers per step of this network, so it pays most on the generator (one step per cycle; the critic steps
    # several). Needs ZeRO >= 1.
    offload: bool = False

    def __post_init__(self):
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
               f"must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {self.betas}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass
class GeneratorConfig:
    """The few-step student, initialised from the teacher and sampled without CFG."""

    num_steps: int = 4  # NFE
    shift: float | None = None  # None: the teacher's shift
    # true: diffusers' activation checkpointing (each block recomputed in backward); "attention": the same but the
    # attention outputs are kept, not recomputed (SD3 transformers, with distributed.compile=true: in eager mode
    # its policy runs over every op and costs more than it saves; workers/engines.py, checkpoint_keeping_attention)
    gradient_checkpointing: bool | Literal["attention"] = False
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        _check(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        _check(self.shift is None or self.shift > 0, "shift", f"must be > 0 or null, got {self.shift}")


@dataclass
class CriticConfig:
    """The fake score, initialised from the teacher and trained on generator samples."""

    gradient_checkpointing: bool | Literal["attention"] = False  # as generator.gradient_checkpointing
    optim: OptimConfig = field(default_factory=OptimConfig)


# The objectives a run can train its generator with (docs/method.md, "The baselines"): plain DMD, DP-DMD, and the
# two earlier remedies for DMD's mode collapse, a perceptual regression onto the teacher's own samples and a GAN
# head on the critic. The last two read the teacher's full samples from the trajectory store.
METHODS = ("dmd", "dp-dmd", "dmd-regression", "dmd-gan")
TEACHER_SAMPLE_METHODS = ("dmd-regression", "dmd-gan")
# What every training report holds (workers/train.py; anchor_passes when the run reads a store), and what each
# baseline adds: the names sweep.metric may give besides the live_* ones of evaluation beside training
REPORTED_METRICS = ("loss_generator", "loss_dmd", "loss_div", "dmd_grad_norm", "dmd_normaliser", "loss_critic",
                    "generator_update", "critic_updates", "resumes", "skipped_steps", "cycle_s", "samples_per_s",
                    "anchor_passes")
METHOD_METRICS = {"dmd-regression": ("loss_reg",),
                  "dmd-gan": ("loss_gan", "loss_gan_critic", "gan_real_prob", "gan_fake_prob")}


def reported_metrics(method: str) -> tuple[str, ...]:
    """The metrics a training report of loss.method holds (a skipped update's report holds `skipped` alone)."""
    return REPORTED_METRICS + METHOD_METRICS.get(method, ())


@dataclass
class LossConfig:
    """The generator's objective (docs/method.md, The losses and The baselines): L = L_dmd plus, by method,
    diversity_weight * L_div (dp-dmd), regression_weight * L_reg (dmd-regression) or gan_generator_weight * L_gan
    (dmd-gan, whose critic also trains its classifier head with gan_critic_weight)."""

    method: Literal["dmd", "dp-dmd", "dmd-regression", "dmd-gan"] = "dp-dmd"
    diversity_weight: float = 0.05  # lambda (dp-dmd); 0 is plain DMD
    regression_weight: float = 0.25  # dmd-regression: the original DMD's weight on its LPIPS regression
    gan_generator_weight: float = 3e-3  # dmd-gan: DMD2's weight on the generator's non-saturating GAN loss ...
    gan_critic_weight: float = 1e-2  # ... and on the critic head's classification loss
    # dmd-regression on sd3 and sdxl: LPIPS on the decoded images (models/perceptual.py), its trunk (vgg or alex),
    # the directory of its two weight files ("": torchvision's download cache and the lpips package) and the side
    # the images are resized to first (224: the trunk's ImageNet resolution)
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_weights: str = ""
    lpips_resolution: int = 224
    anchor_step: int = 5  # K: teacher ODE steps to the anchor z_K
    normaliser: Literal["xt", "xgen"] = "xt"  # DMD gradient normaliser: reference script / DMD2
    # DP-DMD's stop-gradient after the generator's first step (loss 2). null: where DP-DMD trains (dp-dmd with
    # lambda > 0); plain DMD (lambda = 0 or dmd) and the two baselines roll out with gradient through every step,
    # as their own papers do. true / false force it (true at lambda = 0: the "detach alone" ablation)
    detach_first_step: bool | None = None

    def __post_init__(self):
        _check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check(self.diversity_weight >= 0, "diversity_weight",
               f"must be >= 0 (0 is plain DMD, the paper uses 0.05), got {self.diversity_weight}")
        for key in ("regression_weight", "gan_generator_weight", "gan_critic_weight"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(self.anchor_step >= 1, "anchor_step", f"must be >= 1 teacher step, got {self.anchor_step}")
        _check(self.lpips_net in ("vgg", "alex"), "lpips_net", f"must be vgg or alex, got {self.lpips_net!r}")
        _check(self.lpips_resolution >= 64, "lpips_resolution",
               f"must be >= 64 pixels (the trunk's five layers need them), got {self.lpips_resolution}")

    @property
    def first_step_detached(self) -> bool:
        """Whether the generator's first step is cut from the DMD term's gradient (detach_first_step resolved)."""
        if self.detach_first_step is not None:
            return self.detach_first_step
        return self.method == "dp-dmd" and self.diversity_weight > 0

    @property
    def weights(self) -> dict[str, float]:
        """Each extra term's weight in the generator objective; a term the method does not use weighs 0."""
        return {"div": self.diversity_weight if self.method == "dp-dmd" else 0.0,
                "reg": self.regression_weight if self.method == "dmd-regression" else 0.0,
                "gan": self.gan_generator_weight if self.method == "dmd-gan" else 0.0}

    @property
    def perceptual(self):
        """The LPIPS settings the latent families' regression distance is built with."""
        from models.perceptual import PerceptualOptions

        return PerceptualOptions(self.lpips_net, self.lpips_weights, self.lpips_resolution)

    @property
    def critic_gan_weight(self) -> float:
        return self.gan_critic_weight if self.method == "dmd-gan" else 0.0

    @property
    def teacher_samples(self) -> bool:
        """Whether the method reads the teacher's full ODE samples (the store's x_teacher column)."""
        return self.method in TEACHER_SAMPLE_METHODS


@dataclass
class ScheduleConfig:
    """The two time-scale update schedule and its bookkeeping."""

    critic_updates_per_generator: int = 5
    num_generator_updates: int = 6000
    checkpoint_every: int = 500  # generator updates between checkpoints; 0 = only at the end
    log_every: int = 10
    on_nonfinite: Literal["raise", "skip"] = "raise"

    def __post_init__(self):
        _check(self.critic_updates_per_generator >= 1, "critic_updates_per_generator",
               f"must be >= 1 (the paper's script uses 5), got {self.critic_updates_per_generator}")
        _check(self.num_generator_updates >= 1, "num_generator_updates",
               f"must be >= 1, got {self.num_generator_updates}")
        _check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclass
class TrajectoryConfig:
    """The precomputed teacher trajectories: which prompts and seeds, and the actor pool that makes them."""

    prompts: str = ""  # a text file, one prompt a line; "" = the family's embedded training prompts
    # The store holds as many rows as the run's generator updates consume (updates x batch x workers: no
    # anchor row is used twice within a run), and at least seeds_per_prompt rows per prompt when set.
    seeds_per_prompt: int = 0
    max_reuse: int = 1  # times one run may use an anchor row; 1 = fresh noise for every generator update
    seed_offset: int = 0
    rows_per_shard: int = 256
    batch_size: int = 64
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def __post_init__(self):
        _check(self.seeds_per_prompt >= 0, "seeds_per_prompt",
               f"must be >= 0 (0 = as many as the run needs), got {self.seeds_per_prompt}")
        _check(self.max_reuse >= 1, "max_reuse",
               f"must be >= 1 (1 = every generator update sees new anchor rows), got {self.max_reuse}")
        for key in ("rows_per_shard", "batch_size", "num_actors"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.seed_offset >= 0, "seed_offset", f"must be >= 0, got {self.seed_offset}")
        _check(self.cpus_per_actor > 0, "cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        _check(self.gpus_per_actor >= 0, "gpus_per_actor", f"must be >= 0, got {self.gpus_per_actor}")


@dataclass
class EvalConfig:
    """The paper's protocol: the same held-out prompts and seeds for every model compared."""

    prompts: str = ""  # a text file, one prompt a line; "" = the family's evaluation prompts
    seeds_per_prompt: int = 9  # R
    seed_offset: int = 1_000_000  # held-out seeds start here, far from the training seeds
    batch_size: int = 256
    # Evaluation beside training (workers/live_eval.py): a generator snapshot every `every` generator updates
    # (0: off) goes to an evaluator of its own, a Ray actor with these resources (0 CPUs: it shares the
    # node's) or, without Ray, a background process; training does not wait for it.
    every: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    # The paper's image metrics, each computed only when its weights are given as a local path
    # (models/metrics/image.py): DINO / CLIP image models (diversity), PickScore, ImageReward.
    dino_path: str = ""
    clip_path: str = ""
    pickscore_path: str = ""
    imagereward_path: str = ""

    def __post_init__(self):
        _check(self.seeds_per_prompt >= 2, "seeds_per_prompt",
               f"must be >= 2 (diversity compares seeds pairwise), got {self.seeds_per_prompt}")
        _check(self.seed_offset >= 0, "seed_offset", f"must be >= 0, got {self.seed_offset}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.every >= 0, "every", f"must be >= 0 (0: no evaluation during training), got {self.every}")
        for key in ("cpus", "gpus"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # distributed.compile_mode
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that record CUDA graphs: refused


@dataclass
class DistributedConfig:
    """Ray Train workers and DeepSpeed ZeRO sharding."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    batch_size_per_worker: int = 4
    # torch.compile the teacher, generator and critic (per transformer block where they have them; trials trained
    # together: each stacked network's whole call, which inductor takes minutes to compile, BENCHMARKS.md)
    compile: bool = False
    # torch.compile's mode with compile=true (COMPILE_MODES): "max-autotune-no-cudagraphs" also searches kernel
    # configurations; "default" is what BENCHMARKS.md measured. The modes that record CUDA graphs ("reduce-overhead",
    # "max-autotune") are refused: the next replay of a compiled block overwrites outputs the cycle still needs
    compile_mode: str = "default"
    # Keep the frozen teacher's weights in pinned host memory and stream them through the GPU block by block when it
    # scores the generator's samples (once per generator update): SD3.5-Medium's 4.6 GiB off the GPU but for its
    # first block and 0.4 GiB outside its blocks from the rollout to the score; one H200 measured 0.05 s of a 6.4 s
    # cycle (workers/offload.py, BENCHMARKS.md)
    offload_teacher: bool = False
    max_failures: int = 3  # worker failures survived by resuming from the last checkpoint

    def __post_init__(self):
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, "cpus_per_worker",
               f"must be > 0 (fractions such as 0.5 let small machines fit more workers), got {self.cpus_per_worker}")
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.batch_size_per_worker >= 1, "batch_size_per_worker",
               f"must be >= 1, got {self.batch_size_per_worker}")
        _check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        _check(self.compile_mode not in CUDA_GRAPH_MODES, "compile_mode",
               f"{self.compile_mode!r} records CUDA graphs, and the next replay of a compiled block overwrites outputs "
               "the cycle still needs (on an H200 the first SD3.5-Medium cycle failed: \"accessing tensor output of "
               "CUDAGraphs that has been overwritten by a subsequent run\"): use max-autotune-no-cudagraphs for "
               "searched kernels without graphs, or default")
        _check(self.compile_mode in COMPILE_MODES, "compile_mode",
               f"expected one of {list(COMPILE_MODES)}, got {self.compile_mode!r}")
        _check(self.compile or self.compile_mode == "default", "compile_mode",
               f"applies only with distributed.compile=true (got {self.compile_mode!r} with compile off): turn "
               "compile on, or leave compile_mode out")
        _check(self.use_gpu or not self.offload_teacher, "offload_teacher",
               "moves the teacher's weights between host and GPU memory: it needs use_gpu=true")


@dataclass
class TrackingConfig:
    """MLflow. Credentials never go here: MLflow reads them from its own environment variables."""

    tracking_uri: str = ""  # "" = sqlite file in storage.output_dir
    experiment: str = "dpdmd"
    run_name: str = ""

    def __post_init__(self):
        _check(bool(self.experiment.strip()), "experiment", "must be a non-empty name")
        url = urlsplit(self.tracking_uri)
        _check(url.username is None and url.password is None, "tracking_uri",
               "must not hold credentials; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
               "(or MLFLOW_TRACKING_TOKEN) in the environment instead")


@dataclass
class StorageConfig:
    """Where runs write. URLs may be local paths or s3://bucket/prefix (credentials from the AWS chain)."""

    output_dir: str = "outputs"
    trajectory_root: str = ""  # "" = <output_dir>/trajectories
    s3_endpoint_url: str = ""  # for S3-compatible stores that are not AWS; "" = AWS
    teacher_cache: str = ""  # local copies of s3:// teachers; "" = <output_dir>/teacher_cache

    def __post_init__(self):
        _check(bool(self.output_dir.strip()), "output_dir", "must be a non-empty path")
        _check("://" not in self.teacher_cache, "teacher_cache",
               "must be a local directory (teachers are fetched from S3 into it)")
        for key in ("output_dir", "trajectory_root", "s3_endpoint_url"):
            url = urlsplit(getattr(self, key))
            _check(url.username is None and url.password is None, key,
                   "must not hold credentials; give them through the AWS environment or profile")
            # a signature or token in a URL's query would be written to config.yaml, the store and MLflow
            _check("://" not in getattr(self, key) or not (url.query or url.fragment), key,
                   "must not hold a query string or fragment (a signature or token there would be written to "
                   "config.yaml and MLflow); give credentials through the AWS environment or profile")


@dataclass
class SweepConfig:
    """Ray Tune over dotted config keys (tune_spaces/); each trial distils and then evaluates."""

    space: str = "default"  # tune_spaces/<name>.yaml or a YAML path
    num_samples: int = 1  # repeats of the grid (random search: number of draws)
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    trial_cpus: float = 0.1  # the trial driver's own share; its training workers ask for their own
    search: Literal["basic", "optuna"] = "basic"  # basic: the space's grid and random draws; optuna: Optuna's
    # multi-objective search (diversity and quality) over the space's choice / uniform / loguniform / randint keys
    # ASHA stops trials early and PBT perturbs them (loss.diversity_weight, critic.optim.lr of the space), both on
    # `metric`: any training metric or, with evaluation.every > 0, a live_* one (live_objective: the family's
    # diversity plus its quality, each signed so that higher is better)
    scheduler: Literal["none", "asha", "pbt"] = "none"
    metric: str = "loss_dmd"
    mode: Literal["min", "max"] = "min"
    pbt_interval: int = 0  # generator updates between PBT perturbations; 0: schedule.checkpoint_every
    # Collapse guard (needs evaluation.every > 0): stop a trial whose live diversity falls below this fraction of
    # the teacher's for collapse_patience evaluations in a row; 0: off
    collapse_fraction: float = 0.0
    collapse_patience: int = 2
    # The setting each report picks: the most diverse one whose quality is at most this much below ...
    quality_drop_from_best: float = 0.02  # ... the best quality on the sweep's Pareto front (dpdmd sweep)
    quality_drop_from_dmd: float = 0.02  # ... DMD's mean quality (dpdmd fidelity, dpdmd demo)

    def __post_init__(self):
        _check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent_trials >= 0, "max_concurrent_trials",
               f"must be >= 0 (0: as many as fit the cluster with their workers), got {self.max_concurrent_trials}")
        _check(self.trial_cpus > 0, "trial_cpus", f"must be > 0 (Ray refuses 0), got {self.trial_cpus}")
        for key in ("quality_drop_from_best", "quality_drop_from_dmd"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(self.pbt_interval >= 0, "pbt_interval", f"must be >= 0, got {self.pbt_interval}")
        _check(0 <= self.collapse_fraction < 1, "collapse_fraction",
               f"must be in [0, 1) (0: off; e.g. 0.5 stops trials below half the teacher's diversity), "
               f"got {self.collapse_fraction}")
        _check(self.collapse_patience >= 1, "collapse_patience", f"must be >= 1, got {self.collapse_patience}")


@dataclass
class RunConfig:
    """Everything one run needs. Sections are the dotted-path prefixes used by recipes and overrides."""

    name: str = "dpdmd"
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _check(self.sweep.metric.startswith("live_") or self.sweep.metric in reported_metrics(self.loss.method),
               "sweep.metric", f"{self.sweep.metric!r} is not a metric a {self.loss.method} run reports: give one of "
               f"{', '.join(reported_metrics(self.loss.method))}, or a live_* one of evaluation beside training (e.g. "
               "live_objective, with evaluation.every > 0)")
        live = self.sweep.metric.startswith("live_") or self.sweep.collapse_fraction > 0
        _check(not live or self.evaluation.every > 0, "evaluation.every",
               f"must be > 0 for sweep.metric={self.sweep.metric} or a collapse guard "
               f"(sweep.collapse_fraction={self.sweep.collapse_fraction:g}): live metrics come from evaluation "
               "beside training, e.g. evaluation.every=100")
        _check(self.sweep.scheduler != "pbt" or self.distributed.num_workers == 1, "distributed.num_workers",
               f"must be 1 with sweep.scheduler=pbt, got {self.distributed.num_workers}: a PBT trial trains in its "
               "own process (Tune stops and restarts it at each perturbation); use asha or none for trials of "
               "several workers")
        _check(not (self.loss.method == "dmd-gan" and self.distributed.zero_stage == 3), "distributed.zero_stage",
               "must be at most 2 with loss.method=dmd-gan: its generator term runs backward through the critic, "
               "whose ZeRO-3 engine gathers its partitioned weights only inside its own backward (DeepSpeed refuses "
               "the other engine's); set distributed.zero_stage=2")
        for section in ("generator", "critic"):
            _check(not getattr(self, section).optim.offload or self.distributed.zero_stage >= 1,
                   f"{section}.optim.offload", "keeps the optimizer's state where ZeRO partitions it, so it needs "
                   f"distributed.zero_stage 1, 2 or 3 (it is {self.distributed.zero_stage})")
        for section in ("generator", "critic"):
            _check(getattr(self, section).gradient_checkpointing != "attention" or self.teacher.family == "sd3",
                   f"{section}.gradient_checkpointing", "'attention' keeps the attention outputs of a transformer's "
                   f"blocks (SD3), and the {self.teacher.family} family's network has none: set it to true or false")
        _check(self.loss.anchor_step <= self.teacher.num_steps, "loss.anchor_step",
               f"K = {self.loss.anchor_step} must not exceed teacher.num_steps = {self.teacher.num_steps}; "
               "the paper uses K = 5 of 30")

    @property
    def generator_shift(self) -> float:
        return self.teacher.shift if self.generator.shift is None else self.generator.shift
