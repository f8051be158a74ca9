"""Finding, fetching, training and loading teachers. Embedded families train their own teacher with flow matching
and CFG dropout; the result lands in a directory named by its settings, written atomically. Pretrained
teachers come from a local directory, an s3:// URL (copied once into a local cache) or a hub id."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.adapter import LoadOptions, cast
from models.families import Family, get_family
from models.flow import interpolate
from models.losses import flow_matching_loss
from workers.config import BUILT_IN_PREFIX, ConfigError, RunConfig, teacher_location


def embedded_teacher_dir(config: RunConfig) -> Path:
    """<output_dir>/teachers/<family>-<hash of the training settings>: new settings, new teacher."""
    settings = json.dumps({"family": config.teacher.family, **asdict(config.teacher.train)}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    return Path(config.storage.output_dir) / "teachers" / f"{config.teacher.family}-{digest}"


def shipped_teacher(config: RunConfig) -> Path | None:
    """The family's teacher shipped in the repository, when it was trained with exactly these settings."""
    shipped = get_family(config.teacher.family).shipped_teacher
    if shipped is None or not (shipped / "training_log.json").is_file():
        return None
    log = json.loads((shipped / "training_log.json").read_text())
    same = log.get("family") == config.teacher.family and log.get("train") == asdict(config.teacher.train)
    return shipped if same else None


def teacher_dir(config: RunConfig) -> Path:
    """The local directory of the teacher: teacher.path (a hub id downloaded first); else the shipped
    teacher for these training settings; else the embedded one."""
    path = config.teacher.path
    if not path:
        return shipped_teacher(config) or embedded_teacher_dir(config)
    location = teacher_location(path)
    if location == "hub":
        return hub_snapshot(path)
    if location == "s3":
        return fetch_s3_teacher(config, path)
    if location == "builtin":
        return built_in_teacher(config, path.removeprefix(BUILT_IN_PREFIX))
    return Path(path)


FETCHED = ".dpdmd-fetched"  # written last into a complete copy (no .json suffix: outside the weights digest)


def teacher_cache(config: RunConfig) -> Path:
    return Path(config.storage.teacher_cache or Path(config.storage.output_dir) / "teacher_cache")


def fetch_s3_teacher(config: RunConfig, url: str) -> Path:
    """A local copy of the teacher at url (s3://bucket/prefix), fetched once through s3fs into
    <teacher_cache>/<name>-<hash of url>/ and reused by every later call on this machine (delete the
    folder to fetch again). Every file must arrive with its listed size; fill_once makes the copy complete or
    absent and shared by concurrent fetchers."""
    from workers.store import filesystem

    url = url.rstrip("/")
    target = teacher_cache(config) / f"{url.rsplit('/', 1)[-1]}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    if (target / FETCHED).is_file():
        return target
    fs, root = filesystem(config, url)
    listing = {path: info for path, info in fs.find(root, detail=True).items() if info.get("type") != "directory"}
    if not listing:
        raise FileNotFoundError(f"teacher.path {url} holds no files; upload the pipeline directory (e.g. "
                                f"`aws s3 sync DIR {url}`) or fix the URL"
                                + ("" if config.storage.s3_endpoint_url else
                                   " (for S3-compatible stores, set storage.s3_endpoint_url)"))

    def fetch(tmp: Path) -> dict:
        for path, info in tqdm(sorted(listing.items()), desc=f"fetch {url}", unit="file", mininterval=2.0):
            local = tmp / posixpath.relpath(path, root)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(local))
            if local.stat().st_size != info["size"]:
                raise OSError(f"{path}: fetched {local.stat().st_size} bytes, the listing says {info['size']}")
        return {"url": url, "files": len(listing)}

    return fill_once(target, fetch)


def fill_once(target: Path, fill: Callable[[Path], dict]) -> Path:
    """target, filled by fill(folder) in a temporary folder beside it and renamed into place with the FETCHED
    record (fill's dict) written last: a killed fill leaves nothing that looks complete, and concurrent fillers
    (precompute actors, training workers) end up sharing one copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        record = fill(tmp)
        (tmp / FETCHED).write_text(json.dumps(record))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not (target / FETCHED).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def built_in_teacher(config: RunConfig, name: str) -> Path:
    """<teacher_cache>/builtin-<name>/: the tiny pipeline of models/tiny_pipelines.py saved once (save_pretrained,
    seed 0: the same weights on every machine) and reused; concurrent builders share one copy (fill_once)."""
    from models.families.pretrained import quiet_loading

    target = teacher_cache(config) / f"builtin-{name}"
    if (target / FETCHED).is_file():
        return target

    def build(tmp: Path) -> dict:
        with quiet_loading():
            from models.tiny_pipelines import pipeline

            pipeline(name).save_pretrained(tmp)
        return {"built_in": name}

    return fill_once(target, build)


def hub_snapshot(repo_id: str) -> Path:
    """A hub model's local snapshot: downloaded once into the Hugging Face cache when online, read from it offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # offline, unknown repo, gated model: all end here with the hub's reason
        raise FileNotFoundError(f"teacher.path {repo_id!r} reads as a hub id, but it could not be fetched "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download it "
                                "where the hub is reachable (huggingface-cli download, or save_pretrained) and set "
                                "teacher.path to the directory or an s3:// copy of it") from None


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def require_teacher(config: RunConfig) -> Path:
    """The teacher's local directory, or an error that says how to get one (before any work starts). A pretrained
    family's directory must also be a pipeline of the class it loads (its model_index.json says which)."""
    from models.families.pretrained import read_model_index

    path = teacher_dir(config)
    if path.is_dir() and any(p.suffix in WEIGHT_SUFFIXES for p in path.rglob("*")):
        if get_family(config.teacher.family).pipeline_class:
            read_model_index(path, config.teacher.family)
        return path
    if not config.teacher.path:
        raise FileNotFoundError(
            f"no trained {config.teacher.family} teacher at {path}: train it first with `dpdmd train-teacher "
            f"--recipe RECIPE [overrides]`, using this command's recipe and overrides (or run `dpdmd demo`, "
            "which trains it)")
    raise ConfigError("teacher.path", f"{config.teacher.path} holds no weight files (*.safetensors, *.bin); point "
                                      "it at a pipeline directory written by save_pretrained or by `dpdmd "
                                      "train-teacher --out DIR`")


def load_teacher(config: RunConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 text_encoders: bool = True, vae: bool = False):
    """(adapter, net) of the configured teacher, in eval mode with frozen weights, net on device/dtype.

    text_encoders: load the prompt encoders (precompute, evaluation); training workers read embeddings
    from the trajectory store instead. vae: load the latent decoder (pictures and image metrics only)."""
    path = teacher_dir(config)
    if not path.is_dir():
        fix = ("train it with `dpdmd train-teacher --recipe ...` (same recipe and overrides)" if not config.teacher.path
               else "point teacher.path at a directory written by `dpdmd train-teacher` or save_pretrained")
        raise FileNotFoundError(f"no {config.teacher.family} teacher at {path}: {fix}")
    options = LoadOptions(text_encoders=text_encoders, vae=vae, resolution=config.teacher.resolution, dtype=dtype)
    # A wrong pipeline, resolution or shift: the family raises ConfigError naming the key.
    adapter, net = get_family(config.teacher.family).load_teacher(path, options)
    adapter.check_schedule(config.teacher.num_steps, config.teacher.shift)
    for module in (net, *adapter.trainable_modules()):
        module.eval().requires_grad_(False)
    cast(net.to(device), dtype)
    adapter.to(device)
    return adapter, net


def train_teacher(config: RunConfig, out_dir: Path | None = None, progress: bool = True,
                  device: str | torch.device = "cpu") -> Path:
    """Train the family's embedded teacher and save it (save_pretrained) to out_dir, atomically.

    Flow matching: t ~ U(0, 1), x_t = (1 - t) x0 + t eps, regress v on eps - x0; a cfg_dropout share of
    rows sees the empty prompt so the same network gives the unconditional velocity CFG needs.
    Random draws come from one CPU generator whatever the device, so a GPU run sees the same data.
    """
    found, train = get_family(config.teacher.family), config.teacher.train
    if found.trainer is None:
        raise ConfigError("teacher.family", f"{found.name} teachers are pretrained, not trained here: distil from one "
                                            f"with teacher.path set to a {found.pipeline_class} directory, an s3:// "
                                            "URL of one, or a hub id")
    out_dir = Path(out_dir) if out_dir is not None else embedded_teacher_dir(config)
    adapter, net = found.trainer.new_teacher(train.width, train.seed)
    modules = [net, *adapter.trainable_modules()]
    parameters = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.to(device).train()
    optimizer = torch.optim.AdamW(parameters, lr=train.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.steps, eta_min=train.lr * 0.05)
    generator = torch.Generator().manual_seed(train.seed)
    losses: list[float] = []
    start = time.time()
    bar = tqdm(range(train.steps), desc=f"train {config.teacher.family} teacher", disable=not progress,
               mininterval=2.0)
    for step in bar:
        x0, prompts = found.trainer.training_batch(train.batch_size, generator)
        x0 = x0.to(device)
        drop = torch.rand(train.batch_size, generator=generator) < train.cfg_dropout
        cond = adapter.encode_prompts(prompts).where(drop, adapter.negative_conditioning(train.batch_size))
        t = torch.rand(train.batch_size, generator=generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        out = flow_matching_loss(adapter.velocity(net, interpolate(x0, eps, t), t, cond), x0, eps, name="teacher")
        out.raise_if_nonfinite(where=f"teacher training step {step}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(out.loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    for m in modules:
        m.cpu()
    _save_atomically(found, adapter, net, out_dir, {"family": config.teacher.family, "train": asdict(train),
                                   "seconds": round(time.time() - start, 1), "losses": losses})
    return out_dir


def _save_atomically(found: Family, adapter, net, out_dir: Path, log: dict) -> None:
    """Write into a sibling temp dir, then rename: a killed run never leaves a half-written teacher."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        found.save_teacher(adapter, net, tmp)
        (tmp / "training_log.json").write_text(json.dumps(log))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
