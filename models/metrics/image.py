"""The paper's image metrics, computed by external models whose weights the user gives as local paths:
DINO and CLIP feature diversity, PickScore and ImageReward (docs/method.md, Evaluation).

Nothing is downloaded: each path is a directory that transformers' from_pretrained reads (DINOv2/v3 and
CLIP image models with their image processors; PickScore is a CLIP model with its processor), or, for
ImageReward, a checkpoint file for the `image-reward` package (installed separately).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.metrics import pairwise_diversity


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images, what every processor below takes."""
    from PIL import Image

    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p) for p in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def _require_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} weights not found at {path}: give a local directory that "
                                "from_pretrained reads (download it where the hub is reachable)")
    return folder


@dataclass
class FeatureModel:
    """Image features for the diversity metric: the pooled output of an image model (DINO's pooled CLS,
    CLIP's post-layernorm CLS token), L2-normalised by pairwise_diversity."""

    name: str
    model: torch.nn.Module
    processor: object

    @classmethod
    def load(cls, name: str, path: str, device: torch.device | str = "cpu") -> FeatureModel:
        from transformers import AutoImageProcessor, AutoModel, CLIPModel

        folder = _require_dir(path, name)
        model = AutoModel.from_pretrained(folder)
        if isinstance(model, CLIPModel):  # a full CLIP checkpoint: its image tower is what diversity reads
            model = model.vision_model
        return cls(name, model.eval().to(device), AutoImageProcessor.from_pretrained(folder))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for chunk in images.split(batch_size):
            inputs = self.processor(images=to_pil(chunk), return_tensors="pt").to(device)
            out.append(self.model(**inputs).pooler_output.float().cpu())
        return torch.cat(out)

    def diversity(self, images: torch.Tensor, prompts: list[str]) -> float:
        rows = list(dict.fromkeys(prompts))
        return float(pairwise_diversity(self.features(images).reshape(len(rows), len(prompts) // len(rows), -1)))


@dataclass
class PickScore:
    """PickScore (a CLIP model fine-tuned on Pick-a-Pic): logit_scale * cos(image, prompt), per image."""

    model: torch.nn.Module
    processor: object

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> PickScore:
        from transformers import AutoProcessor, CLIPModel

        folder = _require_dir(path, "PickScore")
        return cls(CLIPModel.from_pretrained(folder).eval().to(device), AutoProcessor.from_pretrained(folder))

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk, texts = images[start:start + batch_size], prompts[start:start + batch_size]
            image_inputs = self.processor(images=to_pil(chunk), return_tensors="pt").to(device)
            text_inputs = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(device)
            image = torch.nn.functional.normalize(_embeds(self.model.get_image_features(**image_inputs)), dim=-1)
            text = torch.nn.functional.normalize(_embeds(self.model.get_text_features(**text_inputs)), dim=-1)
            out.append((self.model.logit_scale.exp() * (image * text).sum(-1)).float().cpu())
        return torch.cat(out)


def _embeds(out) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as pooler_output of an output object; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_reward_scores(path: str, images: torch.Tensor, prompts: list[str], device="cpu") -> torch.Tensor:
    """ImageReward through its own package (pip install image-reward), from a local checkpoint file."""
    try:
        import ImageReward
    except ImportError:
        raise ImportError("evaluation.imagereward_path is set but the image-reward package is not installed; "
                          "pip install image-reward, or leave evaluation.imagereward_path empty") from None
    if not Path(path).is_file():
        raise FileNotFoundError(f"ImageReward checkpoint not found at {path}: give the ImageReward.pt file")
    model = ImageReward.load(path, device=device)
    return torch.tensor([float(model.score(p, [img])) for p, img in zip(prompts, to_pil(images))])


def external_metrics(images: torch.Tensor, prompts: list[str], dino_path: str = "", clip_path: str = "",
                     pickscore_path: str = "", imagereward_path: str = "", device="cpu") -> dict[str, float]:
    """Every metric whose weights are given, on images (B, 3, H, W) in [-1, 1], prompt-major with R seeds a
    prompt: dino_diversity, clip_diversity (1 - mean pairwise cosine, averaged over prompts), pickscore and
    imagereward (means over images)."""
    metrics: dict[str, float] = {}
    for name, path in (("dino", dino_path), ("clip", clip_path)):
        if path:
            metrics[f"{name}_diversity"] = FeatureModel.load(name, path, device).diversity(images, prompts)
    if pickscore_path:
        metrics["pickscore"] = float(PickScore.load(pickscore_path, device).scores(images, prompts).mean())
    if imagereward_path:
        metrics["imagereward"] = float(image_reward_scores(imagereward_path, images, prompts, device).mean())
    return metrics
