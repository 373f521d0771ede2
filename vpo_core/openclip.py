"""open_clip ViT CLIP state dicts -> transformers CLIP state dicts (the one such conversion in vpo).

open_clip and transformers' CLIP are the same network with other parameter names, except that open_clip keeps
the attention's q/k/v in one ``in_proj`` matrix and stores the output projections as ``[width, embed_dim]``
matrices applied as ``x @ proj`` (transformers: Linear). Two targets:

* ``convert_clip``: a whole CLIP (image + text tower, e.g. HPSv2) -> ``CLIPModel`` keys;
* ``convert_text_tower``: a text tower alone (e.g. VideoCrafter2's ``cond_stage_model.model.*``) -> ``CLIPTextModel``
  keys, optionally only its first ``layers`` blocks (a penultimate-layer encoder never runs the last one).

``clip_config`` / ``text_config`` read the sizes from the weights' shapes (so a tiny checkpoint gives a tiny model)
and return keyword arguments for transformers' ``CLIPConfig`` / ``CLIPTextConfig``. Pure torch: no transformers import.
"""

from __future__ import annotations

import re

import torch

from .errors import VpoError

# Head counts cannot be read from weight shapes. open_clip's ViTs use 64-wide heads except ViT-H/14's vision
# tower (1280 wide, 80-wide heads -> 16); text towers use 64-wide heads.
KNOWN_VISION_HEADS = {1280: 16}
HEAD_WIDTH = 64

TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
VISION_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
               "visual.ln_post.weight", "visual.proj")
# Weights of a text tower that CLIPTextModel has no place for (it has no projection and no logit scale), and
# buffers older open_clip versions saved (the causal mask).
TEXT_ONLY_IGNORED = ("text_projection", "logit_scale")
IGNORED = ("attn_mask", "visual.attn_mask")

# Per-block renames (both towers): open_clip suffix -> transformers suffix. attn.in_proj_* is split apart.
BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


class OpenClipFormatError(VpoError):
    """The state dict is not an open_clip ViT CLIP (or text tower) in the expected layout."""


def count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _require(state_dict: dict[str, torch.Tensor], keys, what: str) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise OpenClipFormatError(f"not an open_clip {what} state dict: missing {', '.join(missing[:5])}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _heads(width: int, override: int | None, known: dict[int, int], tower: str) -> int:
    heads = override or known.get(width) or (width // HEAD_WIDTH if width % HEAD_WIDTH == 0 else None)
    if not heads or width % heads:
        raise OpenClipFormatError(f"cannot infer the {tower} tower's attention head count for width {width}; "
                                  f"give it explicitly ({tower}_heads)")
    return heads


def text_config(state_dict: dict[str, torch.Tensor], prefix: str = "", heads: int | None = None,
                layers: int | None = None, **token_ids: int) -> dict:
    """``CLIPTextConfig`` keyword arguments of the text tower under ``prefix`` (``layers``: keep only the first
    blocks; ``token_ids``: eos/bos/pad ids)."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    _require(sd, TEXT_KEYS, f"text tower (prefix {prefix!r})")
    total = count_blocks(sd, "transformer.resblocks.")
    if not total or (layers is not None and not 0 < layers <= total):
        raise OpenClipFormatError(f"open_clip text tower under {prefix!r} has {total} blocks; cannot keep {layers}")
    vocab_size, width = sd["token_embedding.weight"].shape
    return dict(hidden_size=width, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=total if layers is None else layers,
                num_attention_heads=_heads(width, heads, {}, "text"), vocab_size=vocab_size,
                max_position_embeddings=sd["positional_embedding"].shape[0],
                projection_dim=sd["text_projection"].shape[1] if "text_projection" in sd else width,
                hidden_act="gelu", layer_norm_eps=1e-5, **token_ids)  # ViT-H-14 uses exact GELU


def clip_config(state_dict: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None,
                **token_ids: int) -> dict:
    """``CLIPConfig`` keyword arguments of a whole open_clip ViT CLIP."""
    _require(state_dict, VISION_KEYS + TEXT_KEYS + ("text_projection", "logit_scale"), "ViT CLIP (HPSv2 format)")
    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    num_patches = state_dict["visual.positional_embedding"].shape[0] - 1
    grid = int(round(num_patches**0.5))
    vision_layers = count_blocks(state_dict, "visual.transformer.resblocks.")
    if grid * grid != num_patches or not vision_layers:
        raise OpenClipFormatError("open_clip state dict has no square patch grid or no vision transformer blocks")
    projection_dim = state_dict["text_projection"].shape[1]
    if state_dict["visual.proj"].shape[1] != projection_dim:
        raise OpenClipFormatError("visual.proj and text_projection project to different sizes")
    vision = dict(hidden_size=vision_width,
                  intermediate_size=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=vision_layers,
                  num_attention_heads=_heads(vision_width, vision_heads, KNOWN_VISION_HEADS, "vision"),
                  patch_size=patch_size, image_size=grid * patch_size, projection_dim=projection_dim,
                  hidden_act="gelu", layer_norm_eps=1e-5)
    text = text_config(state_dict, heads=text_heads, **token_ids)
    return dict(projection_dim=projection_dim, vision_config=vision, text_config=text)


def text_tower_shapes(width: int, blocks: int, context: int = 77, vocab_size: int = 49408,
                      projection_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an open_clip text tower (``token_embedding``, ``transformer.resblocks.*``, ...), e.g. to
    write tiny random checkpoints in the published layout."""
    shapes = {"token_embedding.weight": (vocab_size, width), "positional_embedding": (context, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,),
              "text_projection": (width, projection_dim or width), "logit_scale": ()}
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        shapes |= {p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,)}
        for name, shape in (("ln_1", (width,)), ("ln_2", (width,)), ("attn.out_proj", (width, width)),
                            ("mlp.c_fc", (4 * width, width)), ("mlp.c_proj", (width, 4 * width))):
            shapes |= {f"{p}{name}.weight": shape, f"{p}{name}.bias": (shape[0],)}
    return shapes


class _KeyReader:
    """Reads keys of the original state dict and remembers which ones were used (to catch unknown weights)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], prefix: str = ""):
        self.state_dict, self.prefix = state_dict, prefix
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        key = self.prefix + key
        if key not in self.state_dict:
            raise OpenClipFormatError(f"open_clip state dict lacks {key} (truncated, or another architecture)")
        self.used.add(key)
        return self.state_dict[key]

    def check_all_used(self, ignored: set[str]) -> None:
        unknown = sorted(k for k in self.state_dict if k.startswith(self.prefix) and k not in self.used | ignored)
        if unknown:
            raise OpenClipFormatError("open_clip state dict has weights a plain ViT CLIP does not have (another "
                                      "open_clip architecture?): " + ", ".join(unknown[:5]))


def _convert_blocks(sd: _KeyReader, source: str, target: str, num_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(num_layers):
        src, dst = f"{source}{i}.", f"{target}{i}."
        weights = sd[src + "attn.in_proj_weight"].chunk(3, dim=0)
        biases = sd[src + "attn.in_proj_bias"].chunk(3, dim=0)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            out[f"{dst}self_attn.{name}.weight"], out[f"{dst}self_attn.{name}.bias"] = weight, bias
        for old, new in BLOCK_RENAMES.items():
            for param in ("weight", "bias"):
                out[f"{dst}{new}.{param}"] = sd[f"{src}{old}.{param}"]
    return out


def _text_tower(sd: _KeyReader, num_layers: int, target: str = "text_model.") -> dict[str, torch.Tensor]:
    out = {
        f"{target}embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{target}embeddings.position_embedding.weight": sd["positional_embedding"],
        f"{target}final_layer_norm.weight": sd["ln_final.weight"],
        f"{target}final_layer_norm.bias": sd["ln_final.bias"],
    }
    return out | _convert_blocks(sd, "transformer.resblocks.", f"{target}encoder.layers.", num_layers)


def convert_text_tower(state_dict: dict[str, torch.Tensor], prefix: str = "", layers: int | None = None,
                       target: str = "text_model.") -> dict[str, torch.Tensor]:
    """The open_clip text tower under ``prefix`` -> ``CLIPTextModel`` keys under ``target`` (``text_model.`` up to
    transformers 4, none from 5). ``layers``: convert only the first blocks. Dropped: the later blocks, an image
    tower (``visual.*``) and the projection / logit scale that CLIPTextModel has no place for."""
    blocks = prefix + "transformer.resblocks."
    layers = count_blocks(state_dict, blocks) if layers is None else layers
    sd = _KeyReader(state_dict, prefix)
    out = _text_tower(sd, layers, target)
    dropped = {k for k in state_dict if k.startswith(prefix + "visual.")
               or (k.startswith(blocks) and int(k[len(blocks):].split(".")[0]) >= layers)}
    sd.check_all_used(dropped | {prefix + k for k in TEXT_ONLY_IGNORED + IGNORED})
    return out


def convert_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole open_clip ViT CLIP -> ``CLIPModel`` keys (renames, q/k/v split, projection transposes)."""
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
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    out |= _convert_blocks(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.",
                           count_blocks(state_dict, "visual.transformer.resblocks."))
    out |= _text_tower(sd, count_blocks(state_dict, "transformer.resblocks."))
    sd.check_all_used(set(IGNORED))
    return out
