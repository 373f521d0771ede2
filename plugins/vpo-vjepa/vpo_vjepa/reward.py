"""V-JEPA 2 temporal-consistency reward: the negative masked-prediction loss of a video (VADER's V-JEPA reward).

For a video x, a seeded mask splits the spatio-temporal tubelet tokens into context C and targets T:

    h      = LayerNorm(Encoder(x))                  full clip, no gradient (V-JEPA's target features)
    z_C    = Encoder(tokens of x at C only)         the encoder never sees the target tokens
    p_T    = Predictor(z_C, positions C, T)
    score  = - mean_{i in T, d} | p_T[i, d] - h[i, d] |

averaged over ``num_masks`` masks. A video whose masked parts follow from the rest (temporally consistent)
is predicted well and scores high. Gradients reach the frames through the context path only.

Note: ``VJEPA2Model(pixel_values_videos, context_mask, target_mask)`` runs the encoder on the *full* video
and only then drops the target tokens, so the context features have already seen the targets. Here the
encoder runs on the context tokens alone, as in V-JEPA training, using transformers' own building blocks
(patch embedding, encoder layers with RoPE positions of the kept tokens, predictor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, VJEPA2Model
from transformers.models.vjepa2.modeling_vjepa2 import apply_masks

from vpo_core import BuildContext, VpoError, iter_chunks

from .config import MaskKind, VJEPAConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- loading
def load_vjepa2(name: str, image_size: int | None = None, dtype: torch.dtype = torch.float32) -> VJEPA2Model:
    """VJEPA2Model with its predictor; a clear VpoError for missing, foreign or predictor-less checkpoints."""
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise VpoError(
            f"V-JEPA 2 checkpoint {name!r} not found or unreadable ({err}); give a hub id such as "
            "facebook/vjepa2-vitl-fpc64-256 or a directory written with save_pretrained"
        ) from None
    if config.model_type != "vjepa2":
        raise VpoError(
            f"{name!r} holds a {config.model_type!r} model, not V-JEPA 2 (model_type 'vjepa2'); V-JEPA v1 "
            "checkpoints use fixed positions and are not supported"
        )
    if image_size is not None:
        # RoPE positions are computed from crop_size (no learned position table), so this only changes
        # the token grid the attention layers assume.
        config.crop_size = image_size
    model, info = VJEPA2Model.from_pretrained(name, config=config, dtype=dtype, output_loading_info=True)
    missing = [key for key in info["missing_keys"] if "predictor" in key or "encoder" in key]
    if missing:
        raise VpoError(
            f"V-JEPA 2 checkpoint {name!r} lacks {len(missing)} encoder/predictor weights (e.g. {missing[0]}); "
            "the reward needs the pretrained predictor: use a base checkpoint such as "
            "facebook/vjepa2-vitl-fpc64-256, not a classification fine-tune"
        )
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- preprocessing
def sample_frame_indices(num_available: int, num_frames: int) -> torch.Tensor:
    """``num_frames`` uniformly spaced indices (repeats frames when the video is shorter)."""
    return torch.linspace(0, num_available - 1, num_frames).round().long()


def resize_center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """VJEPA2VideoProcessor's geometry: shortest side to crop*256/224 (bilinear, antialiased), center crop."""
    resize = int(crop * 256 / 224)
    height, width = images.shape[-2:]
    scale = resize / min(height, width)
    new_h, new_w = max(crop, round(height * scale)), max(crop, round(width * scale))
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return images[..., top : top + crop, left : left + crop]


# ----------------------------------------------------------------------------------------------- masks
def make_mask(
    kind: MaskKind, grid: tuple[int, int, int], ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context indices, target indices), sorted, into the flattened (time, height, width) token grid."""
    steps, height, width = grid
    per_step = height * width
    is_target = torch.zeros(steps, per_step, dtype=torch.bool)
    if kind == "temporal_block":
        length = min(max(round(ratio * steps), 1), steps - 1)
        start = int(torch.randint(0, steps - length + 1, (1,), generator=generator))
        is_target[start : start + length] = True
    elif kind == "tubes":
        count = min(max(round(ratio * per_step), 1), per_step - 1)
        is_target[:, torch.randperm(per_step, generator=generator)[:count]] = True
    else:
        total = steps * per_step
        count = min(max(round(ratio * total), 1), total - 1)
        is_target.view(-1)[torch.randperm(total, generator=generator)[:count]] = True
    flat = is_target.flatten()
    return (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------- reward
class VJEPAReward:
    """``score(frames, prompts) -> {"temporal_consistency": Tensor[B]}`` (prompts are not used)."""

    dimensions = ("temporal_consistency",)
    differentiable = True

    def __init__(self, config: VJEPAConfig, model: VJEPA2Model, device: torch.device, seed: int):
        self.config = config
        self.device = device
        self.dtype = DTYPES[config.dtype]
        self.model = model.to(device=device, dtype=self.dtype)
        model_config = model.config
        self.tubelet = model_config.tubelet_size
        self.image_size = model_config.crop_size
        self.grid = (
            config.num_frames // self.tubelet,
            self.image_size // model_config.patch_size,
            self.image_size // model_config.patch_size,
        )
        self.seed = seed
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)

    def masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``num_masks`` (context, target) pairs at every call: a fresh generator from the seed."""
        generator = torch.Generator().manual_seed(self.seed)
        return [
            make_mask(self.config.mask, self.grid, self.config.mask_ratio, generator)
            for _ in range(self.config.num_masks)
        ]

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """frames ``[B, T, 3, H, W]`` in [0, 1] -> ``pixel_values_videos`` ``[B, num_frames, 3, S, S]``."""
        index = sample_frame_indices(frames.shape[1], self.config.num_frames).to(frames.device)
        video = frames.index_select(1, index).to(self.device, torch.float32)
        batch, steps = video.shape[:2]
        video = resize_center_crop(video.flatten(0, 1), self.image_size).unflatten(0, (batch, steps))
        return ((video - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def target_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """V-JEPA's regression targets: layer-normed encoder features of the full clip, no gradient."""
        hidden = self.model.encoder(pixel_values_videos=pixels).last_hidden_state.float()
        return F.layer_norm(hidden, (hidden.shape[-1],))

    def encode_context(self, pixels: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Encoder run on the context tokens only (RoPE positions of those tokens): ``[B, len(context), D]``."""
        encoder = self.model.encoder
        positions = context.to(self.device).expand(len(pixels), -1)
        hidden = apply_masks(encoder.embeddings(pixels), [positions])
        for layer in encoder.layer:
            hidden = layer(hidden, position_mask=positions)[0]
        return encoder.layernorm(hidden)

    def predict_targets(self, context_features: torch.Tensor, context: torch.Tensor, target: torch.Tensor):
        """Predictor output for the target tokens, ``[B, len(target), D]``."""
        batch, _, dim = context_features.shape
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        context_positions = context.to(self.device).expand(batch, -1)
        target_positions = target.to(self.device).expand(batch, -1)
        # The predictor gathers its context from a full-length token sequence; place the context-only
        # features at their positions (the other rows are never read).
        full = context_features.new_zeros(batch, num_tokens, dim)
        full = full.scatter(1, context_positions.unsqueeze(-1).expand(-1, -1, dim), context_features)
        output = self.model.predictor(full, context_mask=[context_positions], target_mask=[target_positions])
        return output.last_hidden_state

    def masked_prediction_loss(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-video L1 masked-prediction loss ``[B]``, averaged over the masks."""
        targets = self.target_features(pixels)
        losses = []
        for context, target in self.masks():
            predicted = self.predict_targets(self.encode_context(pixels, context), context, target).float()
            wanted = targets[:, target.to(self.device)]
            losses.append((predicted - wanted).abs().mean(dim=(1, 2)))
        return torch.stack(losses).mean(dim=0)

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise VpoError(f"vjepa expects frames [B, T, 3, H, W], got shape {tuple(frames.shape)}")
        losses = [
            self.masked_prediction_loss(self.preprocess(frames[chunk]))
            for chunk in iter_chunks(frames.shape[0], self.config.micro_batch_size)
        ]
        return {"temporal_consistency": -torch.cat(losses)}


def build_vjepa_reward(config: VJEPAConfig, context: BuildContext) -> VJEPAReward:
    if config.micro_batch_size < 1 or config.num_masks < 1:
        raise VpoError("vjepa: micro_batch_size and num_masks must be at least 1")
    if not 0.0 < config.mask_ratio < 1.0:
        raise VpoError(f"vjepa: mask_ratio must lie strictly between 0 and 1, got {config.mask_ratio}")
    model = load_vjepa2(config.model, config.image_size, DTYPES[config.dtype])
    tubelet, patch = model.config.tubelet_size, model.config.patch_size
    if config.num_frames % tubelet or config.num_frames < tubelet:
        raise VpoError(f"vjepa: num_frames={config.num_frames} must be a multiple of the tubelet size {tubelet}")
    if config.mask == "temporal_block" and config.num_frames < 2 * tubelet:
        raise VpoError(
            f"vjepa: mask 'temporal_block' needs num_frames >= {2 * tubelet} (two tubelet steps, so part of "
            "the clip can be predicted from the rest)"
        )
    if model.config.crop_size % patch:
        raise VpoError(f"vjepa: image_size {model.config.crop_size} must be a multiple of the patch size {patch}")
    device = torch.device(config.device) if config.device else context.device
    seed = context.seed if config.seed is None else config.seed
    return VJEPAReward(config, model, device, seed)
