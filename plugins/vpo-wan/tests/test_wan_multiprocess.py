"""Wan 2.2 A14B's two experts sharded by FSDP2 over 2 processes (gloo on CPU): each process's rows may need an
expert that the other's do not, and a step may need only one; OnlineVPO ends with the same weights as on 1 process,
with LoRA (and its reference adapter) and with full fine-tuning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from vpo_core import BuildContext
from vpo_core.testing import assert_two_processes_equal_one, fsdp_units

from vpo_wan import WanConfig, build, build_tiny_wan

pytest.importorskip("vpo_onlinevpo")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_fsdp2_with_two_experts_equals_one_process(tmp_path, full_finetune):
    tiny = build_tiny_wan(tmp_path / "tiny", variant="2.2-a14b")
    policy = (f"{{type: wan, model: {tiny}, num_frames: 9, height: 32, width: 32, num_inference_steps: 4, "
              f"micro_batch_size: 2, lora: {{rank: 4}}, full_finetune: {str(full_finetune).lower()}}}")
    # LoRA: 2e-5 on a few weights of the cross-attention's query, float noise through Adam (as under DDP)
    one = assert_two_processes_equal_one(tmp_path, policy, "wan", 1e-5 if full_finetune else 5e-5, fsdp=True)
    # both experts trained (LoRA's B starts at zero; full fine-tuning from the tiny model's weights)
    for expert in ("transformer", "transformer_2"):
        if full_finetune:
            base = load_file(str(tiny / expert / "diffusion_pytorch_model.safetensors"))
            assert any(not torch.equal(v, one[f"module.{expert}.{k}"].to(v.dtype)) for k, v in base.items())
        else:
            assert any(v.abs().sum() > 0 for k, v in one.items() if k.startswith(f"module.{expert}.")
                       and "lora_B.default" in k)


def test_fsdp2_shards_the_blocks_of_both_experts(tmp_path):
    tiny = build_tiny_wan(tmp_path / "tiny", variant="2.2-a14b")
    policy = build(WanConfig(model=str(tiny), num_frames=9, height=32, width=32, full_finetune=True),
                   BuildContext(device=torch.device("cpu"), seed=0))
    blocks = [n for n, m in policy.trainable.module.named_modules() if type(m).__name__ == "WanTransformerBlock"]
    units = fsdp_units(policy.trainable)  # the blocks diffusers declares in `_no_split_modules`
    assert units == blocks and {n.split(".")[0] for n in blocks} == {"transformer", "transformer_2"}
