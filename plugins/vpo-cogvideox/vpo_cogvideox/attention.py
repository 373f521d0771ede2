"""Optional xformers attention for CogVideoX (CUDA only, ``pip install vpo-cogvideox[cuda]``).

diffusers' ``enable_xformers_memory_efficient_attention()`` installs a generic processor that drops
CogVideoX's joint text+video attention and rotary embeddings, so it must not be used here. This processor
is ``CogVideoXAttnProcessor2_0`` with only the attention kernel swapped for xformers'.
"""

from __future__ import annotations

import torch
from vpo_core import VpoError


class CogVideoXXFormersAttnProcessor:
    """Joint text+video attention of a CogVideoX block, computed with ``xformers.ops.memory_efficient_attention``."""

    def __init__(self):
        try:
            import xformers.ops
        except ImportError as error:
            raise VpoError(
                "attention: xformers was asked for but xformers is not importable; install the CUDA extra "
                "(pip install 'vpo-cogvideox[cuda]') or use attention: sdpa."
            ) from error
        self._attention = xformers.ops.memory_efficient_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise VpoError("the xformers CogVideoX processor does not support attention masks")
        text_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, length, _ = hidden_states.shape

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, length, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only (CogVideoX-5b)
            video_query = apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)
            query = torch.cat([query[:, :, :text_length], video_query], dim=2)
            if not attn.is_cross_attention:
                video_key = apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)
                key = torch.cat([key[:, :, :text_length], video_key], dim=2)

        # xformers takes [batch, length, heads, head_dim]
        query, key, value = (x.transpose(1, 2).contiguous() for x in (query, key, value))
        hidden_states = self._attention(query, key, value).reshape(batch, length, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split([text_length, length - text_length], dim=1)
        return hidden_states, encoder_hidden_states


def use_xformers(transformer: torch.nn.Module) -> None:
    """Install the xformers processor in every attention layer of a CogVideoX transformer."""
    transformer.set_attn_processor(CogVideoXXFormersAttnProcessor())
