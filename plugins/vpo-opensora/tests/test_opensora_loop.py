"""A tiny Open-Sora spec through the real training loop: OnlineVPO (dpo + best_worst) and VADER (reward_gradient)
with the core's differentiable toy reward, and a resume that lands on the same weights."""

from __future__ import annotations

import pytest
import torch
import vpo_core.testing
from safetensors.torch import load_file
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.testing import ONLINE_DPO, REWARD_GRADIENT, policy_loop_spec, trained_rows

import vpo_opensora.plugin
from vpo_opensora import build_tiny_opensora

onlinevpo = pytest.importorskip("vpo_onlinevpo.plugin")
vader = pytest.importorskip("vpo_vader.plugin")

POLICY = ("{{type: opensora, model: {d}/transformer, vae: {d}/vae, text_encoder: {d}/text_encoder, num_frames: 17, "
          "height: 32, width: 32, num_inference_steps: 2, micro_batch_size: 3, lora: {{rank: 4, alpha: 4}}}}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_opensora(tmp_path_factory.mktemp("opensora") / "tiny", seed=0)


@pytest.fixture
def pm():
    manager = PluginManager(load_entrypoints=False)
    for module, name in ((vpo_core.testing, "toy"), (onlinevpo, "onlinevpo"), (vader, "vader"),
                         (vpo_opensora.plugin, "opensora")):
        manager.register_plugin(module, name)
    return manager


def run(tmp_path, pm, tiny, section, *overrides, out="out", resume=False):
    spec = tmp_path / f"{out}.yaml"
    spec.write_text(policy_loop_spec(tmp_path / out, POLICY.format(d=tiny), 3, section))
    return Trainer(load_spec(spec, pm, list(overrides)), resume=resume, progress=False).run()


def test_onlinevpo_trains_open_sora_with_curriculum_and_resumes_to_the_same_weights(tmp_path, pm, tiny):
    result = run(tmp_path, pm, tiny, ONLINE_DPO)
    rows = trained_rows(result.output_dir)
    assert len(rows) == 3 and all(r["skipped"] == 0 and r["pairs"] == 1 for r in rows)
    assert [r["objective/reference_updated"] for r in rows] == [0, 1, 0]
    final = result.output_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    step2 = load_file(str(result.output_dir / "checkpoints" / "step-000002" / "policy.safetensors"))
    learner = {k: v for k, v in step2.items() if ".default." in k}
    assert learner and all(torch.equal(v, step2[k.replace(".default.", ".reference.")]) for k, v in learner.items())

    run(tmp_path, pm, tiny, ONLINE_DPO, "train.steps=2", out="resumed")
    resumed = run(tmp_path, pm, tiny, ONLINE_DPO, out="resumed", resume=True)
    a = load_file(str(result.output_dir / "checkpoints" / "step-000003" / "policy.safetensors"))
    b = load_file(str(resumed.output_dir / "checkpoints" / "step-000003" / "policy.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_vader_reward_gradient_trains_open_sora_lora(tmp_path, pm, tiny):
    result = run(tmp_path, pm, tiny, REWARD_GRADIENT)
    rows = trained_rows(result.output_dir)
    assert len(rows) == 3 and all(r["skipped"] == 0 for r in rows)
    assert all(r["objective/decoded_frames"] == 1 and r["objective/grad_steps"] == 1 for r in rows)
    state = load_file(str(result.output_dir / "checkpoints" / "step-000002" / "policy.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the reward gradient moved it
