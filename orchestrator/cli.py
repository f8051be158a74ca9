"""The `dpdmd` command (also `python -m orchestrator`): one subcommand per stage.

    dpdmd demo                                            # the embedded default, end to end
    dpdmd config --recipe toy2d loss.diversity_weight=0.1 # print the resolved, validated config
    dpdmd train-teacher --recipe toy2d                    # train an embedded family's teacher
    dpdmd precompute --recipe toy2d                       # teacher anchors into the trajectory store
    dpdmd repair-store outputs/trajectories/toy2d-<hash>  # recompute the shards of a store that fail checks
    dpdmd distill --recipe toy2d                          # DP-DMD on Ray Train + DeepSpeed
    dpdmd sweep --recipe toy2d sweep.space=default        # Ray Tune over lambda and K, Pareto front
    dpdmd fidelity --recipe shapes sweep.space=fidelity   # teacher vs DMD vs DP-DMD over training seeds
    dpdmd evaluate --recipe toy2d                         # the teacher's metrics on held-out seeds
    dpdmd sample --recipe toy2d --prompt "class 1" --seeds 0-8 --out samples/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from orchestrator import recipe as recipes
from workers.config import ConfigError
from workers.configure import to_dict

DEFAULT_RECIPE = "toy2d"


def _add_recipe_args(parser: argparse.ArgumentParser, default: str | None = None, resumable: bool = False) -> None:
    """resumable: the command has --resume, which keeps the run's own recipe; --recipe defaults to None there, so
    that one given beside --resume is seen (and refused), and `default` applies when the command is not resuming."""
    parser.add_argument("--recipe", default=None if resumable else default,
                        help=f"built-in recipe ({', '.join(recipes.builtin_recipes())}) or a YAML path"
                             + (f" (default: {default})" if default else ""))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the recipe, e.g. loss.diversity_weight=0.1")


def parse_seeds(text: str) -> list[int]:
    """'0-8' -> 0..8; '3,5,7' -> [3, 5, 7]; mixed forms such as '0-2,10' work too."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            if sep and int(hi) < int(lo):  # its range was empty, and the other parts went on alone
                raise ConfigError("--seeds", f"{part.strip()!r} counts down; write {hi}-{lo}")
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError("--seeds", f"{text!r} is not a seed list; write e.g. 0-8 or 1,2,3") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError("--seeds", f"{text!r} must name at least one seed, all >= 0")
    return seeds


def cmd_config(args: argparse.Namespace) -> int:
    from orchestrator.spaces import load_space

    config = recipes.resolve(args.recipe, args.overrides)
    load_space(config.sweep.space)  # what `dpdmd sweep` and `dpdmd fidelity` would read: its file and keys
    print(recipes.dump(config), end="")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from workers.teacher import train_teacher

    config = recipes.resolve(args.recipe, args.overrides)
    if config.teacher.path and not args.out:
        raise ConfigError("teacher.path", "is set, so there is nothing to train; leave it empty to train the "
                                          "embedded teacher, or pass --out DIR to train one elsewhere")
    path = train_teacher(config, Path(args.out) if args.out else None)
    print(f"teacher saved to {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.families import get_family
    from orchestrator import runs
    from workers.context import device_for
    from workers.evaluate import evaluate, format_table, load_generator, save_samples, teacher_sampler
    from workers.teacher import load_teacher

    config = recipes.resolve(args.recipe, args.overrides)
    device = device_for(config.distributed.use_gpu)
    if args.generator:
        name, (adapter, net, sampler) = "generator", load_generator(args.generator, device, config.teacher.family)
    else:
        name, (adapter, net) = "teacher", load_teacher(config, device, vae=True)
        sampler = teacher_sampler(config, adapter)
    result = evaluate(config, adapter, net, sampler, device=device)
    run_dir = runs.make_run_dir(config, "evaluate")  # after the evaluation: a refused prompt leaves nothing behind
    (run_dir / "metrics.json").write_text(json.dumps({name: result.metrics}, indent=2))
    save_samples(result, run_dir / f"{name}_samples.npz")
    get_family(config.teacher.family).render({name: result.samples}, result.prompts,
                                             run_dir / f"{name}_samples.png")
    print(format_table({name: result.metrics}))
    print(f"\nmetrics, samples and pictures in {run_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from models.families import get_family
    from orchestrator import runs
    from models.sampling import grid_pairs, sample
    from workers.context import device_for
    from workers.evaluate import Evaluation, eval_prompts, load_generator, save_samples, teacher_sampler
    from workers.teacher import load_teacher

    config = recipes.resolve(args.recipe, args.overrides)
    prompts = args.prompt or eval_prompts(config)
    seeds = parse_seeds(args.seeds)
    device = device_for(config.distributed.use_gpu)
    if args.generator:
        adapter, net, sampler = load_generator(args.generator, device, config.teacher.family)
    else:
        adapter, net = load_teacher(config, device, vae=True)
        sampler = teacher_sampler(config, adapter)
    pairs = grid_pairs(prompts, seeds)
    samples = adapter.decode(sample(adapter, net, *pairs, sampler, batch_size=config.evaluation.batch_size,
                                    device=device))
    out = Path(args.out) if args.out else runs.make_run_dir(config, "sample")
    save_samples(Evaluation(*pairs, samples, {}), out / "samples.npz")
    name = "generator" if args.generator else "teacher"
    png = get_family(config.teacher.family).render({name: samples}, pairs[0], out / "samples.png")
    print(f"{len(pairs[0])} samples ({len(prompts)} prompts x {len(seeds)} seeds) in {out / 'samples.npz'} "
          f"and {png}")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from orchestrator.precompute import precompute

    config = recipes.resolve(args.recipe, args.overrides)
    _, summary = precompute(config, use_ray=not args.no_ray)
    print(summary)
    return 0


def cmd_repair_store(args: argparse.Namespace) -> int:
    from orchestrator.precompute import repair_store

    _, summary = repair_store(args.store, args.overrides, use_ray=not args.no_ray)
    print(summary)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from orchestrator.distill import run_distill, run_local
    from orchestrator.runs import finished, resume_config

    if args.resume:
        config, run_dir = resume_config(args.resume, args.overrides, "distill", args.recipe), Path(args.resume)
        if finished(run_dir, config):
            print(f"{run_dir} has finished already ({config.schedule.num_generator_updates} generator updates); "
                  f"its generator is {run_dir / 'generator'}")
            return 0
    else:
        config, run_dir = recipes.resolve(args.recipe or DEFAULT_RECIPE, args.overrides), None
    run_local(config, run_dir) if args.no_ray else run_distill(config, run_dir)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.runs import resume_config
    from orchestrator.sweep import run_sweep

    if args.resume:
        config = resume_config(args.resume, args.overrides, "sweep", args.recipe)
        run_sweep(config, to_dict(config), sweep_dir=Path(args.resume).resolve(), resume=True)
    else:
        config = recipes.resolve(args.recipe or DEFAULT_RECIPE, args.overrides)
        run_sweep(config, to_dict(config))
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    from orchestrator.fidelity import run_fidelity

    if args.jobs < 1:
        raise ConfigError("--jobs", f"must be >= 1, got {args.jobs}")
    if args.jobs > 1 and not args.no_ray:
        raise ConfigError("--jobs", "sets the trials at a time without Ray; add --no-ray, or leave --jobs out and "
                                    "let Ray Tune run as many as the cluster holds (sweep.max_concurrent_trials)")
    config = recipes.resolve(args.recipe, args.overrides)
    if args.together < 1 or (args.together > 1 and not args.no_ray):
        raise ConfigError("--together", f"takes N >= 1 trials per process, with --no-ray (Ray Tune runs a trial per "
                                        f"worker group), got {args.together}")
    if args.time_limit is not None and (args.together == 1 or not args.no_ray):
        raise ConfigError("--time-limit", "stops trials trained together (--no-ray --together N, N >= 2); without "
                                          "them, stop the command and continue with --out")
    run_fidelity(config, to_dict(config), use_ray=not args.no_ray, jobs=args.jobs,
                 out_dir=Path(args.out) if args.out else None, together=args.together,
                 time_limit_s=args.time_limit * 60 if args.time_limit is not None else None)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import run_demo

    run_demo(recipes.resolve(args.recipe, args.overrides))
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE)


def _config_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)


def _train_teacher_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE)
    p.add_argument("--out", default=None, help="directory for the teacher (default: under storage.output_dir)")


def _precompute_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE)
    p.add_argument("--no-ray", action="store_true", help="compute in this process instead of a Ray actor pool")


def _repair_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="the store's directory or s3:// URL, as the error names it")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides on the store's config, e.g. trajectories.num_actors=4")
    p.add_argument("--no-ray", action="store_true", help="compute in this process instead of a Ray actor pool")


def _distill_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE, resumable=True)
    p.add_argument("--no-ray", action="store_true",
                   help="run the train function in this process (or under torchrun), without Ray or MLflow")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a stopped or killed run from its last checkpoint, with its own config.yaml")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE, resumable=True)
    p.add_argument("--resume", metavar="SWEEP_DIR", default=None,
                   help="continue a stopped sweep: its finished trials are kept, the others continue from their "
                        "last checkpoints")


def _fidelity_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE)
    p.add_argument("--no-ray", action="store_true",
                   help="run trials as local processes of the train function (a GPU machine without Ray)")
    p.add_argument("--jobs", type=int, default=1, help="with --no-ray: trials at a time (default 1)")
    p.add_argument("--out", default=None,
                   help="the table's directory (default: a new run directory); with --no-ray, giving an earlier "
                        "run's directory runs only its unfinished trials")
    p.add_argument("--together", type=int, default=1, metavar="N",
                   help="with --no-ray: train up to N trials per process as one batched computation (small "
                        "embedded teachers, fp32; default 1: a process per trial)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="with --together: trials still training after MINUTES checkpoint and stop; the same "
                        "command with --out DIR continues them")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE)
    p.add_argument("--generator", default=None,
                   help="an exported generator directory (from dpdmd distill); default: the recipe's teacher")


def _sample_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p, DEFAULT_RECIPE)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several; default: the eval prompts)")
    p.add_argument("--seeds", default="0-8", help="seeds, e.g. 0-8 or 1,5,9 (default: 0-8)")
    p.add_argument("--out", default=None, help="output directory (default: a new run directory)")
    p.add_argument("--generator", default=None,
                   help="an exported generator directory (from dpdmd distill); default: the recipe's teacher")


# The subcommands in the order `dpdmd --help` lists them: (name, help, adder of its own arguments, handler).
COMMANDS = [
    ("demo", "the embedded default end to end: teacher, evaluation, pictures", _demo_args, cmd_demo),
    ("config", "print the resolved config of a recipe plus overrides, after validation", _config_args, cmd_config),
    ("train-teacher", "train an embedded family's teacher (flow matching, CFG dropout)", _train_teacher_args,
     cmd_train_teacher),
    ("precompute", "teacher anchors and prompt embeddings into the Parquet trajectory store", _precompute_args,
     cmd_precompute),
    ("repair-store", "verify every shard of a trajectory store and recompute the ones that fail, with the config "
                     "the store keeps (the command store errors name)", _repair_store_args, cmd_repair_store),
    ("distill", "distil a few-step generator on Ray Train with DeepSpeed engines", _distill_args, cmd_distill),
    ("sweep", "Ray Tune over dotted keys (sweep.space); Pareto front of diversity and quality", _sweep_args,
     cmd_sweep),
    ("fidelity", "teacher, DMD and DP-DMD settings over several training seeds: the table with its spread",
     _fidelity_args, cmd_fidelity),
    ("evaluate", "diversity and quality of the teacher (or a generator) on held-out seeds", _evaluate_args,
     cmd_evaluate),
    ("sample", "sample prompts x seeds; writes a PNG grid and the raw arrays (.npz)", _sample_args, cmd_sample),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpdmd", description="Diversity-preserved distribution matching distillation on Ray.")
    parser.add_argument("--verbose", action="store_true",
                        help="show the log lines of Ray, its workers and the libraries too (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, func in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=func)
    return parser


# The project's progress lines ("[distill] generator update ...") and a known Ray line that says nothing to a user:
# an error-level warning about restart arguments of Ray's own actors (Ray Train's preemption watcher, Ray Data's
# map workers), printed once per trial and per precompute. These settings reach what workers print; the driver's
# own copy of the line (Ray Data's map workers, created by the precompute in this process) comes from Ray's C++
# logger straight to stderr, which only a log level for all of Ray's C++ errors would silence, so it stays
# (one line per precompute; a known Ray Data issue, ray-project/ray#57733).
OWN_LINE = r"^\[(demo|distill|fidelity|precompute|sweep|trials)\] "
RAY_NOISE = r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"


def quiet_console() -> None:
    """What Ray's driver does with the lines its workers print, set before ray is first imported (it reads these
    then; nothing the command has imported so far imports ray): each trial's progress line as printed (Ray would
    fold alike lines from two workers into one with a "[repeated 2x across cluster] (Ray deduplicates logs by
    default...)" note), and RAY_NOISE dropped; and Tune's legacy console reporter, which at verbose=0 prints
    nothing (the new one prints an experiment box and result paths even then); and MLflow's information lines
    (setting up its database on a run's first use, in this process or a trial's). A user's own settings win."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", OWN_LINE)
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def main(argv: list[str] | None = None) -> int:
    # The command's own process (and the trial processes it starts, which inherit it): busy-waiting OpenMP
    # threads slow small CPU models down many times over as soon as another process shares the cores (Ray
    # workers, a second job); passive waiting costs little when the cores are free. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_console()
    from orchestrator import cluster

    cluster.VERBOSE = args.verbose
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"dpdmd: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"dpdmd: {err}", file=sys.stderr)
        return 2
    except cluster.ClusterStartError as err:
        print(f"dpdmd: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from workers.store import StoreError  # imported only here: the store module loads torch and pyarrow

        if not isinstance(err, StoreError):
            raise
        print(f"dpdmd: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
