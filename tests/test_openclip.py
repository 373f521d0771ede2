"""vpo_core.openclip on a text tower alone (VideoCrafter2's case); the whole-CLIP conversion is tested by vpo-hpsv2
against an independent open_clip-style forward."""

import pytest
import torch

from vpo_core.openclip import OpenClipFormatError, convert_text_tower, text_config, text_tower_shapes


def text_tower(prefix="cond_stage_model.model."):
    g = torch.Generator().manual_seed(0)
    shapes = text_tower_shapes(width=8, blocks=3, context=5, vocab_size=10, projection_dim=4)
    return {prefix + k: torch.randn(v, generator=g) for k, v in shapes.items()}


def test_text_tower_under_a_prefix_keeps_the_first_blocks():
    sd = text_tower() | {"cond_stage_model.model.visual.proj": torch.zeros(1), "model.other": torch.zeros(1)}
    out = convert_text_tower(sd, "cond_stage_model.model.", layers=2, target="")
    assert {k.split(".")[2] for k in out if k.startswith("encoder.layers.")} == {"0", "1"}
    q, k, v = sd["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(out["encoder.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(out["final_layer_norm.bias"], sd["cond_stage_model.model.ln_final.bias"])
    assert not any("projection" in key or "logit" in key for key in out)  # CLIPTextModel has neither
    assert set(convert_text_tower(sd, "cond_stage_model.model.")) >= {"text_model.encoder.layers.2.mlp.fc2.bias"}
    config = text_config(sd, "cond_stage_model.model.", heads=2, layers=2, eos_token_id=9)
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (8, 2, 10)
    assert (config["max_position_embeddings"], config["eos_token_id"], config["hidden_act"]) == (5, 9, "gelu")


def test_unknown_or_missing_text_weights_are_named():
    sd = text_tower(prefix="")
    with pytest.raises(OpenClipFormatError, match="transformer.resblocks.0.attn.relative_bias"):
        convert_text_tower(sd | {"transformer.resblocks.0.attn.relative_bias": torch.zeros(1)})
    sd.pop("transformer.resblocks.1.mlp.c_fc.bias")
    with pytest.raises(OpenClipFormatError, match="lacks transformer.resblocks.1.mlp.c_fc.bias"):
        convert_text_tower(sd)
    with pytest.raises(OpenClipFormatError, match="missing ln_final.weight"):
        text_config({k: v for k, v in sd.items() if k != "ln_final.weight"}, heads=1)
