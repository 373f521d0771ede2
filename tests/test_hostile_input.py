"""Every file vpo parses is untrusted: hostile specs, --set values, prompt files and pair manifests each end
with exit 2 and one clear message, never a traceback, within bounded memory (limits in docs/spec.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpo_core.cli import main
from vpo_core.testing import TOY_SPEC

MAX_RSS_MB = 200  # the bound for any spec file


def _bomb(levels: int = 9) -> str:
    text = "a: &a [x,x,x,x,x,x,x,x,x]\n"
    for i in range(1, levels + 1):
        text += f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]\n"
    return text


HOSTILE = [  # (case, file bytes, fragment of the message)
    ("alias-bomb", _bomb().encode(), "expands (through aliases) to more than"),
    ("merge-key-bomb", (b"a: &a {k0: 1, k1: 2}\n" + b"".join(
        b"b%d: &b%d {<<: [*%s, *%s]}\n" % (i, i, b"a" if i == 0 else b"b%d" % (i - 1), b"a" if i == 0 else b"b%d" % (i - 1))
        for i in range(40))), "expands (through aliases)"),
    ("recursive-alias", b"policy: &p [*p]\n", "expands (through aliases)"),
    ("deep-flow-nesting", b"[" * 200_000 + b"]" * 200_000, "nests deeper than"),
    ("deep-block-nesting", "".join("  " * i + f"k{i}:\n" for i in range(200)).encode() + b"  " * 200 + b"x: 1\n",
     "nests deeper than"),
    ("huge-integer", b"seed: " + b"9" * 5000 + b"\n", "numbers are at most"),
    ("huge-float", b"train:\n  learning_rate: 1." + b"1" * 5000 + b"\n", "numbers are at most"),
    ("huge-string", b"data:\n  prompts: [" + b"a" * 20_000 + b"]\n", "strings are at most"),
    ("too-large-file", b"# padding\n" * 150_000, "larger than"),
    ("not-utf8", b"policy:\n  type: \xff\xfe toy\n", "not UTF-8"),
    ("several-documents", b"policy: {type: toy}\n---\npolicy: {type: toy}\n", "several YAML documents"),
    ("python-tag", b"policy: !!python/object/apply:os.system ['echo hacked']\n", "tags are not allowed"),
    ("custom-tag", b"policy: !include other.yaml\n", "tags are not allowed"),
    ("binary-value", b"seed: !!binary aGVsbG8=\n", "tags are not allowed"),
    ("complex-key", b"? [a, b]\n: 1\n", "must be plain names"),
    ("nul-bytes", b"policy:\n  type: t\x00oy\n", "not valid YAML"),
    ("many-values", b"[" + b"1," * 120_000 + b"1]\n", "more than 100000 values"),
]


# Runs the CLI and, at exit, writes the process's peak RSS (VmHWM, KB) to the file named by VPO_TEST_RSS.
# (getrusage's ru_maxrss would include the forking pytest process: Linux carries it across exec.)
_MEASURED = ("import atexit, os, re, runpy\n"
             "atexit.register(lambda: open(os.environ['VPO_TEST_RSS'], 'w').write("
             "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)))\n"
             "runpy.run_module('vpo_core.cli', run_name='__main__')\n")


def _run(path: Path, *extra: str) -> tuple[int, str, float, float]:
    """exit code, stderr, wall seconds and peak RSS (MB) of ``vpo run`` on ``path`` in a fresh process."""
    rss_file = path.with_suffix(".rss")
    env = dict(os.environ, VPO_EXTRA_PLUGINS="vpo_core.testing", VPO_LOAD_PLUGINS="none", VPO_TEST_RSS=str(rss_file))
    start = time.time()
    done = subprocess.run([sys.executable, "-c", _MEASURED, "run", str(path), "--no-progress", *extra], env=env,
                          capture_output=True, timeout=60)  # an unbounded parse would run for minutes
    return done.returncode, done.stderr.decode(errors="replace"), time.time() - start, \
        int(rss_file.read_text()) / 1024


@pytest.mark.parametrize("case,content,fragment", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_spec_exits_2_with_one_clear_message(case, content, fragment, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    code, stderr, seconds, rss = _run(path)
    print(f"{case}: exit {code}, {seconds:.2f} s, peak RSS <= {rss:.0f} MB")  # figures for the closing note
    assert code == 2, stderr
    assert fragment in stderr and "Traceback" not in stderr and len(stderr.splitlines()) <= 3, stderr
    assert rss < MAX_RSS_MB
    assert not (tmp_path / "runs").exists()


def test_legitimate_yaml_features_still_work(tmp_path, toy_env, capsys):
    """Anchors, aliases and merge keys within the limits are fine: specs use them to share settings."""
    text = TOY_SPEC.format(out=tmp_path / "out") + "common: &common {videos: 1}\n"
    text = text.replace("eval:\n  videos: 1\n", "eval:\n  <<: *common\n  seeds_per_prompt: 1\n")
    text = text.replace("common: &common {videos: 1}\n", "")
    text = "x-common: &common {videos: 1}\n" + text
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2  # unknown top-level key x-common: strictness is unchanged
    assert "unknown key 'x-common'" in capsys.readouterr().err
    path.write_text(TOY_SPEC.format(out=tmp_path / "out").replace(
        "eval:\n  videos: 1\n", "eval: &e\n  videos: 1\ncheckpoint: {every: 2}\n").replace("checkpoint:\n  every: 2\n", ""))
    assert main(["validate", str(path)]) == 0


@pytest.mark.parametrize("value,fragment", [
    ("9" * 5000, "numbers are at most"),
    ("[" * 5000, "nests deeper than"),
    ("!!python/object:os.system x", "tags are not allowed"),
    ("[1, 2", "not valid YAML"),
])
def test_hostile_set_values_name_the_option(value, fragment, toy_spec, toy_env, capsys):
    assert main(["validate", str(toy_spec), "--set", f"seed={value}"]) == 2
    err = capsys.readouterr().err
    assert "--set seed" in err and fragment in err and "Traceback" not in err


@pytest.mark.parametrize("content,fragment", [
    (b"a prompt\n\xff\xfe broken\n", "not UTF-8 text (line 2)"),
    (b"a prompt\n" + b"x" * 20_000 + b"\n", "line 2: a prompt longer than"),
    (b"a prompt\nwith a \x00 byte\n", "line 2"),
])
def test_hostile_prompt_files(content, fragment, tmp_path, toy_env, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    spec = tmp_path / "spec.yaml"
    spec.write_text(TOY_SPEC.format(out=tmp_path / "out").replace(
        "  prompts: [a red ball, a blue cube, a green cone, a dark sky]", f"  prompts_file: {prompts}"))
    assert main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(prompts) in err and fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before its first step: nothing left behind


# ----------------------------------------------------------------------------------------------- pair data
@pytest.fixture
def pairs(toy_spec, toy_pm, tmp_path):
    from vpo_core.offline import build_pair_dataset
    from vpo_core.spec import load_spec

    return build_pair_dataset(load_spec(toy_spec, toy_pm), tmp_path / "pairs", progress=False)


def _damage(pairs: Path, how: str) -> str:
    group = pairs / "groups" / "000001.json"
    record = json.loads(group.read_text())
    if how == "empty":
        group.write_text("")
    elif how == "not-json":
        group.write_text("{'prompt': nope")
    elif how == "deep":
        group.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "winner-out-of-range":
        record["pairs"][0]["winner"] = 7
        group.write_text(json.dumps(record))
    elif how == "weight-not-finite":
        group.write_text(json.dumps(record).replace('"weight": 1.0', '"weight": Infinity'))
    elif how == "missing-latents":
        (pairs / "groups" / "000001.safetensors").unlink()
    elif how == "duplicate-group":
        (pairs / "groups" / "1.json").write_text(group.read_text())
    return str(group.parent / "1.json") if how == "duplicate-group" else str(group)


@pytest.mark.parametrize("how,fragment", [
    ("empty", "cannot read"), ("not-json", "cannot read"), ("deep", "cannot read"),
    ("winner-out-of-range", "pairs[0]"), ("weight-not-finite", "finite numbers"),
    ("missing-latents", "latent file"), ("duplicate-group", "are the same group 1"),
])
def test_damaged_pair_dataset_exits_2_naming_the_file_before_training(how, fragment, pairs, toy_spec, toy_env,
                                                                       tmp_path, capsys):
    assert main(["validate", "--data", str(toy_spec), "--set", f"data.pairs={pairs}"]) == 0
    assert "; data: 4 training prompts, 2 held-out, 4 pairs" in capsys.readouterr().out
    named = _damage(pairs, how)
    assert main(["validate", "--data", str(toy_spec), "--set", f"data.pairs={pairs}"]) == 2  # found before a run
    assert named in capsys.readouterr().err
    assert main(["run", str(toy_spec), "--no-progress", "--set", f"data.pairs={pairs}"]) == 2
    err = capsys.readouterr().err
    assert named in err and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
