"""STDiT3, the Open-Sora v1.2 video transformer (``hpcai-tech/OpenSora-STDiT-v3``), written for vpo.

Follows hpcaitech/Open-Sora v1.2.0 (``opensora/models/stdit/stdit3.py``): pairs of blocks, one attending over the
tokens of a frame (spatial) and one over the frames of a token position (temporal, with rotary positions), each
followed by cross-attention to the T5 caption and an MLP, modulated by adaLN-single (a per-block
``scale_shift_table`` plus one projection of the timestep+fps embedding). Module names are the original's, so the
published ``model.safetensors`` loads as it is and a LoRA adapter saved here names the original's layers.

Departures, all without effect on the published model's outputs: attention runs through PyTorch's
``scaled_dot_product_attention`` (xformers / flash-attn are not needed; cross-attention masks padded caption tokens
per row instead of packing the batch into one block-diagonal sequence), the training-time caption dropout, drop
path, sequence parallelism and frame-mask conditioning (``x_mask``, image/video continuation) are left out.

Tensors: ``x`` latents ``[B, C, T, H, W]``; ``caption`` T5 features ``[B, L, caption_channels]`` with ``mask``
``[B, L]`` (1 = real token); ``timestep`` in [0, 1000] (1000 = pure noise); ``fps``/``height``/``width`` ``[B]``.
The output has ``2C`` channels when ``pred_sigma`` (only the first C, the velocity, are used), in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .loading import load_strict, read_config, read_weights, resolve_directory

LAYOUT = ("a directory (or hub id such as 'hpcai-tech/OpenSora-STDiT-v3') with config.json (model_type 'STDiT3') "
          "and model.safetensors in Open-Sora's key names (spatial_blocks.N.attn.qkv.weight, "
          "y_embedder.y_embedding, ...)")


@dataclass
class STDiT3Config:
    """The keys of the published ``config.json`` this port reads (the others are training switches)."""

    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pred_sigma: bool = True
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    input_sq_size: int = 512
    skip_y_embedder: bool = False

    @classmethod
    def from_dict(cls, values: dict) -> "STDiT3Config":
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.patch_size = tuple(config.patch_size)
        return config

    def to_dict(self) -> dict:
        return {"model_type": "STDiT3", "architectures": ["STDiT3"],
                **{f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}}

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels


# ----------------------------------------------------------------------------------------------- layers
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sinusoidal_embedding(values: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT timestep features: ``[cos(v f), sin(v f)]`` with ``f_i = max_period^(-i / (dim/2))``, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """qk-norm over the head dim (T5 / Llama RMSNorm), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Mlp(nn.Module):
    """timm's ``Mlp`` layout (``fc1``, tanh-GELU, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EmbeddingMlp(nn.Module):
    """Sinusoidal features of a scalar per row -> ``hidden_size`` (the timestep and the fps embedders)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(values, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to ``hidden_size``. ``y_embedding`` is the learned null caption (in T5 feature space)
    that classifier-free guidance uses as the unconditional input."""

    def __init__(self, caption_channels: int, hidden_size: int, tokens: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(tokens, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class RotaryPositions(nn.Module):
    """Rotary embedding of frame positions in the temporal blocks (``rotary-embedding-torch`` 0.5.3 semantics:
    interleaved pairs, frequencies ``10000^(-2i/d)``). ``freqs`` is stored in the checkpoint as ``rope.freqs``."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., T, head_dim]
        positions = torch.arange(x.shape[-2], device=x.device, dtype=self.freqs.dtype)
        angles = (positions[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, rope: RotaryPositions | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # A plain attribute, not a submodule: the rotary table is registered once, as ``rope`` on the model.
        self.__dict__["rope"] = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class CrossAttention(nn.Module):
    """Video tokens attend to the caption tokens of their own row; padded caption tokens are masked."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, caption: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q = self.q_linear(x).view(batch, length, self.heads, -1).transpose(1, 2)
        k, v = self.kv_linear(caption).view(batch, caption.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool())
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class STDiT3Block(nn.Module):
    def __init__(self, config: STDiT3Config, rope: RotaryPositions | None = None):
        super().__init__()
        dim = config.hidden_size
        self.temporal = rope is not None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(dim, config.num_heads, config.qk_norm, rope)
        self.cross_attn = CrossAttention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, caption, mask, t_mlp, frames: int, tokens: int):
        batch, _, dim = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mlp.reshape(batch, 6, -1)).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa).view(batch, frames, tokens, dim)
        if self.temporal:  # attend over frames, one sequence per token position
            h = self.attn(h.transpose(1, 2).reshape(batch * tokens, frames, dim))
            h = h.view(batch, tokens, frames, dim).transpose(1, 2)
        else:  # attend over the tokens of each frame
            h = self.attn(h.reshape(batch * frames, tokens, dim))
        x = x + gate_msa * h.reshape(batch, frames * tokens, dim)
        x = x + self.cross_attn(x, caption, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_volume * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad T, H, W at the end up to multiples of the patch (Open-Sora's odd latent sizes, e.g. 240x426 -> 30x53).
        pads = [(-size) % patch for size, patch in zip(x.shape[2:], self.patch_size)]
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T*H*W patches, dim]


# ----------------------------------------------------------------------------------------------- model
class STDiT3(nn.Module):
    _no_split_modules = ["STDiT3Block"]  # FSDP2 shards block by block (the attribute diffusers models declare)

    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        dim, patch = config.hidden_size, config.patch_size
        self.rope = RotaryPositions(dim // config.num_heads)
        self.x_embedder = PatchEmbed3D(patch, config.in_channels, dim)
        self.t_embedder = EmbeddingMlp(dim)
        self.fps_embedder = EmbeddingMlp(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(config.caption_channels, dim, config.model_max_length)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(config) for _ in range(config.depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(config, self.rope) for _ in range(config.depth))
        self.final_layer = FinalLayer(dim, math.prod(patch), config.out_channels)
        self.gradient_checkpointing = False

    # gradient checkpointing per block (the names diffusers models use, so the policy treats both alike)
    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def null_caption(self, rows: int) -> torch.Tensor:
        """The learned unconditional caption ``[rows, L, caption_channels]`` for classifier-free guidance."""
        return self.y_embedder.y_embedding[None].expand(rows, -1, -1)

    def position_embedding(self, height: int, width: int, scale: float, device, dtype) -> torch.Tensor:
        """2-D sin-cos positions of the ``height x width`` patch grid, squeezed to the grid side ``base`` (so every
        aspect ratio spans the same range) and divided by ``scale`` = sqrt(pixel area) / 512. As in the original,
        the first half of the channels encodes the column (width) index and the second half the row index."""
        base = round((height * width) ** 0.5)
        rows = torch.arange(height, device=device) / scale * (base / height)
        cols = torch.arange(width, device=device) / scale * (base / width)
        quarter = self.config.hidden_size // 4
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 2 * quarter, 2, device=device).float() / (2 * quarter)))

        def sincos(positions):
            angles = positions[:, None] * inv_freq[None]
            return torch.cat([angles.sin(), angles.cos()], dim=-1)

        col_emb = sincos(cols).repeat(height, 1)  # token order: row-major over (row, col)
        row_emb = sincos(rows).repeat_interleave(width, dim=0)
        return torch.cat([col_emb, row_emb], dim=-1).to(dtype)

    def forward(self, x, timestep, caption, mask, fps, height, width) -> torch.Tensor:
        dtype = self.dtype
        batch, _, frames_in, height_in, width_in = x.shape
        # Like the original, the timestep is rounded to the weights' dtype first (bf16: 456.09 -> 456).
        x, caption, timestep = x.to(dtype), caption.to(dtype), timestep.to(dtype)
        pt, ph, pw = self.config.patch_size
        frames, rows, cols = -(-frames_in // pt), -(-height_in // ph), -(-width_in // pw)
        tokens = rows * cols

        # Position scale from the requested pixel size of the first row (the whole batch shares one size).
        scale = float(height[0]) * float(width[0])
        positions = self.position_embedding(rows, cols, scale**0.5 / self.config.input_sq_size, x.device, dtype)
        t = self.t_embedder(timestep) + self.fps_embedder(fps)
        t_mlp = self.t_block(t)
        caption = self.y_embedder(caption)

        h = self.x_embedder(x).view(batch, frames, tokens, -1) + positions
        h = h.view(batch, frames * tokens, -1)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            for block in (spatial, temporal):
                args = (h, caption, mask, t_mlp, frames, tokens)
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    h = checkpoint(block, *args, use_reentrant=False)
                else:
                    h = block(*args)
        h = self.final_layer(h, t)
        out = h.view(batch, frames, rows, cols, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(batch, -1, frames * pt, rows * ph, cols * pw)
        return out[:, :, :frames_in, :height_in, :width_in].float()

    # ------------------------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype = torch.float32) -> "STDiT3":
        """Load ``hpcai-tech/OpenSora-STDiT-v3`` (or a directory in the same layout)."""
        directory = resolve_directory(name, "STDiT3 transformer", LAYOUT)
        config = STDiT3Config.from_dict(read_config(directory, "STDiT3 transformer", LAYOUT, "STDiT3"))
        if config.skip_y_embedder:
            from vpo_core import VpoError

            raise VpoError(f"{directory / 'config.json'}: skip_y_embedder=true models take pre-projected captions; "
                           "vpo needs the caption embedder (the published STDiT-v3 has it).")
        model = cls(config)
        state = read_weights(directory, "STDiT3 transformer", LAYOUT)
        load_strict(model, state, "STDiT3 transformer", directory, LAYOUT, optional=("rope.freqs",))
        return model.to(dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` in the published layout (what ``from_pretrained`` reads)."""
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / "model.safetensors"))
