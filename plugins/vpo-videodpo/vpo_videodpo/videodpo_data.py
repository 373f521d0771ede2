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

Checked when the data set is opened, before any training step:
* both JSON files are non-empty lists whose entries have the fields above with the right types, and every
  index lies inside metadata.json; each error names the file and the entry (``pair.json[12]``);
* ``clip_path`` lies inside ``data.pairs`` (after resolving ``..``; symbolic links placed inside the data set
  are the data set's own business and are followed) unless ``allow_outside_paths``;
* every clip exists, and every clip a pair uses and the cache does not hold yet decodes to enough frames;
* self-pairs (both sides the same clip file) are dropped, and so are repeated pairs (same winner clip, loser
  clip and prompt) unless ``drop_duplicate_pairs`` is false; the counts are printed and kept in ``dropped``.
The latent cache goes to ``cache_dir``, else the run's directory, else the user's cache directory, and is
refused inside the data set, which may be read-only or shared.

Where this differs from the released loader, on purpose:
* indices are per directory and never shift: the released loader drops clips shorter than ``clip_length``
  from its video list but keeps indexing it with pair.json's indices (so one dropped clip mislabels every
  later pair), and concatenates several directories' videos while reading per-directory indices. Here a
  pair whose clip is shorter than ``min_clip_duration`` is dropped instead.
* the clip window starts at frame 0 (the released loader picks a random start each time), so the cached
  latents are the clip's latents.
* a pair without ``score`` gets weight 1 under re-weighting (the released loader uses score 1, i.e. 0.72**alpha);
  a pair whose ``score`` is <= 0 has no weight and is dropped (counted) when ``alpha`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from vpo_core import PairBatch, SpecError, VpoError

from .selector import DEFAULT_MAX_WEIGHT, pair_weight

VIDEODPO_FRAMES = 16  # VideoDPO trains on 16 frames at stride 4
ENTRY_FORMAT = {
    "metadata.json": "{basic: {clip_path: str, clip_duration: seconds, globalidx}, misc: {frame_caption: [prompt]}}",
    "pair.json": "{video1: winner index, video2: loser index, label, frame_caption: prompt, score?, diff_score?}",
}
DROP_REASONS = {"self_pair": "self-pairs (video1 and video2 are the same clip)",
                "duplicate": "repeated pairs (same winner, loser and prompt)",
                "short_clip": "pairs with a clip shorter than min_clip_duration",
                "nonpositive_score": "pairs whose score is <= 0 (no re-weighting weight)"}


@dataclass
class Clip:
    path: Path
    prompt: str | None
    duration: float | None
    entry: str  # "DIR/metadata.json[i]", for messages


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SpecError(f"cannot read '{path}' as JSON: {exc}", "data.pairs") from None
    if not isinstance(data, list):
        raise SpecError(f"'{path}' must hold a JSON list of {ENTRY_FORMAT[path.name]}, got "
                        f"{type(data).__name__}", "data.pairs")
    if not data:
        raise SpecError(f"'{path}' is an empty list: expected entries {ENTRY_FORMAT[path.name]}", "data.pairs")
    return data


def _caption(value) -> str | None:
    """A prompt from ``"text"`` or ``["text", ...]``; None when absent or not text."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) and value.strip() else None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_error(where: str, problem: str, file: str) -> SpecError:
    return SpecError(f"{where}: {problem}; expected {ENTRY_FORMAT[file]}", "data.pairs")


def _inside(path: Path, root: Path) -> bool:
    return path.is_relative_to(root)  # lexical: the caller resolves ".." (abspath) or links (realpath)


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vpo" / "videodpo-latents"


def latent_cache_root(cache_dir: str | Path | None, output_dir: str | Path | None, data_root: Path) -> Path:
    """``cache_dir``, else OUTPUT_DIR/videodpo-latents, else the user cache; never inside the data set."""
    if cache_dir:
        root = Path(cache_dir).expanduser()
    elif output_dir:
        root = Path(output_dir) / "videodpo-latents"
    else:
        root = user_cache_dir()
    if _inside(Path(os.path.realpath(root)), Path(os.path.realpath(data_root))):
        raise SpecError(f"the latent cache '{root}' would be written inside the input data set '{data_root}', "
                        f"which may be read-only or shared; set objective.cache_dir (or output_dir) to a "
                        f"directory outside it", "objective.cache_dir")
    return root


def policy_geometry(policy) -> tuple[int | None, int | None, int | None]:
    """(frames, height, width) the policy generates, read from its config (cogvideox: num_frames/height/width;
    the toy policy: frames/size); None where unknown."""
    cfg = getattr(policy, "config", None)
    frames = getattr(cfg, "num_frames", None) or getattr(cfg, "frames", None)
    height = getattr(cfg, "height", None) or getattr(cfg, "size", None)
    width = getattr(cfg, "width", None) or getattr(cfg, "size", None)
    return frames, height, width


class VideoDPOPairDataset:
    """``len(ds)`` pairs; ``ds.batch(indices) -> PairBatch`` of cached VAE latents. Every check runs here."""

    def __init__(self, path: str | Path, policy, *, frames: int | None = None, stride: int = 4,
                 height: int | None = None, width: int | None = None, cache_dir: str | Path | None = None,
                 output_dir: str | Path | None = None, alpha: float | None = None, weight_reference: float = 0.72,
                 max_weight: float | None = DEFAULT_MAX_WEIGHT, min_clip_duration: float = 0.0,
                 allow_outside_paths: bool = False, drop_duplicate_pairs: bool = True,
                 validate_clips: bool = True) -> None:
        self.policy = policy
        p_frames, p_height, p_width = policy_geometry(policy)
        self.frames = frames or p_frames or VIDEODPO_FRAMES
        self.stride = stride
        self.height, self.width = height or p_height, width or p_width
        if not (self.height and self.width):
            raise SpecError("cannot tell the policy's resolution: set objective.clip_height and "
                            "objective.clip_width", "objective")
        self.root = Path(os.path.abspath(path))
        self.dirs = find_layout_dirs(self.root)
        self.allow_outside_paths = allow_outside_paths
        self.clips: list[Clip] = []
        self.pairs: list[VideoPair] = []
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._examples: dict[str, str] = {}  # first dropped entry per reason, for the report
        seen: dict[tuple, str] = {}
        for d in self.dirs:
            self._read_dir(d, alpha, weight_reference, max_weight, min_clip_duration, drop_duplicate_pairs, seen)
        self._report()
        if not self.pairs:
            raise SpecError(f"VideoDPO pair dataset '{path}' holds no usable pairs", "data.pairs")
        self.cache = self._cache_dir(latent_cache_root(cache_dir, output_dir, self.root))
        if validate_clips:
            self.validate_clips()

    # ------------------------------------------------------------------------------------------- reading
    def _read_dir(self, d: Path, alpha: float | None, reference: float, max_weight: float | None,
                  min_duration: float, drop_duplicates: bool, seen: dict[tuple, str]) -> None:
        offset = self._read_metadata(d)
        count = len(self.clips) - offset
        pair_file = d / "pair.json"
        for i, item in enumerate(_read_json_list(pair_file)):
            where = f"{pair_file}[{i}]"
            if not isinstance(item, dict):
                raise _entry_error(where, f"not an object ({type(item).__name__})", "pair.json")
            indices = []
            for field in ("video1", "video2"):
                value = item.get(field)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise _entry_error(where, f"'{field}' must be an integer index into metadata.json, got "
                                              f"{value!r}", "pair.json")
                if not 0 <= value < count:
                    raise SpecError(f"{where}: {field} = {value} is outside {d / 'metadata.json'} "
                                    f"(0..{count - 1})", "data.pairs")
                indices.append(offset + value)
            winner, loser = indices
            for field in ("score", "diff_score"):
                if item.get(field) is not None and not _number(item[field]):
                    raise _entry_error(where, f"'{field}' must be a number, got {item[field]!r}", "pair.json")
            prompt = _caption(item.get("frame_caption"))
            if prompt is None and "frame_caption" in item:
                raise _entry_error(where, f"'frame_caption' must be a prompt or [prompt], got "
                                          f"{item['frame_caption']!r}", "pair.json")
            prompt = prompt or self.clips[winner].prompt
            if prompt is None:
                raise _entry_error(where, f"no prompt: neither the pair's frame_caption nor "
                                          f"{self.clips[winner].entry}'s misc.frame_caption", "pair.json")
            identity = (self._identity(winner), self._identity(loser), prompt)
            reason = None
            if identity[0] == identity[1]:
                reason = "self_pair"
            elif drop_duplicates and identity in seen:
                reason, where = "duplicate", f"{where} repeats {seen[identity]}"
            elif any(self.clips[j].duration is not None and self.clips[j].duration < min_duration
                     for j in (winner, loser)):
                reason = "short_clip"
            weight = 1.0
            if reason is None and alpha is not None and item.get("score") is not None:
                # "score" already is s_w * s_l: pair_weight(score, 1) == (reference / score) ** alpha
                weight = pair_weight(float(item["score"]), 1.0, alpha, reference, max_weight)
                reason = "nonpositive_score" if weight is None else None
            if reason is not None:
                self.dropped[reason] += 1
                self._examples.setdefault(reason, where)
                continue
            seen.setdefault(identity, where)
            self.pairs.append(VideoPair(winner, loser, prompt, weight, float(item.get("diff_score") or 0.0)))

    def _read_metadata(self, d: Path) -> int:
        """Append ``d``'s clips to ``self.clips``; returns the offset of its first clip."""
        offset = len(self.clips)
        meta_file = d / "metadata.json"
        missing, outside = [], []
        for i, item in enumerate(_read_json_list(meta_file)):
            where = f"{meta_file}[{i}]"
            basic = item.get("basic") if isinstance(item, dict) else None
            clip_path = basic.get("clip_path") if isinstance(basic, dict) else None
            if not isinstance(clip_path, str) or not clip_path:
                raise _entry_error(where, "no basic.clip_path string", "metadata.json")
            duration = basic.get("clip_duration")
            if duration is not None and not _number(duration):
                raise _entry_error(where, f"basic.clip_duration must be seconds, got {duration!r}", "metadata.json")
            misc = item.get("misc")
            caption = _caption(misc.get("frame_caption")) if isinstance(misc, dict) else None
            path = Path(os.path.abspath(d / clip_path))  # ".." resolved; an absolute clip_path stays as it is
            if not self.allow_outside_paths and not _inside(path, self.root):
                outside.append(f"{where}: {clip_path!r}")
            elif not path.is_file():
                missing.append(f"{where}: {clip_path!r}")
            self.clips.append(Clip(path, caption, duration, where))
        if outside:
            raise SpecError(f"{len(outside)} clip_path entr{'y' if len(outside) == 1 else 'ies'} point outside the "
                            f"data set directory '{self.root}': {'; '.join(outside[:3])}. Move the clips into it, "
                            f"or set objective.allow_outside_paths: true if you trust this metadata.json",
                            "data.pairs")
        if missing:
            raise SpecError(f"{len(missing)} clip(s) listed in {meta_file} do not exist: {'; '.join(missing[:3])}",
                            "data.pairs")
        return offset

    def _identity(self, clip: int) -> str:
        return os.path.realpath(self.clips[clip].path)  # two entries naming one file are one clip

    def _report(self) -> None:
        parts = [f"{n} {DROP_REASONS[k]}, e.g. {self._examples[k]}" for k, n in self.dropped.items() if n]
        if parts:
            print(f"vpo: videodpo pairs in '{self.root}': kept {len(self.pairs)}, dropped " + "; ".join(parts),
                  file=sys.stderr)

    def validate_clips(self) -> None:
        """Decode every clip a pair uses that is not cached yet (a few threads: PyAV decodes without the GIL);
        one error lists the clips that fail."""
        todo = {}  # cache file -> clip: one decode per file
        for j in sorted({j for p in self.pairs for j in (p.winner, p.loser)}):
            cached = self._cache_file(j)
            if cached not in todo and not cached.exists():
                todo[cached] = j

        def problem(j: int) -> str | None:
            try:
                self._decode(j)
            except VpoError as exc:
                return f"{self.clips[j].entry}: {exc}"
            return None

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            failures = [f for f in pool.map(problem, todo.values()) if f]
        if failures:
            raise SpecError(f"{len(failures)} clip(s) of '{self.root}' cannot be used: " + "; ".join(failures[:5])
                            + (f"; ... {len(failures) - 5} more" if len(failures) > 5 else "")
                            + ". Fix or remove these clips or the pairs that use them", "data.pairs")

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

    def _decode(self, clip: int) -> torch.Tensor:
        path = self.clips[clip].path
        try:
            return read_clip(path, self.frames, self.stride)
        except VpoError:
            raise
        except Exception as exc:  # PyAV: not a video, truncated file
            raise VpoError(f"cannot decode clip '{path}': {type(exc).__name__}: {exc}") from None

    def read_frames(self, clip: int) -> torch.Tensor:
        """Clip -> ``[T, C, H, W]`` in [0, 1] at the policy's resolution."""
        video = F.interpolate(self._decode(clip), size=(self.height, self.width), mode="bilinear",
                              align_corners=False, antialias=True)
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
