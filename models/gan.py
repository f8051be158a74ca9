"""The dmd-gan baseline's critic (DMD2's): the critic network with a small classifier head on the features of one
of its inner blocks, trained with the critic to tell the teacher's samples from the generator's, both noised.

    critic = CriticWithHead(net)                     # net: a trainable copy of the teacher
    critic.classify = True                           # the next call also keeps the head's logits (B,)
    v = adapter.velocity(critic, x_t, t, cond); logits = critic.take_logits()

The critic's velocity is the network's, unchanged: the DMD loss reads the same critic with or without a head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_SEED = 0  # the head starts alike in every run, as the critic does (a copy of the teacher): seeds vary the noise


def feature_site(net: nn.Module) -> tuple[str, str, int]:
    """Where the head reads a network's features: (submodule name, kind, channels). UNets (shapes, SDXL): the
    middle block, (B, C, H, W), the bottleneck DMD2 uses; SD3 transformers: the middle joint block's image tokens,
    (B, L, D); the toy2d MLP: its middle residual block, (B, D)."""
    config = getattr(net, "config", None)
    if hasattr(net, "mid_block") and config is not None and "block_out_channels" in config:
        return "mid_block", "map", int(config.block_out_channels[-1])
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is not None and config is not None:
        return f"transformer_blocks.{len(blocks) // 2}", "tokens", int(config.num_attention_heads * config.attention_head_dim)
    blocks = getattr(net, "blocks", None)
    if blocks is not None and config is not None and "hidden" in config:
        return f"blocks.{len(blocks) // 2}", "vector", int(config.hidden)
    raise ValueError(f"no feature site known for {type(net).__name__}: the GAN head reads a UNet's mid_block, an SD3 "
                     "transformer's blocks or the toy2d MLP's blocks")


class FeatureHead(nn.Module):
    """Features -> one logit per row (B,): a 3x3 convolution, GroupNorm and SiLU then the spatial mean (maps), or
    LayerNorm, a linear layer and SiLU then the token mean (tokens, vectors), and a last linear layer."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind = kind
        if kind == "map":
            self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                      nn.GroupNorm(math.gcd(channels, 32), channels), nn.SiLU())
        else:
            self.body = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.SiLU())
        self.out = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.body(features.to(self.out.weight.dtype))
        if self.kind == "map":
            h = h.mean(dim=(2, 3))
        elif self.kind == "tokens":
            h = h.mean(dim=1)
        return self.out(h).squeeze(-1)


def _last_tensor(output) -> torch.Tensor:
    """A block's output as a tensor: SD3's joint blocks return (context tokens, image tokens)."""
    if isinstance(output, torch.Tensor):
        return output
    return [o for o in output if isinstance(o, torch.Tensor)][-1]


class CriticWithHead(nn.Module):
    """The critic network and its classifier head, one module (one engine, one optimizer, one checkpoint); the
    head is initialised from HEAD_SEED, not from the global RNG.

    Called like the network. With classify set, the call also runs the head on the feature site's output and keeps
    the logits for take_logits(). The hook that reads the site is registered once, before any compile (whether
    torch.compile sees hooks added to a module it compiled depends on its hook guards), and keeps nothing unless
    classify is set. Under torch.func
    (trials trained together) the head's parameters are swapped in with the network's."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.site, kind, channels = feature_site(net)
        weight = next(net.parameters())
        with torch.random.fork_rng(devices=[]):  # the same head for every run and trial, whatever its seed
            torch.manual_seed(HEAD_SEED)
            self.head = FeatureHead(kind, channels).to(weight.device, weight.dtype)
        self.classify = False
        self._kept: dict[str, torch.Tensor] = {}
        self.net.get_submodule(self.site).register_forward_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, inputs, output) -> None:
        if self.classify:
            self._kept["features"] = _last_tensor(output)

    def forward(self, *args, **kwargs):
        out = self.net(*args, **kwargs)
        if self.classify:
            features = self._kept.pop("features", None)
            if features is None:
                raise RuntimeError(f"the critic's call did not pass its feature site {self.site!r}")
            self._kept["logits"] = self.head(features)
        return out

    def take_logits(self) -> torch.Tensor:
        """The logits (B,) of the last call with classify set; once."""
        logits = self._kept.pop("logits", None)
        if logits is None:
            raise RuntimeError("no logits kept: set classify before calling the critic")
        return logits
