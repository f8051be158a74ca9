"""The shapes teacher: a small diffusers UNet2DConditionModel on pixels (3, 32, 32) in [-1, 1], with
cross-attention on the prompt embeddings of a small word-level text encoder that the adapter owns and that
trains jointly with it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.adapter import Conditioning, LoadOptions, TeacherAdapter, check_native_resolution
from models.families.shapes.domain import COLOURS, RESOLUTION, SHAPES

NAME = "shapes"
PAD, BOS = "<pad>", "<bos>"
VOCABULARY = (PAD, BOS, "a", *COLOURS, *SHAPES)


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """Word tokens -> prompt embeddings: a token and position embedding and a small pre-norm transformer.

    Every sequence starts with <bos> and is padded to max_length with <pad> (no attention mask: the pad
    token is learned like any other, so the empty prompt "" is the sequence <bos> <pad> ... and gets a
    well-defined embedding). Returns the sequence (B, L, dim) and the <bos> output as the pooled (B, dim).
    """

    @register_to_config
    def __init__(self, vocabulary: tuple[str, ...] = VOCABULARY, max_length: int = 6, dim: int = 64,
                 num_layers: int = 2, num_heads: int = 4):
        super().__init__()
        self.token_embed = nn.Embedding(len(vocabulary), dim)
        self.position_embed = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self._index = {word: i for i, word in enumerate(vocabulary)}

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length) on the encoder's device."""
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self._index or w in (PAD, BOS)]
            if unknown:
                raise ValueError(f"unknown words {unknown} in prompt {prompt!r}; the shapes vocabulary is "
                                 f"{[w for w in self.config.vocabulary if w not in (PAD, BOS)]}")
            if len(words) + 1 > self.config.max_length:
                raise ValueError(f"prompt {prompt!r} is longer than {self.config.max_length - 1} words")
            ids = [self._index[BOS]] + [self._index[w] for w in words]
            rows.append(ids + [self._index[PAD]] * (self.config.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.position_embed.device).reshape(-1,
                                                                                              self.config.max_length)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.token_embed(token_ids) + self.position_embed
        h = self.norm(self.encoder(h))
        return h, h[:, 0]


def build_unet(width: int, text_dim: int = 64) -> UNet2DConditionModel:
    """The denoiser: three levels (32, 16, 8 px) of width, 2 width, 2 width channels; cross-attention on
    the prompt sequence at 16 and 8 px, and the pooled prompt added to the time embedding."""
    groups = math.gcd(width, 8)
    return UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3,
        block_out_channels=(width, 2 * width, 2 * width), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=groups,
        class_embed_type="projection", projection_class_embeddings_input_dim=text_dim)


class ShapesAdapter(TeacherAdapter):
    """Pixel-space flow on (3, 32, 32). Conditioning: {"prompt_embeds": (B, L, D), "pooled_projections":
    (B, D)} from the adapter's own text encoder, so that generator and critic (copies of the net alone)
    share the teacher's prompt embeddings. t in [0, 1] goes to the UNet as the timestep 1000 t."""

    family = NAME

    def __init__(self, text_encoder: ShapesTextEncoder):
        self.text_encoder = text_encoder

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (3, RESOLUTION, RESOLUTION)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        sequence, pooled = self.text_encoder(self.text_encoder.tokenize(prompts))
        return Conditioning({"prompt_embeds": sequence, "pooled_projections": pooled})

    def network_velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return net(x_t, t * 1000, encoder_hidden_states=cond.tensors["prompt_embeds"],
                   class_labels=cond.tensors["pooled_projections"]).sample

    def trainable_modules(self) -> list[nn.Module]:
        return [self.text_encoder]

    def regression_distance(self, device: torch.device, options=None) -> nn.Module:
        """LPIPS's form on fixed random features (models/perceptual.py), not the evaluator the table measures with."""
        from models.perceptual import RandomFeatureDistance

        if getattr(self, "_distance", None) is None or self._distance.stages[0][0].weight.device != device:
            self._distance = RandomFeatureDistance().to(device)
        return self._distance


def new_teacher(width: int, seed: int) -> tuple[ShapesAdapter, UNet2DConditionModel]:
    """A freshly initialised (adapter, net): the text encoder (the adapter's) and the UNet train together."""
    torch.manual_seed(seed)
    text_encoder = ShapesTextEncoder()
    net = build_unet(width, text_encoder.config.dim)
    return ShapesAdapter(text_encoder), net


def save_teacher(adapter: ShapesAdapter, net: UNet2DConditionModel, path: str | Path) -> None:
    """<path>/unet and <path>/text_encoder, each a save_pretrained directory (safetensors + config.json)."""
    net.save_pretrained(str(Path(path) / "unet"))
    adapter.text_encoder.save_pretrained(str(Path(path) / "text_encoder"))


def load_teacher(path: str | Path, options: LoadOptions = LoadOptions()) -> tuple[ShapesAdapter, UNet2DConditionModel]:
    """The text encoder is part of the teacher (it trained with it), so it loads whatever options say."""
    check_native_resolution(options, RESOLUTION, NAME)
    path = Path(path)
    if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
        raise FileNotFoundError(f"{path} is not a shapes teacher: it needs unet/ and text_encoder/ "
                                "subfolders as written by save_teacher (models.families.shapes.teacher)")
    net = UNet2DConditionModel.from_pretrained(str(path / "unet"), low_cpu_mem_usage=False)
    text_encoder = ShapesTextEncoder.from_pretrained(str(path / "text_encoder"), low_cpu_mem_usage=False)
    return ShapesAdapter(text_encoder), net
