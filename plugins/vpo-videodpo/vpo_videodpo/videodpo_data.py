"""Reader of the pair datasets VideoDPO released (``data.pairs_format: videodpo``).

Layout, one or several directories (``data.pairs`` is such a directory, or a directory of them)::

    DIR/metadata.json   [{"basic": {"clip_path", "clip_duration", "globalidx"}, "misc": {"frame_caption": [prompt]}}, ...]
    DIR/pair.json       [{"video1": i, "video2": j, "label": 0, "frame_caption": prompt, "score": s?, "diff_score": d?}, ...]

``video1`` / ``video2`` index ``metadata.json`` of the same directory; ``video1`` is the winner (VideoDPO's
loader uses that order and ignores ``label``, which its pair writer always sets to 0). ``score`` is the
product of the two OmniScores (VideoDPO's re-weighting input), ``diff_score`` their difference (used as the
margin when present). A relative ``clip_path`` is relative to its directory.

Clips are decoded with PyAV: ``frames`` frames every ``stride`` frames from the first (stride 1 when the clip
is too short for the stride, as VideoDPO does), resized to the policy's resolution with ``F.interpolate``,
encoded with ``policy.encode`` and cached as safetensors, so each clip is encoded once.

Where this differs from the released loader, on purpose:
* indices are per directory and never shift: the released loader drops clips shorter than ``clip_length``
  from its video list but keeps indexing it with pair.json's indices (so one dropped clip mislabels every
  later pair), and concatenates several directories' videos while reading per-directory indices. Here a
  pair whose clip is shorter than ``min_clip_duration`` is dropped instead.
* the clip window starts at frame 0 (the released loader picks a random start each time), so the cached
  latents are the clip's latents.
* a pair without ``score`` gets weight 1 under re-weighting (the released loader uses score 1, i.e. 0.72**alpha).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from vpo_core import PairBatch, SpecError, VpoError

from .selector import pair_weight

VIDEODPO_FRAMES = 16  # VideoDPO trains on 16 frames at stride 4


@dataclass
class Clip:
    path: Path
    prompt: str
    duration: float | None


@dataclass
class VideoPair:
    winner: int  # index into VideoDPOPairDataset.clips
    loser: int
    prompt: str
    weight: float
    margin: float


def find_layout_dirs(path: str | Path) -> list[Path]:
    """``path`` itself if it holds pair.json + metadata.json, else its sub-directories that do."""
    root = Path(path)
    if not root.is_dir():
        raise SpecError(f"VideoDPO pair dataset '{root}' is not a directory (expected metadata.json + pair.json "
                        f"in it or in its sub-directories)", "data.pairs")
    if (root / "pair.json").is_file():
        dirs = [root]
    else:
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and (d / "pair.json").is_file())
    if not dirs:
        raise SpecError(f"no pair.json in '{root}' or its sub-directories: not a VideoDPO pair dataset "
                        f"(for pairs built by vpo use data.pairs_format: vpo)", "data.pairs")
    for d in dirs:
        if not (d / "metadata.json").is_file():
            raise SpecError(f"'{d}' has pair.json but no metadata.json (the list of clips)", "data.pairs")
    return dirs


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read '{path}': {exc}", "data.pairs") from None
    if not isinstance(data, list):
        raise SpecError(f"'{path}' must hold a JSON list, got {type(data).__name__}", "data.pairs")
    return data


def _caption(value) -> str:
    return str(value[0] if isinstance(value, list) else value)


def policy_geometry(policy) -> tuple[int | None, int | None, int | None]:
    """(frames, height, width) the policy generates, read from its config (cogvideox: num_frames/height/width;
    the toy policy: frames/size); None where unknown."""
    cfg = getattr(policy, "config", None)
    frames = getattr(cfg, "num_frames", None) or getattr(cfg, "frames", None)
    height = getattr(cfg, "height", None) or getattr(cfg, "size", None)
    width = getattr(cfg, "width", None) or getattr(cfg, "size", None)
    return frames, height, width


class VideoDPOPairDataset:
    """``len(ds)`` pairs; ``ds.batch(indices) -> PairBatch`` of cached VAE latents."""

    def __init__(self, path: str | Path, policy, *, frames: int | None = None, stride: int = 4,
                 height: int | None = None, width: int | None = None, cache_dir: str | Path | None = None,
                 alpha: float | None = None, weight_reference: float = 0.72,
                 min_clip_duration: float = 0.0) -> None:
        self.policy = policy
        p_frames, p_height, p_width = policy_geometry(policy)
        self.frames = frames or p_frames or VIDEODPO_FRAMES
        self.stride = stride
        self.height, self.width = height or p_height, width or p_width
        if not (self.height and self.width):
            raise SpecError("cannot tell the policy's resolution: set objective.clip_height and "
                            "objective.clip_width", "objective")
        self.dirs = find_layout_dirs(path)
        self.clips: list[Clip] = []
        self.pairs: list[VideoPair] = []
        self.dropped_short = 0
        for d in self.dirs:
            self._read_dir(d, alpha, weight_reference, min_clip_duration)
        if not self.pairs:
            raise SpecError(f"VideoDPO pair dataset '{path}' holds no usable pairs", "data.pairs")
        self.cache = self._cache_dir(Path(cache_dir) if cache_dir else self.dirs[0] / ".vpo-latents")

    def _read_dir(self, d: Path, alpha: float | None, reference: float, min_duration: float) -> None:
        offset = len(self.clips)
        metadata = _read_json_list(d / "metadata.json")
        missing = []
        for i, item in enumerate(metadata):
            try:
                basic = item["basic"]
                clip = Clip(d / basic["clip_path"], _caption(item.get("misc", {}).get("frame_caption", [""])),
                            basic.get("clip_duration"))
            except (KeyError, TypeError, IndexError):
                raise SpecError(f"{d / 'metadata.json'}[{i}]: expected {{basic: {{clip_path, clip_duration, "
                                f"globalidx}}, misc: {{frame_caption: [prompt]}}}}", "data.pairs") from None
            if not clip.path.is_file():
                missing.append(str(clip.path))
            self.clips.append(clip)
        if missing:
            raise SpecError(f"{len(missing)} clip(s) listed in {d / 'metadata.json'} do not exist, e.g. "
                            f"{missing[:3]}", "data.pairs")
        for i, item in enumerate(_read_json_list(d / "pair.json")):
            try:
                winner, loser = int(item["video1"]), int(item["video2"])
            except (KeyError, TypeError, ValueError):
                raise SpecError(f"{d / 'pair.json'}[{i}]: expected integer 'video1' (winner) and 'video2' "
                                f"(loser)", "data.pairs") from None
            for index in (winner, loser):
                if not 0 <= index < len(metadata):
                    raise SpecError(f"{d / 'pair.json'}[{i}]: video index {index} is outside metadata.json "
                                    f"(0..{len(metadata) - 1})", "data.pairs")
            durations = [self.clips[offset + j].duration for j in (winner, loser)]
            if any(t is not None and t < min_duration for t in durations):
                self.dropped_short += 1
                continue
            prompt = _caption(item["frame_caption"]) if "frame_caption" in item else self.clips[offset + winner].prompt
            weight = 1.0
            if alpha is not None and item.get("score") is not None:
                # "score" already is s_w * s_l: pair_weight(score, 1) == (reference / score) ** alpha
                weight = pair_weight(float(item["score"]), 1.0, alpha, reference)
            self.pairs.append(VideoPair(offset + winner, offset + loser, prompt, weight,
                                        float(item.get("diff_score", 0.0))))

    def _cache_dir(self, root: Path) -> Path:
        """A sub-directory per (policy, model, clip geometry): latents of another VAE are never reused."""
        cfg = getattr(self.policy, "config", None)
        settings = {"policy": f"{type(self.policy).__module__}.{type(self.policy).__qualname__}",
                    **{k: str(getattr(cfg, k, None)) for k in ("model", "revision", "dtype")},
                    "frames": self.frames, "stride": self.stride, "height": self.height, "width": self.width}
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        directory = root / key
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "settings.json").write_text(json.dumps(settings, indent=1))
        except OSError as exc:
            raise SpecError(f"cannot write the latent cache '{directory}' ({exc}); set objective.cache_dir to a "
                            f"writable directory", "objective.cache_dir") from None
        return directory

    def __len__(self) -> int:
        return len(self.pairs)

    # ------------------------------------------------------------------------------------------- clips
    def _cache_file(self, clip: int) -> Path:
        name = hashlib.sha1(str(self.clips[clip].path.resolve()).encode()).hexdigest()[:20]
        return self.cache / f"{name}.safetensors"

    def read_frames(self, clip: int) -> torch.Tensor:
        """Clip -> ``[T, C, H, W]`` in [0, 1] at the policy's resolution."""
        path = self.clips[clip].path
        try:
            video = read_clip(path, self.frames, self.stride)
        except VpoError:
            raise
        except Exception as exc:  # PyAV: not a video, truncated file
            raise VpoError(f"cannot decode clip '{path}': {type(exc).__name__}: {exc}") from None
        video = F.interpolate(video, size=(self.height, self.width), mode="bilinear", align_corners=False,
                              antialias=True)
        return video.clamp(0, 1)

    def latents(self, clip: int) -> torch.Tensor:
        """The clip's latents, encoded with the policy's VAE on first use and cached on disk."""
        path = self._cache_file(clip)
        if not path.exists():
            with torch.no_grad():
                latents = self.policy.encode(self.read_frames(clip)[None])[0]
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp),
                      metadata={"clip": str(self.clips[clip].path)})
            os.replace(tmp, path)  # atomic: a concurrent or interrupted writer never leaves half a file
        return load_file(str(path))["latents"]

    def batch(self, indices: list[int]) -> PairBatch:
        pairs = [self.pairs[i] for i in indices]
        return PairBatch(
            winner_latents=torch.stack([self.latents(p.winner) for p in pairs]),
            loser_latents=torch.stack([self.latents(p.loser) for p in pairs]),
            prompts=[p.prompt for p in pairs],
            weights=torch.tensor([p.weight for p in pairs], dtype=torch.float32),
            margins=torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        )


def read_clip(path: Path, frames: int, stride: int) -> torch.Tensor:
    """``frames`` frames every ``stride`` from the start; stride 1 if the clip is too short for the stride."""
    from vpo_core import read_video

    video = read_video(path, num_frames=frames, stride=stride)
    if video.shape[0] < frames and stride > 1:
        video = read_video(path, num_frames=frames, stride=1)
    if video.shape[0] < frames:
        raise VpoError(f"clip '{path}' has {video.shape[0]} frames, fewer than the {frames} needed; lower "
                       f"objective.clip_frames or drop the clip from pair.json")
    return video
