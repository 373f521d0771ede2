"""Re-weighting on stored pairs: pairs with an OmniScore <= 0 are skipped and counted; weights are capped."""

from __future__ import annotations

import json

import pytest
import torch
import vpo_core.testing
from vpo_core import BuildContext, Pair, PairBatch, PairDatasetWriter, SpecError, StepContext
from vpo_videodpo import VideoDPOConfig, VideoDPOObjective, open_vpo_pairs

torch.set_num_threads(1)


def write_vpo_pairs(directory, omniscores: list[float], pairs: list[tuple[int, int]]):
    writer = PairDatasetWriter(directory)
    writer.write_group(0, "a cat", torch.zeros(len(omniscores), 1, 3, 2, 2), list(range(len(omniscores))),
                       {"vb.x": torch.tensor(omniscores)}, [Pair(0, w, l, 1.0) for w, l in pairs])
    group = directory / "groups" / "000000.json"
    group.write_text(json.dumps(json.loads(group.read_text()) | {"omniscore": omniscores}))
    return directory


def test_stored_pairs_with_a_score_at_or_below_zero_are_skipped(tmp_path, capsys):
    out = write_vpo_pairs(tmp_path / "pairs", [0.9, 0.0, 0.5, -0.3, 0.05], [(0, 1), (0, 2), (2, 3), (0, 4)])
    data = open_vpo_pairs(out, alpha=1.0)
    assert [(r.winner, r.loser) for r in data.records] == [(0, 2), (0, 4)]
    assert [r.weight for r in data.records] == pytest.approx([0.72 / 0.45, 10.0])  # 0.72 / 0.045 = 16 -> cap
    assert data.skipped_nonpositive_score == 2 and "skipped 2 of 4 pairs" in capsys.readouterr().err
    assert len(open_vpo_pairs(out, alpha=0.0).records) == 4 and len(open_vpo_pairs(out).records) == 4
    assert open_vpo_pairs(out, alpha=1.0, max_weight=None).records[1].weight == pytest.approx(16.0)
    only_bad = write_vpo_pairs(tmp_path / "bad", [0.9, 0.0], [(0, 1)])
    with pytest.raises(SpecError, match="every pair .* OmniScore <= 0"):
        open_vpo_pairs(only_bad, alpha=1.0)


def test_loss_caps_stored_weights():
    policy = vpo_core.testing.ToyPolicy(vpo_core.testing.ToyPolicyConfig(frames=2, size=4),
                                        BuildContext(torch.device("cpu"), 0))
    latents = torch.randn(4, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def loss(weights, max_weight):
        batch = PairBatch(latents[:2], latents[2:], ["a cat", "a dog"], torch.tensor(weights))
        objective = VideoDPOObjective(VideoDPOConfig(beta=50.0, max_weight=max_weight))
        return objective.loss(policy, batch, StepContext(step=1, generator=torch.Generator().manual_seed(1),
                                                         score=None))

    capped = loss([1.0, 7e5], 2.0)
    assert capped.metrics["weights_capped"] == 1.0
    torch.testing.assert_close(capped.loss, loss([1.0, 2.0], 2.0).loss)
    assert loss([1.0, 7e5], None).loss > 1000 * capped.loss  # without a cap one pair dominates
