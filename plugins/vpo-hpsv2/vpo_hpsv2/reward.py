"""HPSv2 / HPSv2.1 as a differentiable video reward.

score(video, prompt) = mean over sampled frames f of cos(E_img(preprocess(f)), E_txt(prompt)), the number
HPSv2 reports (no logit scale). Preprocessing is the transform `hpsv2.score` builds (`light_augmentation=True`
-> open_clip's `ResizeMaxSize`), written with torch ops so that gradients reach the frames: bicubic resize of the
LONGEST side to 224, zero (black) padding to 224x224, OpenAI CLIP mean/std. No centre crop.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer, CLIPModel

from vpo_core import BuildContext, VpoError, iter_chunks

from .config import CHECKPOINT_FILES, HPSV2_REPO, HPSv2Config  # noqa: F401 (re-exported)

from .convert import clip_model_from_open_clip, load_open_clip_state_dict

DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- loading
def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith((".pt", ".pth", ".bin")) or name.count("/") != 1


def resolve_checkpoint_file(model: str, version: str) -> Path:
    """A local path to the original open_clip checkpoint (downloading ``CHECKPOINT_FILES[version]`` if needed)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / CHECKPOINT_FILES[version]
        if candidate.is_file():
            return candidate
        raise VpoError(f"HPSv2 directory {path} has neither config.json (converted model) nor {candidate.name}")
    if _looks_like_path(model):
        raise VpoError(f"HPSv2 checkpoint {model} does not exist; give a .pt file, a converted directory or a hub id")
    return Path(_hub_download(model, CHECKPOINT_FILES[version]))


def _hub_download(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename)
    except EntryNotFoundError:
        raise VpoError(f"hub repo {repo_id} has no file {filename}") from None
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise VpoError(f"could not download {filename} from hub repo {repo_id}: {err}") from None


def _is_converted_model(model: str) -> bool:
    """True for a CLIPModel directory/repo (has config.json), False for the original checkpoint."""
    path = Path(model).expanduser()
    if path.exists():
        return path.is_dir() and (path / "config.json").is_file()
    if _looks_like_path(model):
        return False
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model, "config.json")
    except Exception:  # no config.json, or offline with only the .pt cached: the checkpoint path reports errors
        return False
    return True


def load_hpsv2(config: HPSv2Config) -> tuple[CLIPModel, object]:
    """(CLIPModel, tokenizer) for ``config.model``; converts the original checkpoint in memory."""
    if _is_converted_model(config.model):
        try:
            clip_config = AutoConfig.from_pretrained(config.model)
        except (OSError, ValueError) as err:
            raise VpoError(f"could not read the config of HPSv2 model {config.model}: {err}") from None
        if clip_config.model_type != "clip":
            raise VpoError(
                f"{config.model} holds a {clip_config.model_type!r} model, not a CLIPModel; give an HPSv2 "
                "checkpoint (xswu/HPSv2) or a directory written by vpo-hpsv2-convert"
            )
        model = CLIPModel.from_pretrained(config.model)
        tokenizer = _load_tokenizer(config.tokenizer) if config.tokenizer else _own_or_default_tokenizer(config.model)
    else:
        tokenizer = _load_tokenizer(config.tokenizer or DEFAULT_TOKENIZER)
        state_dict = load_open_clip_state_dict(resolve_checkpoint_file(config.model, config.version))
        model = clip_model_from_open_clip(
            state_dict,
            config.vision_heads,
            config.text_heads,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1,
        )
    return model.eval().requires_grad_(False), tokenizer


def _own_or_default_tokenizer(model: str):
    """The converted model's own tokenizer (vpo-hpsv2-convert saves one), else LAION's ViT-H-14 tokenizer."""
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        return _load_tokenizer(DEFAULT_TOKENIZER)


def _load_tokenizer(name: str):
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise VpoError(
            f"could not load the HPSv2 tokenizer {name!r} ({err}); set `tokenizer` to {DEFAULT_TOKENIZER} "
            "or to a local copy"
        ) from None


# ----------------------------------------------------------------------------------------------- preprocessing
def sample_frame_indices(num_available: int, num_frames: int | str) -> torch.Tensor:
    """Uniformly spaced frame indices (all frames for "all" or when fewer frames exist)."""
    if num_frames == "all" or num_frames >= num_available:
        return torch.arange(num_available)
    return torch.linspace(0, num_available - 1, int(num_frames)).round().long()


def resize_longest_side_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize(size, fill=0)`` on images ``[N, C, H, W]`` in [0, 1].

    As in HPSv2's vendored open_clip: the longest side becomes ``size`` and the other ``round(side * scale)``
    (Python's round), bicubic on the tensor; then zeros pad to ``size x size``, the odd pixel of a padding going to
    the right / bottom (``[pad // 2, pad - pad // 2]``). The resize antialiases as torchvision >= 0.17 does for
    tensors (and PIL always does); torchvision < 0.17 did not antialias tensors by default. HPSv2 skips the pad when
    the longest side is already ``size``, which leaves a non-square input the model cannot take: we pad it.
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


# ----------------------------------------------------------------------------------------------- reward
class HPSv2Reward:
    """Differentiable HPSv2 reward: ``score(frames, prompts) -> {"score": Tensor[B]}``."""

    dimensions = ("score",)
    differentiable = True

    def __init__(self, config: HPSv2Config, model: CLIPModel, tokenizer, device: torch.device):
        self.config = config
        self.device = device
        self.dtype = DTYPES[config.dtype]
        self.model = model.to(device=device, dtype=self.dtype)
        self.tokenizer = tokenizer
        self.image_size = config.image_size or model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings
        self.mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Normalised text embeddings ``[len(prompts), D]`` (no graph: prompts are not optimised)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids.to(self.device)
        hidden = self.model.text_model(input_ids=tokens).last_hidden_state
        # Pool at the end-of-text token, as open_clip does (argmax of the ids: eot has the highest id in
        # CLIP's vocabulary). Using the tokenizer's eos id keeps this right whatever the saved config says.
        eot = (tokens == self.tokenizer.eos_token_id).int().argmax(dim=-1)
        pooled = hidden[torch.arange(len(prompts), device=self.device), eot]
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings of images ``[N, 3, H, W]`` in [0, 1] (differentiable)."""
        pixels = (resize_longest_side_and_pad(images.float(), self.image_size) - self.mean) / self.std
        outputs = []
        for chunk in iter_chunks(len(pixels), self.config.micro_batch_size):
            pooled = self.model.vision_model(pixel_values=pixels[chunk].to(self.dtype)).pooler_output
            outputs.append(self.model.visual_projection(pooled))
        return F.normalize(torch.cat(outputs).float(), dim=-1)

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise VpoError(f"hpsv2 expects frames [B, T, 3, H, W], got shape {tuple(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise VpoError(f"hpsv2 got {frames.shape[0]} videos but {len(prompts)} prompts")
        batch = frames.shape[0]
        index = sample_frame_indices(frames.shape[1], self.config.num_frames).to(frames.device)
        images = frames.index_select(1, index).to(self.device).flatten(0, 1)  # [B*T', 3, H, W]
        image_emb = self.image_embeddings(images).view(batch, len(index), -1)
        text_emb = self.text_embeddings(prompts)
        per_frame = (image_emb * text_emb.unsqueeze(1)).sum(dim=-1)  # cosine similarity [B, T']
        return {"score": per_frame.mean(dim=1)}


def build_hpsv2_reward(config: HPSv2Config, context: BuildContext) -> HPSv2Reward:
    if config.micro_batch_size < 1:
        raise VpoError("hpsv2: micro_batch_size must be at least 1")
    if isinstance(config.num_frames, int) and config.num_frames < 1:
        raise VpoError("hpsv2: num_frames must be at least 1 or 'all'")
    device = torch.device(config.device) if config.device else context.device
    model, tokenizer = load_hpsv2(config)
    return HPSv2Reward(config, model, tokenizer, device)
