"""The tiny CogVideoX on 2 processes (gloo on CPU): OnlineVPO with a curriculum reference ends with the same weights
as on 1 process, with LoRA under DDP or FSDP2 and with full fine-tuning under FSDP2; a run resumes sharded or
unsharded; only the main process writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from vpo_core.testing import assert_two_processes_equal_one, launch_run

from vpo_cogvideox import build_tiny_cogvideox

pytest.importorskip("vpo_onlinevpo")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

POLICY = ("{{type: cogvideox, model: {d}, num_frames: 9, height: 32, width: 32, num_inference_steps: 2, "
          "micro_batch_size: 3, lora: {{rank: 4, alpha: 4}}, full_finetune: {full}}}")


@pytest.mark.parametrize("full_finetune, fsdp", [(False, False), (True, True), (False, True)],
                         ids=["lora-ddp", "full-fsdp2", "lora-fsdp2"])
def test_two_processes_equal_one(tmp_path, full_finetune, fsdp):
    tiny = build_tiny_cogvideox(tmp_path / "tiny", seed=0, max_text_length=16)
    policy = POLICY.format(d=tiny, full=str(full_finetune).lower())
    # one held-out video: the second process has none to sample (under FSDP2 it must still take part)
    held_out = ("--set", "data.eval_prompts=[a cat in the snow]", "--set", "eval.seeds_per_prompt=1")
    one = assert_two_processes_equal_one(tmp_path, policy, "cogvideox", 5e-6, *held_out, fsdp=fsdp)
    assert any((k.startswith("reference.") if full_finetune else ".reference." in k) for k in one)
    scores = [[json.loads(line)["scores"] for line in (tmp_path / str(n) / "eval.jsonl").read_text().splitlines()]
              for n in (1, 2)]
    assert len(scores[0]) == len(scores[1]) == 2  # before training and after
    for a, b in zip(*scores, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    trained = "module." if full_finetune else ".default."
    start = load_file(str(tmp_path / "1" / "checkpoints" / "step-000002" / "policy.safetensors"))
    assert any(not torch.equal(start[k], one[k]) for k in one if trained in k)  # step 3 trained
    final = "transformer/diffusion_pytorch_model.safetensors" if full_finetune else "pytorch_lora_weights.safetensors"
    a, b = (load_file(str(tmp_path / str(n) / "final" / final)) for n in (1, 2))  # gathered from the shards
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=5e-6, rtol=0) for k in a)
    if fsdp:  # 1 step, its checkpoint made before the first reference update, resumed on the other process count
        spec, plugins, engine = tmp_path / "spec.yaml", {"VPO_LOAD_PLUGINS": "cogvideox,onlinevpo"}, \
            {"ACCELERATE_USE_FSDP": "true"}
        sharded_first = 2 if full_finetune else 1  # both ways between the two settings
        first = launch_run(spec, tmp_path / "mixed", sharded_first, "--set", "train.steps=1", **plugins,
                           **(engine if sharded_first == 2 else {}))
        assert first.returncode == 0, first.stderr
        resumed = launch_run(spec, tmp_path / "mixed", 3 - sharded_first, "--resume", **plugins,
                             **(engine if sharded_first == 1 else {}))
        assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
        again = load_file(str(tmp_path / "mixed" / "checkpoints" / "step-000003" / "policy.safetensors"))
        assert again.keys() == one.keys()
        for key in one:
            torch.testing.assert_close(one[key], again[key], atol=5e-6, rtol=0, msg=key)
    # one writer: a metrics record per step, the same files as one process
    assert (tmp_path / "2" / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "1" / "metrics.jsonl").read_text().count("\n")
    assert sorted(p.name for p in (tmp_path / "2").rglob("*")) == sorted(p.name for p in (tmp_path / "1").rglob("*"))
