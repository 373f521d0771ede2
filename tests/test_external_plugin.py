"""A plugin package made outside the repo, installed with pip, is usable from a spec without touching vpo."""

from __future__ import annotations

import os
import subprocess
import sys

from vpo_core.testing import TOY_SPEC

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "vpo-contrast-reward"
version = "0.3.0"
dependencies = []
[project.entry-points.vpo]
contrast = "vpo_contrast_reward"
[tool.setuptools]
py-modules = ["vpo_contrast_reward"]
"""

MODULE = """
from typing import ClassVar

from vpo_core import RewardConfig, hookimpl

class ContrastConfig(RewardConfig):
    differentiable: ClassVar[bool] = True
    scale: float = 1.0

    def score_dimensions(self):
        return ["contrast"]

class Contrast:
    def __init__(self, config, context):
        self.scale = config.scale
    def score(self, frames, prompts):
        return {"contrast": self.scale * frames.std(dim=(1, 2, 3, 4))}

@hookimpl
def vpo_register_rewards(register):
    register("contrast", Contrast, ContrastConfig)
"""


def install(tmp_path, dist: str, module_text: str) -> dict:
    """pip-install a plugin package made here into its own target dir; return an env that sees it."""
    src = tmp_path / dist
    src.mkdir()
    (src / "pyproject.toml").write_text(PYPROJECT.replace("vpo-contrast-reward", dist))
    (src / "vpo_contrast_reward.py").write_text(module_text)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
               VPO_EXTRA_PLUGINS="vpo_core.testing", OMP_NUM_THREADS="1")
    env.pop("VPO_LOAD_PLUGINS", None)
    return env


def vpo(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpo_core.cli", *args], env=env, capture_output=True, text=True)


def test_pip_installed_reward_plugin_runs(tmp_path):
    env = install(tmp_path, "vpo-contrast-reward", MODULE)
    listing = vpo(env, "plugins")
    assert "vpo-contrast-reward 0.3.0" in listing.stdout and "reward: contrast" in listing.stdout
    spec = tmp_path / "spec.yaml"
    spec.write_text(TOY_SPEC.format(out=tmp_path / "out").replace(
        "  - type: toy_brightness", "  - type: contrast\n    scale: 2.0").replace("steps: 6", "steps: 2"))
    done = vpo(env, "run", str(spec), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert '"reward/contrast.contrast"' in (tmp_path / "out" / "metrics.jsonl").read_text()


def test_broken_plugin_does_not_stop_others_but_its_spec_exits_3(tmp_path):
    env = install(tmp_path, "vpo-broken", "raise ImportError('missing native library libfoo.so')\n")
    listing = vpo(env, "plugins")
    assert listing.returncode == 0
    assert "BROKEN" in listing.stdout and "libfoo.so" in listing.stdout and "vpo-broken 0.3.0" in listing.stdout
    ok_spec = tmp_path / "ok.yaml"
    ok_spec.write_text(TOY_SPEC.format(out=tmp_path / "ok").replace("steps: 6", "steps: 1"))
    assert vpo(env, "run", str(ok_spec), "--no-progress").returncode == 0
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(TOY_SPEC.format(out=tmp_path / "bad").replace("  - type: toy_brightness", "  - type: contrast"))
    run = vpo(env, "run", str(bad_spec))
    assert run.returncode == 3
    assert "vpo-broken" in run.stderr and "libfoo.so" in run.stderr and "Traceback" not in run.stderr
