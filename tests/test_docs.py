"""The docs use only names that exist: part types, spec keys, commands, example files and output files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vpo_core.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.fixture(scope="module")
def pm():
    return PluginManager()


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_docs_stand_alone(doc):
    assert "shared/" not in doc.read_text() and "DESIGN.md" not in doc.read_text()


def test_walkthrough_names_exist(pm):
    text = (ROOT / "docs" / "walkthrough.md").read_text()
    registered = {name for kind in pm.part_types.values() for name in kind}
    types = set(re.findall(r"type: ([a-z_0-9]+)", text)) | set(re.findall(r"`([a-z_]+)` (?:reward|selector|objective)",
                                                                           text))
    assert types and types <= registered, types - registered
    for example in re.findall(r"examples/([\w.-]+\.yaml)", text):
        assert (ROOT / "examples" / example).is_file(), example
    for name in re.findall(r"`((?:onlinevpo|vader|videodpo)-[\w*-]*\.yaml)`", text):
        assert list((ROOT / "examples").glob(name)), name
    commands = set(re.findall(r"^vpo ([a-z-]+)", text, re.M))
    assert commands <= {"validate", "build-pairs", "plugins", "run", "report", "schema"}


def test_walkthrough_outputs_are_what_a_run_writes(toy_spec, toy_env):
    from vpo_core.cli import main

    assert main(["run", str(toy_spec), "--no-progress"]) == 0
    out = toy_spec.parent / "out"
    text = (ROOT / "docs" / "walkthrough.md").read_text()
    for name in ("metrics.jsonl", "eval.jsonl", "report.html", "plots", "samples", "before_after", "final",
                 "spec.yaml", "checkpoints"):
        assert name in text and (list(out.rglob(name)) or (out / name).exists()), name
