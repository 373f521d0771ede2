"""The tiny VideoCrafter2 on 2 processes (gloo on CPU): with LVDM's temporal-convolution dropout off, OnlineVPO with a
curriculum reference ends with the same weights as on 1 process (with it on, each process draws its own masks: equal
in distribution only), with LoRA under DDP and with full fine-tuning under FSDP2, which shards every UNet block."""

from __future__ import annotations

import pytest
import torch
from vpo_core import BuildContext
from vpo_core.testing import assert_full_finetuning_trained, assert_two_processes_equal_one, fsdp_units

from vpo_videocrafter2 import build
from vpo_videocrafter2.testing import build_tiny_videocrafter2, tiny_config

pytest.importorskip("vpo_onlinevpo")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


POLICY = ("{{type: videocrafter2, model: {d}, tokenizer: {d}/tokenizer, num_frames: 4, height: 16, width: 16, "
          "num_inference_steps: 4, micro_batch_size: 3, lora: {{rank: 4, alpha: 4}}, temporal_conv_dropout: 0.0, "
          "full_finetune: {full}}}")


def test_lora_with_ddp_equals_one_process_without_dropout(tmp_path):
    d = build_tiny_videocrafter2(tmp_path / "tiny")
    one = assert_two_processes_equal_one(tmp_path, POLICY.format(d=d, full="false"), "videocrafter2",
                                         atol=2e-5)  # measured: 4.4e-6
    assert any(".reference." in k for k in one)  # refreshed after step 2
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B.default" in k)  # trained


def test_fsdp2_shards_each_block_of_the_unet(tmp_path):
    d = build_tiny_videocrafter2(tmp_path / "tiny")
    policy = build(tiny_config(d), BuildContext(device=torch.device("cpu"), seed=0))
    # the input and the output blocks, not only the longest list: the rest is gathered around every forward pass
    assert fsdp_units(policy.trainable) == [*(f"input_blocks.{i}" for i in range(4)), "init_attn", "middle_block",
                                            *(f"output_blocks.{i}" for i in range(4))]


def test_full_finetuning_with_fsdp2_equals_one_process_without_dropout(tmp_path):
    d = build_tiny_videocrafter2(tmp_path / "tiny")
    one = assert_two_processes_equal_one(tmp_path, POLICY.format(d=d, full="true"), "videocrafter2", atol=1e-5,
                                         fsdp=True)  # measured: 2.9e-6
    start = build(tiny_config(d, full_finetune=True), BuildContext(device=torch.device("cpu"), seed=0))
    assert_full_finetuning_trained(one, start.trainable, "output_blocks.")
