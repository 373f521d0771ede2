"""VideoCrafter2's ``model.ckpt`` read safely, split into its three models, and ``vpo videocrafter2 convert``.

The published file is a Lightning checkpoint: ``state_dict`` with ``model.diffusion_model.*`` (the LVDM UNet),
``first_stage_model.*`` (the SD VAE, LDM key names) and ``cond_stage_model.model.*`` (OpenCLIP ViT-H/14's text
tower). It is read with ``torch.load(weights_only=True)``: plain tensors and containers only. A file that needs full
unpickling is refused unless ``safety.allow_pickle`` is set; ``vpo videocrafter2 convert`` writes the three models'
weights (original key names) as safetensors once, so that later runs never unpickle.

* UNet: ``LVDMUNet`` with the configuration read from the weights' shapes, original key names.
* VAE: diffusers ``AutoencoderKL`` through diffusers' own LDM conversion (``convert_ldm_vae_checkpoint``).
* Text: transformers ``CLIPTextModel`` through ``vpo_core.openclip``, keeping the blocks up to the penultimate one, so
  its ``last_hidden_state`` is LVDM's ``FrozenOpenCLIPEmbedder(layer="penultimate")`` output (through ``ln_final``).
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch
from vpo_core import VpoError
from vpo_core.openclip import OpenClipFormatError, count_blocks, convert_text_tower, text_config

from .unet import LVDMUNet, UNetConfig

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
HUB_FILES = ("model.safetensors", "model.ckpt")  # a converted repo's file first, then the published one
VAE_SCALE_FACTOR = 0.18215  # configs/inference_t2v_512_v2.0.yaml: scale_factor
_PICKLE_HINT = ("Convert it once with `vpo videocrafter2 convert {path} OUT_DIR --allow-pickle` and set "
                "`model: OUT_DIR`, or set `safety.allow_pickle: true` in the spec if you trust the file")


# ----------------------------------------------------------------------------------------------- reading
def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local file for ``model``: a file, a directory holding model.safetensors / model.ckpt, or a hub id."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in HUB_FILES:
            if (path / name).is_file():
                return path / name
        raise VpoError(f"VideoCrafter2 directory {model} holds neither model.safetensors (written by `vpo "
                       "videocrafter2 convert`) nor model.ckpt")
    if model.startswith((".", "/", "~")) or model.count("/") != 1 or path.suffix in (".ckpt", ".safetensors"):
        raise VpoError(f"VideoCrafter2 checkpoint {model!r} does not exist; give a hub id such as "
                       "VideoCrafter/VideoCrafter2, a model.ckpt, or what `vpo videocrafter2 convert` wrote")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    errors = []
    for name in HUB_FILES:
        try:
            return Path(hf_hub_download(model, name, revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError) as error:  # not in the repo, or offline and not cached
            errors.append(f"{name}: {error}")
        except (HFValidationError, OSError) as error:
            raise VpoError(f"could not download {name} from hub repo {model}: {error}") from None
    raise VpoError(f"hub repo {model} (revision {revision}) gave none of {list(HUB_FILES)}: " + "; ".join(errors))


def _torch_load(path: Path, weights_only: bool):
    try:  # memory-mapped: the 5.5 GB file is not copied into memory before its tensors are used
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)  # legacy (non-zip) format


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (``state_dict`` of a Lightning checkpoint, or the file's flat dict)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:
            raise VpoError(f"could not read {path} as safetensors ({error})") from None
    try:
        checkpoint = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as error:  # objects beyond tensors and plain containers
        if not allow_pickle:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            what = f" (e.g. {found.group(1)})" if found else ""
            raise VpoError(f"{path} holds Python objects{what} that torch.load(weights_only=True) refuses: loading it "
                           "would unpickle arbitrary code. " + _PICKLE_HINT.format(path=path)) from None
        checkpoint = _torch_load(path, weights_only=False)
    except Exception as error:
        raise VpoError(f"could not read {path} as a torch checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise VpoError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def load_checkpoint(model: str, revision: str | None = None, allow_pickle: bool = False) -> tuple[dict, str]:
    """The three models' weights of a VideoCrafter2 checkpoint (original key names) and the file they came from."""
    path = resolve_checkpoint(model, revision)
    state = read_state_dict(path, allow_pickle)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith((UNET, VAE, TEXT))}
    missing = [prefix for prefix in (UNET, VAE, TEXT) if not any(k.startswith(prefix) for k in state)]
    if missing:
        raise VpoError(f"{path} is not a VideoCrafter2 checkpoint: no {', '.join(p + '*' for p in missing)} "
                       f"weights (expected {UNET}*, {VAE}* and {TEXT}*, as in VideoCrafter/VideoCrafter2's model.ckpt)")
    return state, str(path)


# ----------------------------------------------------------------------------------------------- models
def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str, source: str) -> None:
    """One message for everything that does not fit: missing and unexpected keys, mismatched shapes."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
              for k in sorted(set(expected) & set(given)) if given[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(items)} {name}, e.g. {items[:3]}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if items]
        raise VpoError(f"{source}: the {what} weights do not fit VideoCrafter2's architecture: " + "; ".join(parts))


def build_unet(state: dict[str, torch.Tensor], source: str, dropout: float = 0.1) -> LVDMUNet:
    weights = _strip(state, UNET)
    try:
        config = UNetConfig.from_state_dict(weights, temporal_conv_dropout=dropout)
    except (ValueError, KeyError, StopIteration) as error:
        raise VpoError(f"{source}: {UNET}* is not VideoCrafter2's UNet ({type(error).__name__}: {error})") from None
    with torch.device("meta"):  # no random initialisation of 1.4 B parameters
        unet = LVDMUNet(config)
    check_keys(unet.state_dict(), weights, f"UNet ({UNET}*)", source)
    unet.load_state_dict(weights, assign=True)
    return unet


def build_vae(state: dict[str, torch.Tensor], source: str):
    """diffusers ``AutoencoderKL`` from the LDM keys, converted by diffusers' own single-file utilities."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    weights = {k: v for k, v in state.items() if k.startswith(VAE)}
    try:  # LDM's ddconfig, read from the shapes (VideoCrafter2: ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4)
        ch, in_channels = weights[f"{VAE}encoder.conv_in.weight"].shape[:2]
        levels = count_blocks(weights, f"{VAE}encoder.down.")
        ddconfig = dict(
            ch=ch, in_channels=in_channels, out_ch=weights[f"{VAE}decoder.conv_out.weight"].shape[0],
            ch_mult=[weights[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)],
            num_res_blocks=count_blocks(weights, f"{VAE}encoder.down.0.block."),
            z_channels=weights[f"{VAE}decoder.conv_in.weight"].shape[1])
    except KeyError as error:
        raise VpoError(f"{source}: {VAE}* is not an LDM AutoencoderKL (no {error})") from None
    original = {"model": {"params": {"scale_factor": VAE_SCALE_FACTOR,
                                     "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    config = create_vae_diffusers_config_from_ldm(original, weights)
    converted = convert_ldm_vae_checkpoint(weights, config)
    with init_empty_weights():
        vae = AutoencoderKL(**config)
    check_keys(vae.state_dict(), converted, f"VAE ({VAE}*)", source)
    vae.load_state_dict(converted, assign=True)
    return vae


def build_text_encoder(state: dict[str, torch.Tensor], source: str, tokenizer):
    """``CLIPTextModel`` of the blocks up to the penultimate one of the OpenCLIP text tower."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    layers = count_blocks(state, f"{TEXT}transformer.resblocks.") - 1  # penultimate: the last block never runs
    token_ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    try:
        config = CLIPTextConfig(**text_config(state, TEXT, layers=layers, **token_ids))
        with init_empty_weights(include_buffers=False):
            model = CLIPTextModel(config)
        expected = model.state_dict()
        target = "text_model." if "text_model.final_layer_norm.weight" in expected else ""  # transformers 4 / 5
        converted = convert_text_tower(state, TEXT, layers=layers, target=target)
    except OpenClipFormatError as error:
        raise VpoError(f"{source}: {TEXT}* is not an OpenCLIP text tower: {error}") from None
    check_keys(expected, converted, f"text encoder ({TEXT}*)", source)
    model.load_state_dict(converted, assign=True)
    return model


# ----------------------------------------------------------------------------------------------- command
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="model.ckpt, or a hub repo id such as VideoCrafter/VideoCrafter2")
    parser.add_argument("out", help="directory to write model.safetensors into (or a path ending in .safetensors)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a checkpoint that needs full unpickling (only for files you trust)")
    parser.add_argument("--dtype", default="keep", choices=["keep", "float32", "float16", "bfloat16"])
    parser.add_argument("--revision", default=None, help="hub revision")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    state, source = load_checkpoint(args.checkpoint, args.revision, args.allow_pickle)
    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    out = Path(args.out)
    target = out if out.suffix == ".safetensors" else out / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
               for k, v in sorted(state.items())}
    save_file(tensors, str(target), metadata={"format": "pt", "converted_from": source})
    print(f"wrote {target} ({len(tensors)} tensors, {sum(v.numel() for v in tensors.values()) / 1e9:.2f} B "
          f"parameters; UNet, VAE and text tower of {source})")
    return 0


# ``vpo videocrafter2 convert ...`` (mounted by the core through the vpo_register_commands hook).
def configure_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="videocrafter2_command", required=True)
    add_convert_arguments(sub.add_parser("convert", help="model.ckpt -> safetensors (never unpickled again)"))


def run_cli(args: argparse.Namespace) -> int:
    return run_convert(args)  # "convert" is the only sub-command
