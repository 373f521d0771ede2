"""The Open-Sora v1.2 video VAE (``hpcai-tech/OpenSora-VAE-v1.2``), written for vpo.

Follows hpcaitech/Open-Sora v1.2.0 (``opensora/models/vae/vae.py``, ``vae_temporal.py``): every frame goes through
an SD-style 2-D ``AutoencoderKL`` (diffusers', x8 in space, latents x0.18215), then a causal 3-D conv VAE compresses
time x4 in "micro-frame" chunks of 17 frames (-> 5 latent frames each; the chunks are independent). Latents are
normalised per channel: ``z = (temporal_latent - shift) / scale``. Module names are the original's, so the
published ``model.safetensors`` (``spatial_vae.module.*``, ``temporal_vae.*``, ``scale``, ``shift``) loads as is.

Causal time: a clip of n frames is padded in front to a multiple of 4 (``(4 - n % 4) % 4`` frames) before encoding
and the same number of leading frames is dropped after decoding, so k latent frames decode to ``4k - 3`` frames
(17 for 5; 1 for 1) and latent frame 0 depends on frame 0 alone.

``encode`` uses the posterior means (the original samples from both posteriors; vpo needs a deterministic
encoding of stored videos).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .loading import load_strict, read_config, read_weights, resolve_directory

LAYOUT = ("a directory (or hub id such as 'hpcai-tech/OpenSora-VAE-v1.2') with config.json (model_type "
          "'VideoAutoencoderPipeline') and model.safetensors with spatial_vae.module.* (diffusers AutoencoderKL), "
          "temporal_vae.* and the scale/shift buffers")
SPATIAL_SCALING = 0.18215  # hard-coded in Open-Sora's VideoAutoencoderKL, whatever the 2-D VAE's own config says
PUBLISHED_SPATIAL = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
# The architecture of PUBLISHED_SPATIAL/vae (the SD / SDXL VAE), which the published config names for the 2-D part:
# known here so that loading needs no second download (its weights come from Open-Sora's file anyway).
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
)
# VAE_Temporal_SD, the temporal VAE of v1.2 (its config names only the type).
TEMPORAL_SD = dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                   channel_multipliers=(1, 2, 2, 4), temporal_downsample=(False, True, True), num_groups=32)


# ----------------------------------------------------------------------------------------------- temporal VAE
class CausalConv3d(nn.Module):
    """3-D conv that pads time only in front (zeros), so an output frame never sees later frames."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size=3, stride: tuple[int, int, int] = (1, 1, 1),
                 bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - stride[0], 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    def __init__(self, chan_in: int, chan_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, chan_in)
        self.conv1 = CausalConv3d(chan_in, chan_out, bias=False)
        self.norm2 = nn.GroupNorm(groups, chan_out)
        self.conv2 = CausalConv3d(chan_out, chan_out, bias=False)
        self.conv3 = CausalConv3d(chan_in, chan_out, 1, bias=False) if chan_in != chan_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


def _res_stack(chan_in: int, chan_out: int, count: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(chan_in if i == 0 else chan_out, chan_out, groups) for i in range(count))


class TemporalEncoder(nn.Module):
    def __init__(self, in_channels, out_channels, filters, num_res_blocks, channel_multipliers, temporal_downsample,
                 num_groups):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, filters, bias=False)
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(), nn.ModuleList()
        previous = filters
        for level, multiplier in enumerate(channel_multipliers):
            width = filters * multiplier
            self.block_res_blocks.append(_res_stack(previous, width, num_res_blocks, num_groups))
            previous = width
            if level < len(channel_multipliers) - 1:  # Identity keeps the original's indices in conv_blocks
                downsample = temporal_downsample[level]
                self.conv_blocks.append(CausalConv3d(width, width, stride=(2, 1, 1)) if downsample else nn.Identity())
        self.res_blocks = _res_stack(previous, previous, num_res_blocks, num_groups)
        self.norm1 = nn.GroupNorm(num_groups, previous)
        self.conv2 = CausalConv3d(previous, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, in_channels, out_channels, filters, num_res_blocks, channel_multipliers, temporal_downsample,
                 num_groups):
        super().__init__()
        self.temporal_downsample = temporal_downsample
        top = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(in_channels, top)
        self.res_blocks = _res_stack(top, top, num_res_blocks, num_groups)
        levels = len(channel_multipliers)
        stacks, convs, previous = [None] * levels, [None] * (levels - 1), top
        for level in reversed(range(levels)):
            width = filters * channel_multipliers[level]
            stacks[level] = _res_stack(previous, width, num_res_blocks, num_groups)
            previous = width
            if level > 0:  # upsampling x2 in time: twice the channels, then depth-to-time
                upsample = temporal_downsample[level - 1]
                convs[level - 1] = CausalConv3d(width, width * 2) if upsample else nn.Identity()
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(stacks), nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(num_groups, previous)
        self.conv_out = CausalConv3d(previous, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0:
                x = self.conv_blocks[level - 1](x)
                if self.temporal_downsample[level - 1]:  # [B, (C 2), T, H, W] -> [B, C, (T 2), H, W]
                    b, c, t, h, w = x.shape
                    x = x.view(b, c // 2, 2, t, h, w).transpose(2, 3).reshape(b, c // 2, t * 2, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    def __init__(self, in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                 channel_multipliers=(1, 2, 2, 4), temporal_downsample=(True, True, False), num_groups=32):
        super().__init__()
        self.arguments = dict(in_out_channels=in_out_channels, latent_embed_dim=latent_embed_dim, embed_dim=embed_dim,
                              filters=filters, num_res_blocks=num_res_blocks,
                              channel_multipliers=tuple(channel_multipliers),
                              temporal_downsample=tuple(temporal_downsample), num_groups=num_groups)
        self.time_factor = 2 ** sum(bool(d) for d in temporal_downsample)
        arch = (filters, num_res_blocks, tuple(channel_multipliers), tuple(temporal_downsample), num_groups)
        self.encoder = TemporalEncoder(in_out_channels, latent_embed_dim * 2, *arch)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = TemporalDecoder(latent_embed_dim, in_out_channels, *arch)

    def front_padding(self, frames: int) -> int:
        return (-frames) % self.time_factor

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, self.front_padding(x.shape[2]), 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return moments.chunk(2, dim=1)[0]

    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))[:, :, self.front_padding(frames):]


# ----------------------------------------------------------------------------------------------- pipeline
class SpatialVAE(nn.Module):
    """Holder so the 2-D VAE's weights are named ``spatial_vae.module.*`` as in the original."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


class OpenSoraVAE(nn.Module):
    def __init__(self, spatial: nn.Module, temporal: TemporalVAE, shift, scale, micro_frame_size: int = 17,
                 micro_batch_size: int = 4):
        super().__init__()
        self.spatial_vae = SpatialVAE(spatial)
        self.temporal_vae = temporal
        self.micro_frame_size = micro_frame_size
        self.micro_batch_size = micro_batch_size  # frames per 2-D VAE call
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).reshape(1, -1, 1, 1, 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def latent_chunk(self) -> int:
        """Latent frames per micro-frame chunk (17 frames -> 5)."""
        return -(-self.micro_frame_size // self.temporal_vae.time_factor)

    def latent_frames(self, frames: int) -> int:
        full, rest = divmod(frames, self.micro_frame_size)
        return full * self.latent_chunk + -(-rest // self.temporal_vae.time_factor)

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames that ``latent_frames`` decode to when the last chunk is read as a causal clip (4k - 3)."""
        full, rest = divmod(latent_frames, self.latent_chunk)
        return full * self.micro_frame_size + (rest * self.temporal_vae.time_factor - 3 if rest else 0)

    def _frames_2d(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply a 2-D VAE function to every frame of ``[B, C, T, H, W]``, ``micro_batch_size`` frames at a time."""
        b, _, t = x.shape[:3]
        flat = x.transpose(1, 2).flatten(0, 1)
        step = self.micro_batch_size
        out = torch.cat([fn(flat[i : i + step]) for i in range(0, flat.shape[0], step)])
        return out.view(b, t, *out.shape[1:]).transpose(1, 2)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B, 3, T, H, W]`` in [-1, 1] -> normalised latents ``[B, 4, T', H/8, W/8]`` (posterior means)."""
        spatial = self.spatial_vae.module
        x = self._frames_2d(video, lambda f: spatial.encode(f).latent_dist.mode() * SPATIAL_SCALING)
        chunks = [self.temporal_vae.encode_mean(x[:, :, i : i + self.micro_frame_size])
                  for i in range(0, x.shape[2], self.micro_frame_size)]
        return (torch.cat(chunks, dim=2) - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        """Normalised latents ``[B, 4, T', h, w]`` -> video ``[B, 3, frames, 8h, 8w]`` in about [-1, 1]."""
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        chunks = []
        for start in range(0, z.shape[2], self.latent_chunk):
            chunks.append(self.temporal_vae.decode(z[:, :, start : start + self.latent_chunk],
                                                   min(self.micro_frame_size, frames)))
            frames -= self.micro_frame_size
        spatial = self.spatial_vae.module
        return self._frames_2d(torch.cat(chunks, dim=2), lambda f: spatial.decode(f / SPATIAL_SCALING).sample)

    # ------------------------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype = torch.float32, micro_batch_size: int | None = None
                        ) -> "OpenSoraVAE":
        from diffusers import AutoencoderKL
        from vpo_core import VpoError

        what = "Open-Sora VAE"
        directory = resolve_directory(name, what, LAYOUT)
        config = read_config(directory, what, LAYOUT, "VideoAutoencoderPipeline")
        spatial_config = _spatial_config(config.get("vae_2d") or {}, directory)
        temporal_spec = dict(config.get("vae_temporal") or {"type": "VAE_Temporal_SD"})
        kind = temporal_spec.pop("type", "VAE_Temporal_SD")
        temporal_spec.pop("from_pretrained", None)
        if kind not in ("VAE_Temporal_SD", "VAE_Temporal"):
            raise VpoError(f"{what}: {directory / 'config.json'} names temporal VAE type {kind!r}; expected "
                           "'VAE_Temporal_SD' (Open-Sora v1.2) or 'VAE_Temporal' with its arguments.")
        temporal_args = {**(TEMPORAL_SD if kind == "VAE_Temporal_SD" else {}), **temporal_spec}
        try:
            spatial = AutoencoderKL(**spatial_config)
            temporal = TemporalVAE(**temporal_args)
        except TypeError as error:
            raise VpoError(f"{what}: {directory / 'config.json'} has an argument the model does not take: "
                           f"{error}") from None
        batch = micro_batch_size or (config.get("vae_2d") or {}).get("micro_batch_size") or 4
        model = cls(spatial, temporal, config.get("shift", 0.0), config.get("scale", 1.0),
                    config.get("micro_frame_size") or 17, batch)
        state = read_weights(directory, what, LAYOUT)
        for key in ("scale", "shift"):  # the file's buffers win over config.json, as in the original's loading
            if key in state:
                state[key] = state[key].reshape(model.state_dict()[key].shape)
        load_strict(model, state, what, directory, LAYOUT, optional=("scale", "shift"))
        return model.to(dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` in the published layout. A 2-D VAE other than the published SDXL
        VAE gets its ``AutoencoderKL`` config written to ``spatial_vae/vae/`` beside them (config.json names it)."""
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spatial = self.spatial_vae.module
        vae_2d = {"type": "VideoAutoencoderKL", "from_pretrained": PUBLISHED_SPATIAL, "subfolder": "vae",
                  "micro_batch_size": self.micro_batch_size, "local_files_only": False}
        if any(spatial.config.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in SD_VAE_CONFIG.items()):
            spatial.save_config(directory / "spatial_vae" / "vae")
            vae_2d["from_pretrained"] = "spatial_vae"
        temporal = self.temporal_vae.arguments
        vae_temporal = ({"type": "VAE_Temporal_SD", "from_pretrained": None} if temporal == TEMPORAL_SD else
                        {"type": "VAE_Temporal", **{k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in temporal.items()}})
        config = {"model_type": "VideoAutoencoderPipeline", "architectures": ["VideoAutoencoderPipeline"],
                  "micro_frame_size": self.micro_frame_size, "cal_loss": False, "freeze_vae_2d": False,
                  "shift": self.shift.flatten().tolist(), "scale": self.scale.flatten().tolist(),
                  "vae_2d": vae_2d, "vae_temporal": vae_temporal}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / "model.safetensors"))


def _spatial_config(vae_2d: dict, directory: Path) -> dict:
    """Architecture of the 2-D VAE: built in for the published SDXL VAE, else the ``AutoencoderKL`` config at
    ``vae_2d.from_pretrained`` / ``subfolder`` (relative to the VAE directory, an absolute directory, or a hub id)."""
    from diffusers import AutoencoderKL
    from vpo_core import VpoError

    source, subfolder = vae_2d.get("from_pretrained") or PUBLISHED_SPATIAL, vae_2d.get("subfolder")
    if source == PUBLISHED_SPATIAL:
        return dict(SD_VAE_CONFIG)
    relative = directory / source
    location = str(relative) if relative.is_dir() else source
    try:
        config = AutoencoderKL.load_config(location, subfolder=subfolder)
    except Exception as error:
        raise VpoError(f"Open-Sora VAE: cannot read the 2-D VAE config {source!r} (subfolder {subfolder!r}) that "
                       f"{directory / 'config.json'} names in vae_2d.from_pretrained: {error}") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}
