"""HPSv2 checkpoint (open_clip ViT layout) -> transformers ``CLIPModel``.

The published HPSv2 / HPSv2.1 weights (``xswu/HPSv2``: ``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``)
are an open_clip ViT-H-14 ``state_dict``. open_clip and transformers' CLIP are the same network with other
parameter names, except that open_clip keeps the attention's q/k/v in one ``in_proj`` matrix and stores the
two output projections as ``[width, embed_dim]`` matrices applied as ``x @ proj`` (transformers: Linear).

Also the ``vpo hpsv2 convert CHECKPOINT OUT_DIR`` command (and the same as the ``vpo-hpsv2-convert`` console
script), which writes a converted directory that ``CLIPModel.from_pretrained`` (and this plugin) reads directly.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from vpo_core import VpoError

# Head counts cannot be read from weight shapes. open_clip's ViTs use 64-wide heads except ViT-H/14's vision
# tower (1280 wide, 80-wide heads -> 16); text towers use 64-wide heads.
KNOWN_VISION_HEADS = {1280: 16}
HEAD_WIDTH = 64

# Keys every open_clip ViT CLIP checkpoint has (used to recognise the format and to report what is missing).
REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.ln_pre.weight",
    "visual.ln_post.weight",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
    "logit_scale",
)

# Keys of the original layout that carry no weights (older open_clip saved the causal mask as a buffer).
IGNORED_KEYS = {"attn_mask", "visual.attn_mask"}

# Per-block renames (both towers): open_clip suffix -> transformers suffix. attn.in_proj_* is split apart.
BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


class CheckpointFormatError(VpoError):
    """The file is not an open_clip ViT checkpoint (or a converted CLIPModel directory)."""


def load_open_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an HPSv2 ``.pt`` file safely (``weights_only=True``): its ``state_dict`` entry or the dict itself."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one that needs full unpickling
        raise CheckpointFormatError(
            f"could not read HPSv2 checkpoint {path} as a torch state dict ({type(err).__name__}: {err}); "
            "expected an open_clip file such as HPS_v2.1_compressed.pt from xswu/HPSv2"
        ) from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise CheckpointFormatError(f"HPSv2 checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _heads(width: int, override: int | None, known: dict[int, int], tower: str) -> int:
    heads = override or known.get(width) or (width // HEAD_WIDTH if width % HEAD_WIDTH == 0 else None)
    if not heads or width % heads:
        raise CheckpointFormatError(
            f"cannot infer the {tower} tower's attention head count for width {width}; "
            f"set {tower}_heads (config) or --{tower}-heads (convert command)"
        )
    return heads


def clip_config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    eos_token_id: int = 49407,
    bos_token_id: int = 49406,
    pad_token_id: int = 1,
) -> CLIPConfig:
    """A CLIPConfig whose sizes are read from the weights' shapes (so a tiny checkpoint gives a tiny model)."""
    missing = [key for key in REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise CheckpointFormatError(
            "not an open_clip ViT CLIP state dict (HPSv2 format): missing "
            + ", ".join(missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    num_patches = state_dict["visual.positional_embedding"].shape[0] - 1
    grid = int(round(num_patches**0.5))
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    vision_layers = _count_blocks(state_dict, "visual.transformer.resblocks.")
    text_layers = _count_blocks(state_dict, "transformer.resblocks.")
    if grid * grid != num_patches or not vision_layers or not text_layers:
        raise CheckpointFormatError("open_clip state dict has no square patch grid or no transformer blocks")
    projection_dim = state_dict["text_projection"].shape[1]
    if state_dict["visual.proj"].shape[1] != projection_dim:
        raise CheckpointFormatError("visual.proj and text_projection project to different sizes")
    return CLIPConfig(
        projection_dim=projection_dim,
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=vision_layers,
            num_attention_heads=_heads(vision_width, vision_heads, KNOWN_VISION_HEADS, "vision"),
            patch_size=patch_size,
            image_size=grid * patch_size,
            projection_dim=projection_dim,
            hidden_act="gelu",  # ViT-H-14 uses exact GELU (OpenAI's own models use quick_gelu)
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            hidden_size=text_width,
            intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=text_layers,
            num_attention_heads=_heads(text_width, text_heads, {}, "text"),
            vocab_size=vocab_size,
            max_position_embeddings=state_dict["positional_embedding"].shape[0],
            projection_dim=projection_dim,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            pad_token_id=pad_token_id,
        ),
    )


class _KeyReader:
    """Reads keys of the original state dict and remembers which ones were used (to catch unknown weights)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.state_dict:
            raise CheckpointFormatError(f"open_clip state dict lacks {key} (truncated, or another architecture)")
        self.used.add(key)
        return self.state_dict[key]


def _rename_blocks(sd: _KeyReader, source: str, target: str, num_layers: int) -> dict[str, torch.Tensor]:
    renamed = {}
    for i in range(num_layers):
        src, dst = f"{source}{i}.", f"{target}{i}."
        q, k, v = sd[src + "attn.in_proj_weight"].chunk(3, dim=0)
        q_bias, k_bias, v_bias = sd[src + "attn.in_proj_bias"].chunk(3, dim=0)
        for name, weight, bias in (("q_proj", q, q_bias), ("k_proj", k, k_bias), ("v_proj", v, v_bias)):
            renamed[f"{dst}self_attn.{name}.weight"] = weight
            renamed[f"{dst}self_attn.{name}.bias"] = bias
        for old, new in BLOCK_RENAMES.items():
            for param in ("weight", "bias"):
                renamed[f"{dst}{new}.{param}"] = sd[f"{src}{old}.{param}"]
    return renamed


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """open_clip keys -> transformers CLIPModel keys (renaming, q/k/v split, projection transposes)."""
    sd = _KeyReader(state_dict)
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        # open_clip applies these as ``x @ proj`` ([width, embed]); a Linear weight is [embed, width].
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    out |= _rename_blocks(
        sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", config.vision_config.num_hidden_layers
    )
    out |= _rename_blocks(
        sd, "transformer.resblocks.", "text_model.encoder.layers.", config.text_config.num_hidden_layers
    )
    unknown = sorted(set(state_dict) - sd.used - IGNORED_KEYS)
    if unknown:
        raise CheckpointFormatError(
            "open_clip state dict has weights a plain ViT CLIP does not have (another open_clip architecture?): "
            + ", ".join(unknown[:5])
        )
    return out


def clip_model_from_open_clip(
    state_dict: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    eos_token_id: int = 49407,
    bos_token_id: int = 49406,
    pad_token_id: int = 1,
) -> CLIPModel:
    """Build a CLIPModel holding the open_clip weights (no random initialisation of the 1B parameters)."""
    from accelerate import init_empty_weights

    config = clip_config_from_state_dict(
        state_dict, vision_heads, text_heads, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
    )
    converted = convert_state_dict(state_dict, config)
    # Parameters are created on the meta device and then replaced by the checkpoint's tensors.
    with init_empty_weights(include_buffers=False):
        model = CLIPModel(config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------- CLI
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="local .pt file, or a hub repo id such as xswu/HPSv2 (see --version)")
    parser.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--version", default="v2.1", choices=["v2.0", "v2.1"], help="file to take from a hub repo")
    parser.add_argument(
        "--tokenizer",
        default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        help="tokenizer saved next to the model (hub id or directory); 'none' to skip",
    )
    parser.add_argument("--vision-heads", type=int, default=None, help="override the vision head count")
    parser.add_argument("--text-heads", type=int, default=None, help="override the text head count")
    parser.add_argument(
        "--dtype", default="keep", choices=["keep", "float32", "float16", "bfloat16"], help="dtype of saved weights"
    )
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``args.checkpoint`` and save it to ``args.out_dir``; raises VpoError for user mistakes."""
    from transformers import AutoTokenizer

    from .reward import resolve_checkpoint_file

    tokenizer = None
    token_ids = {}
    if args.tokenizer.lower() != "none":
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as err:
            raise VpoError(f"could not load tokenizer {args.tokenizer!r}: {err} (or pass --tokenizer none)") from None
        token_ids = dict(
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1,
        )
    checkpoint = resolve_checkpoint_file(args.checkpoint, args.version)
    model = clip_model_from_open_clip(
        load_open_clip_state_dict(checkpoint), args.vision_heads, args.text_heads, **token_ids
    )
    if args.dtype != "keep":
        model = model.to(getattr(torch, args.dtype))
    out_dir = Path(args.out_dir)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    print(f"wrote {out_dir} (CLIPModel, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    return 0


# ``vpo hpsv2 convert ...`` (mounted by the core through the vpo_register_commands hook).
def configure_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="hpsv2_command", required=True)
    add_convert_arguments(sub.add_parser("convert", help="HPSv2 open_clip checkpoint -> CLIPModel directory"))


def run_cli(args: argparse.Namespace) -> int:
    return run_convert(args)  # "convert" is the only sub-command


def main(argv: list[str] | None = None) -> int:
    """Console script ``vpo-hpsv2-convert CHECKPOINT OUT_DIR [options]``."""
    parser = argparse.ArgumentParser(
        prog="vpo-hpsv2-convert",
        description="Convert an HPSv2 open_clip checkpoint into a transformers CLIPModel directory.",
    )
    args = add_convert_arguments(parser).parse_args(argv)
    try:
        return run_convert(args)
    except VpoError as err:
        print(f"vpo-hpsv2-convert: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
