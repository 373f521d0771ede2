"""The tiny VideoCrafter2 with LoRA under DDP on 2 processes (gloo on CPU): with LVDM's temporal-convolution dropout
off, OnlineVPO with a curriculum reference ends with the same adapters as on 1 process (with it on, each process
draws its own masks: equal in distribution only)."""

from __future__ import annotations

import pytest
import torch
from vpo_core.testing import assert_two_processes_equal_one

from vpo_videocrafter2.testing import build_tiny_videocrafter2

pytest.importorskip("vpo_onlinevpo")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def test_lora_with_ddp_equals_one_process_without_dropout(tmp_path):
    d = build_tiny_videocrafter2(tmp_path / "tiny")
    policy = (f"{{type: videocrafter2, model: {d}, tokenizer: {d}/tokenizer, num_frames: 4, height: 16, width: 16, "
              "num_inference_steps: 4, micro_batch_size: 3, lora: {rank: 4, alpha: 4}, temporal_conv_dropout: 0.0}")
    one = assert_two_processes_equal_one(tmp_path, policy, "videocrafter2", atol=2e-5)  # measured: 4.4e-6
    assert any(".reference." in k for k in one)  # refreshed after step 2
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B.default" in k)  # trained
