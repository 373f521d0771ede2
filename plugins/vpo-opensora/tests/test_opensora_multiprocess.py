"""The tiny Open-Sora with LoRA under DDP on 2 processes (gloo on CPU): OnlineVPO with a curriculum reference ends
with the same adapters as on 1 process."""

from __future__ import annotations

import pytest
import torch
from vpo_core.testing import assert_two_processes_equal_one

from vpo_opensora import build_tiny_opensora

pytest.importorskip("vpo_onlinevpo")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def test_lora_with_ddp_equals_one_process(tmp_path):
    d = build_tiny_opensora(tmp_path / "tiny", seed=0)
    policy = (f"{{type: opensora, model: {d}/transformer, vae: {d}/vae, text_encoder: {d}/text_encoder, "
              "num_frames: 17, height: 32, width: 32, num_inference_steps: 2, micro_batch_size: 3, "
              "lora: {rank: 4, alpha: 4}}")
    one = assert_two_processes_equal_one(tmp_path, policy, "opensora", atol=2e-5)  # measured: 5.3e-6
    assert any(".reference." in k for k in one)  # refreshed after step 2
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B.default" in k)  # trained
