"""Malformed specs: each exits 2 (or 3 for a missing plugin) with a short message naming field and line."""

from __future__ import annotations

import pytest

from vpo_core.cli import main

from vpo_core.testing import TOY_SPEC

BASE = TOY_SPEC.format(out="OUT")


def replace(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


# (case id, spec text, expected exit code, fragments the message must contain; "@x": "line N" of the line with x)
CASES = [
    ("unknown-top-key", BASE + "trian:\n  steps: 3\n", 2, ["unknown key 'trian'", "did you mean 'train'", "@trian"]),
    ("unknown-train-key", replace("  steps: 6", "  stepz: 6"), 2, ["train.stepz", "did you mean 'steps'", "@stepz"]),
    ("steps-not-int", replace("  steps: 6", "  steps: many"), 2, ["train.steps", "@steps: many", "integer"]),
    ("steps-zero", replace("  steps: 6", "  steps: 0"), 2, ["train.steps", "greater than or equal to 1"]),
    ("negative-lr", replace("  learning_rate: 0.003", "  learning_rate: -1"), 2, ["train.learning_rate", "@learning_rate: -1"]),
    ("lr-string", replace("  learning_rate: 0.003", "  learning_rate: fast"), 2, ["train.learning_rate"]),
    ("candidates-one", replace("  candidates_per_prompt: 3", "  candidates_per_prompt: 1"), 2,
     ["train.candidates_per_prompt", "@candidates_per_prompt: 1"]),
    ("bad-mixed-precision", replace("  learning_rate: 0.003", "  learning_rate: 0.003\n  mixed_precision: fp8"), 2,
     ["train.mixed_precision"]),
    ("unknown-policy-type", replace("  type: toy\n", "  type: toyy\n"), 2, ["policy.type", "did you mean 'toy'", "@type: toyy"]),
    ("plugin-filtered-out", replace("  type: toy\n", "  type: cogvideox\n"), 3,
     ["policy.type", "vpo-cogvideox, which is installed but not loaded", "VPO_LOAD_PLUGINS=none-installed"]),
    ("unknown-objective", replace("  type: toy_dpo", "  type: nonsense"), 2, ["objective.type", "unknown objective"]),
    ("plugin-config-unknown-key", replace("  beta: 50", "  betta: 50"), 2, ["objective.betta", "did you mean 'beta'", "@betta"]),
    ("plugin-config-bad-type", replace("  beta: 50", "  beta: huge"), 2, ["objective.beta", "@beta: huge"]),
    ("reward-unknown-dimension", replace("  - type: toy_brightness", "  - type: toy_brightness\n    dimensions: [loudness]"),
     2, ["rewards[0].dimensions[0]", "@loudness"]),
    ("reward-weight-string", replace("  - type: toy_brightness", "  - type: toy_brightness\n    weight: heavy"), 2,
     ["rewards[0].weight"]),
    ("duplicate-reward-names", replace("  - type: toy_brightness", "  - type: toy_brightness\n  - type: toy_brightness"),
     2, ["named 'toy_brightness'"]),
    ("missing-policy", BASE.replace("policy:\n  type: toy\n", ""), 2, ["policy", "required key is missing"]),
    ("missing-type", replace("policy:\n  type: toy\n", "policy:\n  frames: 4\n"), 2, ["policy.type", "required"]),
    ("rewards-not-list", replace("rewards:\n  - type: toy_brightness\n", "rewards: toy_brightness\n"), 2, ["rewards", "@rewards: toy"]),
    ("no-selector-online", replace("selector:\n  type: toy_best_worst\n", ""), 2, ["selector", "best_worst"]),
    ("no-data", replace("  prompts: [a red ball, a blue cube, a green cone, a dark sky]\n", ""), 2, ["data", "prompts"]),
    ("prompts-file-missing", replace("  eval_prompts:", "  prompts_file: /nonexistent/p.txt\n  eval_prompts:"), 2,
     ["data.prompts_file", "does not exist"]),
    ("not-yaml", "policy: [unclosed\n  type: toy\n", 2, ["not valid YAML", "line"]),
    ("tab-indent", "policy:\n\ttype: toy\n", 2, ["not valid YAML", "line 2"]),
    ("top-level-list", "- a\n- b\n", 2, ["must be a YAML mapping", "line 1"]),
    ("python-object-tag", "policy: !!python/object/apply:os.system ['echo hacked']\n", 2, ["tags are not allowed"]),
    ("empty-file", "", 2, ["is empty"]),
    ("only-comments", "# nothing here\n", 2, ["is empty"]),
    ("trackers-unknown", replace("  trackers: []", "  trackers: [mlflow]"), 2, ["logging.trackers"]),
    ("adam-betas-wrong-length", replace("  learning_rate: 0.003", "  learning_rate: 0.003\n  adam_betas: [0.9]"), 2,
     ["train.adam_betas"]),
]


@pytest.mark.parametrize("case,text,code,fragments", CASES, ids=[c[0] for c in CASES])
def test_malformed_spec(case, text, code, fragments, tmp_path, toy_env, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace("OUT", str(tmp_path / "out")))
    assert main(["validate", str(path)]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        if fragment.startswith("@"):  # "@needle": the line number of the first line containing needle
            fragment = f"line {next(i for i, ln in enumerate(text.splitlines(), 1) if fragment[1:] in ln)}"
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    # `vpo run` fails the same way and writes nothing
    assert main(["run", str(path), "--no-progress"]) == code
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path, toy_env, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_directory(tmp_path, toy_env, capsys):
    assert main(["run", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_usage_error_exits_2(toy_env, capsys):
    assert main(["run"]) == 2
    assert main(["frobnicate"]) == 2


def test_valid_spec(toy_spec, toy_env, capsys):
    assert main(["validate", str(toy_spec)]) == 0
    assert "valid (online pairs" in capsys.readouterr().out


def test_set_override_is_validated(toy_spec, toy_env, capsys):
    assert main(["validate", str(toy_spec), "--set", "train.steps=-3"]) == 2
    err = capsys.readouterr().err
    assert "train.steps (from --set train.steps=-3)" in err and "line" not in err  # not the file's line 22
    assert main(["validate", str(toy_spec), "--set", "objective.betta=3"]) == 2
    assert "objective.betta (from --set objective.betta=3): unknown key" in capsys.readouterr().err
    assert main(["validate", str(toy_spec), "--set", "train.steps=[1, 2"]) == 2
    assert "--set train.steps=...: not valid YAML" in capsys.readouterr().err


def test_mixed_precision_no_needs_no_quotes(toy_spec, toy_env, capsys):
    # YAML reads an unquoted `no` as false; the documented value must still be accepted, in the file or with --set
    text = toy_spec.read_text()
    toy_spec.write_text(text.replace("  learning_rate: 0.003", "  learning_rate: 0.003\n  mixed_precision: no"))
    assert main(["validate", str(toy_spec)]) == 0
    assert main(["validate", str(toy_spec), "--set", "train.mixed_precision=no"]) == 0
    assert main(["validate", str(toy_spec), "--set", "train.mixed_precision=false"]) == 0
    assert main(["validate", str(toy_spec), "--set", "train.mixed_precision=true"]) == 2
    assert "train.mixed_precision (from --set train.mixed_precision=true)" in capsys.readouterr().err


def test_schema_includes_plugin_configs(toy_env, capsys):
    import json

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    text = json.dumps(schema)
    assert "toy_dpo" in text and "beta" in text and "reference_update_every" in text


def test_plugin_not_installed_says_what_to_install(tmp_path, toy_env, capsys, monkeypatch):
    import importlib.metadata as md

    from vpo_core import plugins

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(plugins.md, "distribution", missing)
    path = tmp_path / "spec.yaml"
    path.write_text(replace("  type: toy\n", "  type: cogvideox\n"))
    assert main(["validate", str(path)]) == 3
    assert "policy 'cogvideox' is not installed. Install it with: pip install vpo-cogvideox" in capsys.readouterr().err
