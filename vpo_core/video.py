"""Reading and writing videos: GIF through imageio, MP4 through PyAV. Frames are ``[T,C,H,W]`` in [0,1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(frames: torch.Tensor, scale: int = 1) -> np.ndarray:
    """[T,C,H,W] in [0,1] (or uint8) -> uint8 numpy [T,H,W,C], optionally upscaled by an integer (nearest)."""
    frames = frames.detach().cpu()
    frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float().clamp(0, 1)
    if scale > 1:
        frames = torch.nn.functional.interpolate(frames, scale_factor=scale, mode="nearest")
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def write_video(path: Path, frames: torch.Tensor, fps: int = 8, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = to_uint8(frames, scale)
    if path.suffix == ".gif":
        import imageio.v3 as iio

        iio.imwrite(path, array, duration=1000 / fps, loop=0)
    elif path.suffix == ".mp4":
        _write_mp4(path, array, fps)
    else:
        raise ValueError(f"unsupported video extension '{path.suffix}' (use .gif or .mp4)")
    return path


def _write_mp4(path: Path, array: np.ndarray, fps: int) -> None:
    import av

    t, h, w, _ = array.shape
    # yuv420p needs even sizes: pad by one pixel where needed.
    array = np.pad(array, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
        for frame in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: Path, num_frames: int | None = None, stride: int = 1, start: int = 0) -> torch.Tensor:
    """Decode with PyAV -> [T,C,H,W] float in [0,1]; ``stride``/``num_frames`` pick frames start, start+stride, ..."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i < start or (i - start) % stride:
                continue
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if num_frames is not None and len(frames) == num_frames:
                break
    if not frames:
        raise ValueError(f"no frames decoded from '{path}'")
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255


def side_by_side(*videos: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """Concatenate [T,C,H,W] videos horizontally with a white gap (shortest length wins)."""
    t = min(v.shape[0] for v in videos)
    parts = []
    for i, v in enumerate(videos):
        if i:
            parts.append(torch.ones(t, v.shape[1], v.shape[2], gap))
        parts.append(v[:t].float().cpu())
    return torch.cat(parts, dim=3)
