"""LVDM's 3D UNet, as VideoCrafter2 configures it (``model.diffusion_model`` of ``VideoCrafter/VideoCrafter2``).

Written for vpo from AILab-CVC/VideoCrafter's ``lvdm/modules/networks/openaimodel3d.py`` and
``lvdm/modules/attention.py`` with ``configs/inference_t2v_512_v2.0.yaml``: an SD-style 2D UNet (ResBlocks, linear
spatial transformers with cross-attention to the text) whose ResBlocks end in a temporal convolution block and whose
spatial transformers are followed by a temporal transformer (self-attention along time only); one extra temporal
transformer (``init_attn``, Conv1d projections) after the input convolution; the fps is embedded like the timestep
(sinusoidal, cos first) through its own MLP and added to the time embedding.

Parameter names are the original ones, the upstream typo ``temopral_conv`` included, so the
``model.diffusion_model.*`` entries of ``model.ckpt`` load without renaming. The UNet takes LVDM's layout
``[B, C, T, H, W]``; inside, frames are folded into the batch (``[B*T, C, H, W]``) except in the temporal layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    """VideoCrafter2's values by default; ``from_state_dict`` reads them from a checkpoint's shapes."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors with attention
    num_head_channels: int = 64
    transformer_depth: int = 1
    temporal_transformer_depth: int = 1
    context_dim: int = 1024
    temporal_conv: bool = True
    temporal_attention: bool = True
    addition_attention: bool = True  # init_attn
    fps_cond: bool = True
    temporal_conv_dropout: float = 0.1  # LVDM hard-codes 0.1 in its TemporalConvBlock (active in train mode)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides) -> "UNetConfig":
        """The configuration of the UNet whose weights are ``sd`` (keys without ``model.diffusion_model.``).
        Raises ``ValueError`` naming what does not fit VideoCrafter2's architecture."""
        if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
            raise ValueError("no input_blocks.0.0.weight / out.2.weight: not an LVDM UNet")
        model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
        levels, attention, ds, i = [[]], set(), 1, 1
        while any(k.startswith(f"input_blocks.{i}.") for k in sd):
            if f"input_blocks.{i}.0.op.weight" in sd:  # Downsample: next level
                levels.append([])
                ds *= 2
            else:
                levels[-1].append(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // model_channels)
                if f"input_blocks.{i}.1.proj_in.weight" in sd:
                    attention.add(ds)
            i += 1
        if len({len(level) for level in levels}) != 1 or any(len(set(level)) != 1 for level in levels):
            raise ValueError(f"irregular input blocks (channel multipliers per level: {levels})")
        block = f"input_blocks.{next(j for j in range(1, i) if f'input_blocks.{j}.1.proj_in.weight' in sd)}"
        if sd[f"{block}.1.proj_in.weight"].dim() != 2:
            raise ValueError("spatial transformers with Conv2d projections (use_linear: false), not VideoCrafter2's")
        if any("relative_position" in k for k in sd):
            raise ValueError("temporal attention with relative positions (VideoCrafter1), not VideoCrafter2's")
        temporal_attention = f"{block}.2.norm.weight" in sd
        if temporal_attention:
            inner = sd[f"{block}.2.transformer_blocks.0.attn2.to_q.weight"].shape[0]
            if sd[f"{block}.2.transformer_blocks.0.attn2.to_k.weight"].shape[1] != inner:
                raise ValueError("temporal transformers attend to the text (temporal_selfatt_only: false)")
        addition_attention = "init_attn.0.norm.weight" in sd

        def depth(prefix):
            return len({m.group(1) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))})

        values = dict(
            in_channels=in_channels, out_channels=sd["out.2.weight"].shape[0], model_channels=model_channels,
            channel_mult=tuple(level[0] for level in levels), num_res_blocks=len(levels[0]),
            attention_resolutions=tuple(sorted(attention, reverse=True)),
            # init_attn has 8 heads of num_head_channels; without it VideoCrafter2's 64 is assumed
            num_head_channels=sd["init_attn.0.proj_in.weight"].shape[0] // 8 if addition_attention else 64,
            transformer_depth=depth(f"{block}.1.transformer_blocks"),
            temporal_transformer_depth=depth(f"{block}.2.transformer_blocks") if temporal_attention else 1,
            context_dim=sd[f"{block}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            temporal_conv=any(".temopral_conv." in k for k in sd), temporal_attention=temporal_attention,
            addition_attention=addition_attention, fps_cond="fps_embedding.0.weight" in sd,
        )
        return cls(**(values | overrides))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LVDM's sinusoidal embedding ``[cos(t f), sin(t f)]`` (cos first), f = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


class GroupNorm32(nn.GroupNorm):
    """LVDM's ``normalization()``: 32 groups, computed in float32 whatever the weights' dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention of ``x`` to ``context`` (to ``x`` itself without one); q/k/v without bias."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # to_out.0 as in the checkpoint (dropout 0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))  # net.1: dropout 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, attention to the context (a second self-attention without one), GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Attention over the H*W positions of each frame, with cross-attention to the text (linear projections)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, dim_head, context_dim)
                                                for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # x [B*T, C, H, W]
        n, c, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            y = block(y, context)
        return self.proj_out(y).transpose(1, 2).reshape(n, c, h, w) + x


class TemporalTransformer(nn.Module):
    """Self-attention along time at every spatial position (VideoCrafter2: self-attention only, no relative
    positions, not causal). ``linear=False`` is ``init_attn``'s form, whose projections are 1x1 Conv1d."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, linear: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, dim_head) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv1d(inner, channels, 1)

    @staticmethod
    def _project(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:  # y [N, T, C]
        return layer(y) if isinstance(layer, nn.Linear) else layer(y.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:  # x [B*T, C, H, W]
        bt, c, h, w = x.shape
        t = bt // batch
        video = x.view(batch, t, c, h, w).transpose(1, 2)  # [B, C, T, H, W]: the norm's statistics span time
        y = self.norm(video).permute(0, 3, 4, 2, 1).reshape(batch * h * w, t, c)
        y = self._project(self.proj_in, y)
        for block in self.transformer_blocks:
            y = block(y)
        y = self._project(self.proj_out, y).reshape(batch, h, w, t, c).permute(0, 3, 4, 1, 2)
        return x + y.reshape(bt, c, h, w)


# ----------------------------------------------------------------------------------------------- convolutions
class TemporalConvBlock(nn.Module):
    """Four (GroupNorm, SiLU, [dropout], Conv3d 3x1x1) layers along time, with a residual (from ModelScope)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()

        def layer(with_dropout: bool) -> nn.Sequential:
            dropout_layer = [nn.Dropout(dropout)] if with_dropout else []
            return nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), *dropout_layer,
                                 nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = layer(False), layer(True), layer(True), layer(True)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:  # x [B*T, C, H, W]
        bt, c, h, w = x.shape
        video = x.view(batch, bt // batch, c, h, w).transpose(1, 2)
        y = self.conv4(self.conv3(self.conv2(self.conv1(video)))) + video
        return y.transpose(1, 2).reshape(bt, c, h, w)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, temporal_conv: bool, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Identity(),  # out_layers.2: dropout 0
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, dropout)  # sic: the checkpoint's name

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch: int) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).to(x.dtype)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        return self.temopral_conv(h, batch) if hasattr(self, "temopral_conv") else h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.Sequential):
    """LVDM's TimestepEmbedSequential: gives each layer what it needs (time embedding, text, batch size)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, batch: int) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = layer(x, batch)
            else:
                x = layer(x)
        return x


def _in_mode(block: Block, training: bool, *args) -> torch.Tensor:
    """``block(*args)`` in train / eval mode ``training``: the backward pass recomputes a checkpointed block in the
    mode of its forward pass (a rollout sampled in eval mode is back-propagated after the policy returned to train
    mode, and the temporal convolutions' dropout must not switch on in between)."""
    if block.training == training:
        return block(*args)
    block.train(training)
    try:
        return block(*args)
    finally:
        block.train(not training)


# ----------------------------------------------------------------------------------------------- the UNet
class LVDMUNet(nn.Module):
    _no_split_modules = ["Block"]  # FSDP2 shards block by block (the attribute diffusers models declare)

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False
        ch, emb = c.model_channels, 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        if c.fps_cond:
            self.fps_embedding = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

        def res(channels: int, out: int) -> ResBlock:
            return ResBlock(channels, emb, out, c.temporal_conv, c.temporal_conv_dropout)

        def attention(channels: int) -> list[nn.Module]:
            heads, dim_head = channels // c.num_head_channels, c.num_head_channels
            layers = [SpatialTransformer(channels, heads, dim_head, c.transformer_depth, c.context_dim)]
            if c.temporal_attention:
                layers.append(TemporalTransformer(channels, heads, dim_head, c.temporal_transformer_depth))
            return layers

        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        if c.addition_attention:
            self.init_attn = Block(TemporalTransformer(ch, 8, c.num_head_channels, c.transformer_depth, linear=False))
        skips, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers += attention(ch)
                self.input_blocks.append(Block(*layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = Block(res(ch, ch), *attention(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers += attention(ch)
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Block(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1))

    @property
    def downsampling(self) -> int:
        """Latent sides must be multiples of this (skip connections meet upsampled features)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def _run(self, block: Block, x: torch.Tensor, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():  # per block: recomputed in the backward pass
            return checkpoint(_in_mode, block, block.training, x, *args, use_reentrant=False)
        return block(x, *args)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                fps: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction ``[B, C, T, H, W]`` for ``x`` ``[B, C, T, H, W]`` at ``timesteps`` ``[B]`` with text
        ``context`` ``[B, L, D]`` and frame rate ``fps`` ``[B]`` (LVDM's default 16 when None)."""
        b, _, t, h, w = x.shape
        dtype = self.input_blocks[0][0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.fps_cond:
            fps = torch.full_like(timesteps, 16) if fps is None else fps
            emb = emb + self.fps_embedding(timestep_embedding(fps, self.config.model_channels).to(dtype))
        emb, context = emb.repeat_interleave(t, dim=0), context.to(dtype).repeat_interleave(t, dim=0)
        hidden = x.transpose(1, 2).reshape(b * t, -1, h, w).to(dtype)
        skips = []
        for i, block in enumerate(self.input_blocks):
            hidden = self._run(block, hidden, emb, context, b)
            if i == 0 and self.config.addition_attention:
                hidden = self._run(self.init_attn, hidden, emb, context, b)
            skips.append(hidden)
        hidden = self._run(self.middle_block, hidden, emb, context, b)
        for block in self.output_blocks:
            hidden = self._run(block, torch.cat([hidden, skips.pop()], dim=1), emb, context, b)
        out = self.out(hidden)
        return out.view(b, t, -1, h, w).transpose(1, 2).to(x.dtype)
