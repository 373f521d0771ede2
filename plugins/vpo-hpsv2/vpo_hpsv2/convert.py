"""HPSv2 checkpoint (open_clip ViT layout) -> transformers ``CLIPModel``.

The published HPSv2 / HPSv2.1 weights (``xswu/HPSv2``: ``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``)
are an open_clip ViT-H-14 ``state_dict``. The key conversion itself is ``vpo_core.openclip`` (shared with the
VideoCrafter2 policy's text tower); this module reads the file and builds the ``CLIPModel``.

Also the ``vpo hpsv2 convert CHECKPOINT OUT_DIR`` command (and the same as the ``vpo-hpsv2-convert`` console
script), which writes a converted directory that ``CLIPModel.from_pretrained`` (and this plugin) reads directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from vpo_core import VpoError
from vpo_core.openclip import OpenClipFormatError, clip_config, convert_clip

# The file is not an open_clip ViT checkpoint (raised by the reader below and by the shared conversion).
CheckpointFormatError = OpenClipFormatError


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


def clip_config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    eos_token_id: int = 49407,
    bos_token_id: int = 49406,
    pad_token_id: int = 1,
) -> CLIPConfig:
    """A CLIPConfig whose sizes are read from the weights' shapes (so a tiny checkpoint gives a tiny model)."""
    return CLIPConfig(**clip_config(state_dict, vision_heads, text_heads, eos_token_id=eos_token_id,
                                    bos_token_id=bos_token_id, pad_token_id=pad_token_id))


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: CLIPConfig | None = None) -> dict[str, torch.Tensor]:
    """open_clip keys -> CLIPModel keys: ``vpo_core.openclip.convert_clip`` (which reads the layer counts from the
    state dict; ``config`` is only accepted so that existing callers keep working)."""
    return convert_clip(state_dict)


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
    converted = convert_clip(state_dict)
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
