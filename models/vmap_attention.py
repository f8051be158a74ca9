"""Fused attention for networks called under torch.func.vmap (trials trained together, workers/trials.py).

PyTorch's fused scaled-dot-product attention kernels have no vmap batching rule: under vmap they run once per
vmapped slice (once per trial). FoldedAttention gives them one: the vmapped dim is folded into the batch dim, the
fused kernel runs once for every trial, and the result is unfolded. Its backward is the fused kernel's own, which
autograd records inside the rule. Outside vmap it is plain scaled_dot_product_attention.

FoldedAttnProcessor is diffusers' AttnProcessor2_0 with that one call changed; the rest of its body is diffusers'
(the same steps for the UNets of the shapes domain and SDXL), written out because the processor calls
F.scaled_dot_product_attention from its own module and offers no way to pass another function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FoldedAttention(torch.autograd.Function):
    """scaled_dot_product_attention(q, k, v, attn_mask) with a vmap rule that folds the vmapped dim into the batch."""

    @staticmethod
    def forward(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):  # never reached: attention() calls the Function under vmap only
        raise RuntimeError("FoldedAttention is differentiated through its vmap rule only")

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask):
        n = info.batch_size

        def front(x, dim):
            if x is None:
                return None
            return x.movedim(dim, 0) if dim is not None else x.expand(n, *x.shape)

        q, k, v, mask = (front(x, d) for x, d in zip((q, k, v, mask), in_dims))
        if mask is not None:  # broadcast to (n, ..., L, S) as sdpa would broadcast each slice's mask
            mask = mask.reshape(n, *(1,) * (q.ndim - mask.ndim), *mask.shape[1:])
            mask = mask.expand(*q.shape[:-1], k.shape[-2])
        fold = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])  # noqa: E731
        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=fold(mask))
        return out.reshape(n, -1, *out.shape[1:]), 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention, once for all vmapped slices when called under vmap."""
    if torch._C._functorch.is_batchedtensor(q):
        return FoldedAttention.apply(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FoldedAttnProcessor:
    """diffusers' AttnProcessor2_0, its fused attention called through attention() above."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = attention(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
