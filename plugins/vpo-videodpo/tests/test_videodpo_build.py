"""`vpo videodpo build-pairs` on the toy policy and reward: dataset-level filter, resume, then training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import vpo_core.testing
import vpo_videodpo.plugin
from vpo_core import SpecError, hookimpl
from vpo_core.cli import main
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_videodpo import OmniScore, OmniScoreSelectorConfig, open_vpo_pairs, select_pairs
from vpo_videodpo.build import build_videodpo_pairs

torch.set_num_threads(1)

SPEC = """\
output_dir: {out}
seed: 5
policy: {{type: toy, frames: 3, size: 4, steps: 2}}
rewards:
  - {{type: toy_brightness, name: toy}}
selector:
  type: omniscore
  quality: {{toy.brightness: {{}}, toy.smoothness: {{weight: 2}}}}
  semantic: {{}}
  keep_top_fraction: 0.75
  alpha: 1.0
objective: {{type: videodpo_dpo, beta: 50}}
data:
  prompts: [a red ball, a blue cube, a green cone, a dark sky, a cat, a dog, a tree, a car]
train: {{steps: 2, candidates_per_prompt: 3, pairs_per_step: 2, learning_rate: 0.003}}
eval: {{videos: 0, seeds_per_prompt: 1}}
checkpoint: {{every: 0}}
logging: {{trackers: []}}
"""


@pytest.fixture
def pm() -> PluginManager:
    pm = PluginManager(load_entrypoints=False)
    pm.register_plugin(vpo_core.testing, "toy")
    pm.register_plugin(vpo_videodpo.plugin, "videodpo")
    return pm


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(out=tmp_path / "run"))
    return path


def groups(directory: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((directory / "groups").glob("[0-9]*.json"))}


def test_build_filters_over_the_whole_dataset(spec, pm, tmp_path):
    resolved = load_spec(spec, pm)
    out = tmp_path / "pairs"
    summary = build_videodpo_pairs(resolved, out, progress=False)
    assert summary["groups"] == 8 and summary["pairs"] == 6  # int(8 * 0.25) = 2 smallest gaps dropped
    stored = groups(out)
    assert sum(len(g["pairs"]) for g in stored.values()) == 6
    # the kept pairs are exactly those a dataset-wide selection picks from the stored scores
    config: OmniScoreSelectorConfig = resolved.selector.config
    omni = [OmniScore(config)({k: torch.tensor(v) for k, v in g["scores"].items()}) for g in stored.values()]
    expected = select_pairs(omni, 0.75, alpha=1.0)
    got = [(i, p["winner"], p["loser"]) for i, g in enumerate(stored.values()) for p in g["pairs"]]
    assert got == [(p.prompt_index, p.winner, p.loser) for p in expected]
    gaps = sorted(float(max(o) - min(o)) for o in omni)
    kept_gaps = sorted(p["margin"] for g in stored.values() for p in g["pairs"])
    assert kept_gaps == pytest.approx(gaps[2:])  # the two smallest gaps are the ones dropped
    for g in stored.values():
        for p in g["pairs"]:
            s_w, s_l = g["omniscore"][p["winner"]], g["omniscore"][p["loser"]]
            assert p["weight"] == pytest.approx(0.72 / (s_w * s_l)) and s_w > s_l
    assert json.loads((out / "meta.json").read_text())["videodpo"]["pairs"] == 6


def test_build_resumes_after_deleted_groups_and_interruption(spec, pm, tmp_path):
    resolved = load_spec(spec, pm)
    out = tmp_path / "pairs"
    build_videodpo_pairs(resolved, out, progress=False)
    before = groups(out)
    latents_before = (out / "groups" / "000003.safetensors").read_bytes()
    for name in ("000003.json", "000003.safetensors", "000006.json"):
        (out / "groups" / name).unlink()
    build_videodpo_pairs(resolved, out, progress=False)
    assert groups(out) == before
    assert (out / "groups" / "000003.safetensors").read_bytes() == latents_before

    # An interrupted sampling pass (here: the reward fails on its 2nd call) leaves a dataset that training
    # refuses until the command is run again, which then continues where it stopped.
    for name in ("000001.json", "000004.json", "000007.json"):
        (out / "groups" / name).unlink()
    pm.register_plugin(FlakyPlugin(), "flaky")
    flaky = load_spec(spec, pm, ["rewards=[{type: toy_flaky, name: toy}]"])
    FlakyReward.calls = 0
    with pytest.raises(KeyboardInterrupt):
        build_videodpo_pairs(flaky, out, progress=False)
    assert len(groups(out)) == 6  # one more group written before the interruption
    with pytest.raises(SpecError, match="build-pairs"):
        open_vpo_pairs(out)
    FlakyReward.calls = -100
    build_videodpo_pairs(flaky, out, progress=False)
    assert FlakyReward.calls == -98  # only the two missing groups were sampled and scored
    assert groups(out) == before
    assert len(open_vpo_pairs(out)) == 6

    # an interrupted finalise (meta unmarked, pairs stale) is redone from the stored scores
    meta = json.loads((out / "meta.json").read_text())
    del meta["videodpo"]
    (out / "meta.json").write_text(json.dumps(meta))
    stale = json.loads((out / "groups" / "000000.json").read_text())
    stale["pairs"] = []
    (out / "groups" / "000000.json").write_text(json.dumps(stale))
    build_videodpo_pairs(resolved, out, progress=False)
    assert groups(out) == before


def test_train_on_built_pairs_and_reweight(spec, pm, tmp_path):
    out = tmp_path / "pairs"
    build_videodpo_pairs(load_spec(spec, pm), out, progress=False)
    resolved = load_spec(spec, pm, [f"data.pairs={out}", "train.gradient_accumulation_steps=2"])
    result = Trainer(resolved, progress=False).run()
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0 and not r.get("final")]
    assert len(trained) == 2 and all(r["skipped"] == 0 and r["pairs"] == 4 for r in trained)  # 2 micro-steps x 2
    assert all("objective/implicit_accuracy" in r for r in trained)
    # weights: as stored by the build (alpha 1), recomputed with another alpha, or 1 with alpha 0
    stored = open_vpo_pairs(out)
    assert any(abs(r.weight - 1) > 1e-3 for r in stored.records)
    squared = open_vpo_pairs(out, alpha=2.0)
    assert [r.weight for r in squared.records] == pytest.approx([r.weight ** 2 for r in stored.records])
    assert all(r.weight == 1.0 for r in open_vpo_pairs(out, alpha=0.0).records)


def test_dpo_loss_uses_weights_and_noise_switch():
    from vpo_core import BuildContext, PairBatch, StepContext
    from vpo_videodpo import VideoDPOConfig, VideoDPOObjective

    policy = vpo_core.testing.ToyPolicy(vpo_core.testing.ToyPolicyConfig(frames=2, size=4),
                                        BuildContext(torch.device("cpu"), 0))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 3, 4, 4, generator=g)

    def loss(weights, loser=None, **cfg):
        obj = VideoDPOObjective(VideoDPOConfig(**cfg))
        batch = PairBatch(latents, latents if loser is None else loser, ["a cat", "a dog"], torch.tensor(weights))
        ctx = StepContext(step=1, generator=torch.Generator().manual_seed(1), score=None)
        return obj.loss(policy, batch, ctx).loss.item()

    with torch.no_grad():  # the policy moves away from its (fixed) reference
        for param in policy.trainable_parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g))
    # winner == loser with shared t and noise: d_theta = d_ref = 0, each pair's loss is log 2 times its weight
    assert loss([1.0, 1.0]) == pytest.approx(math.log(2), rel=1e-5)
    assert loss([3.0, 0.0]) == pytest.approx(1.5 * math.log(2), rel=1e-5)
    # independent draws (VideoDPO's code) make the two denoising losses differ
    assert abs(loss([1.0, 1.0], shared_noise=False, beta=1.0) - math.log(2)) > 1e-4
    other = latents + 1.0
    assert loss([2.0, 2.0], other, beta=1.0) == pytest.approx(2 * loss([1.0, 1.0], other, beta=1.0), rel=1e-6)
    assert VideoDPOConfig().beta == 5000 and VideoDPOConfig().shared_noise is True
    assert VideoDPOObjective(VideoDPOConfig()).after_optimizer_step(1, policy) == {}


def test_cli_build_pairs_then_errors(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VPO_EXTRA_PLUGINS", "vpo_core.testing")
    monkeypatch.setenv("VPO_LOAD_PLUGINS", "videodpo")
    out = tmp_path / "cli-pairs"
    assert main(["videodpo", "build-pairs", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "6 pairs from 8 prompts" in capsys.readouterr().out
    # a spec without the omniscore selector is refused with a message naming the fix
    code = main(["videodpo", "build-pairs", str(spec), "--out", str(tmp_path / "x"),
                 "--set", "selector={type: toy_best_worst}"])
    assert code == 2 and "type: omniscore" in capsys.readouterr().err
    assert main(["validate", str(spec), "--set", f"data.pairs={out}"]) == 0


class FlakyReward(vpo_core.testing.ToyReward):
    """The toy reward, interrupted (like Ctrl-C) on its second call."""

    calls = 0

    def score(self, frames, prompts):
        FlakyReward.calls += 1
        if FlakyReward.calls == 2:
            raise KeyboardInterrupt
        return super().score(frames, prompts)


class FlakyPlugin:
    @hookimpl
    def vpo_register_rewards(self, register):
        register("toy_flaky", FlakyReward, vpo_core.testing.ToyRewardConfig)
