"""Learned proxy rewards of the toy world: small networks trained to predict the ``toyworld`` ground truth.

Real alignment runs train on a learned reward (VideoScore, HPS) that only approximates what people want. These
two play that part here; ``train_proxies.py`` fits them on a limited set of labelled clips (ground-truth renders,
base-model samples and corrupted clips, labelled with the ``toyworld`` scores), so they agree with the ground
truth on clips like those and can be exploited away from them.

* ``toyworld_video_proxy``: a 3-D convolutional net over all frames (it can see colour, shape, motion and
  flicker); dimensions ``color``, ``direction``, ``flicker``, ``overall``, each a separate head regressing
  that ground-truth dimension.
* ``toyworld_image_proxy``: a 2-D convolutional net that scores single frames, as image rewards such as HPS do;
  each frame's score regresses the ground-truth ``color`` of that frame alone (does this image show the
  prompt?). The video's ``overall`` is the mean over frames: it has no notion of motion.

Both read the prompt as a bag of learned word embeddings (the prompt must be a toy-world prompt), condition
every layer on it (FiLM) and are differentiable with respect to the frames. Frames ``[B, T, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from vpo_core import VpoError

from .config import ToyWorldImageProxyConfig, ToyWorldVideoProxyConfig
from .world import parse_prompt, vocabulary

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "proxies"
VIDEO_DIMENSIONS = ("color", "direction", "flicker", "overall")
IMAGE_DIMENSIONS = ("overall",)


class PromptEncoder(nn.Module):
    """Mean of learned word embeddings. Toy-world words each belong to one attribute, so a bag of words loses
    nothing; prompts are parsed first, so a non-toy prompt is a ``PromptError`` as with the ground truth."""

    def __init__(self, words: list[str], dim: int) -> None:
        super().__init__()
        self.index = {w: i for i, w in enumerate(words)}
        self.embedding = nn.Embedding(len(words), dim)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        device = self.embedding.weight.device
        rows = [torch.tensor([self.index[w] for w in parse_prompt(p).prompt.split()], device=device)
                for p in prompts]
        return torch.stack([self.embedding(r).mean(0) for r in rows])


class ConditionedConvs(nn.Module):
    """Strided convolutions (2-D or 3-D), each followed by FiLM on the prompt vector and SiLU."""

    def __init__(self, conv: type[nn.Module], inputs: int, channels: list[int], text_dim: int, stride) -> None:
        super().__init__()
        pairs = list(zip([inputs, *channels[:-1]], channels))
        self.convs = nn.ModuleList(conv(c_in, c_out, 3, stride=stride, padding=1) for c_in, c_out in pairs)
        self.films = nn.ModuleList(nn.Linear(text_dim, 2 * c) for c in channels)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        for conv, film in zip(self.convs, self.films):
            x = conv(x)
            scale, shift = film(text).view(*text.shape[:1], 2, -1, *([1] * (x.ndim - 2))).unbind(1)
            x = torch.nn.functional.silu(x * (1 + scale) + shift)
        return x


class ProxyNet(nn.Module):
    """``kind`` "video": Conv3d over [B, 3, T, H, W], one head per dimension. ``kind`` "image": Conv2d over
    single frames, one per-frame score, averaged over the frames."""

    def __init__(self, kind: str, channels: list[int], text_dim: int, hidden: int, words: list[str]) -> None:
        super().__init__()
        self.kind = kind
        self.dimensions = VIDEO_DIMENSIONS if kind == "video" else IMAGE_DIMENSIONS
        self.text = PromptEncoder(words, text_dim)
        # The video net also gets the frame differences (a cheap motion signal) as three more input channels.
        conv, inputs, stride = (nn.Conv3d, 6, (1, 2, 2)) if kind == "video" else (nn.Conv2d, 3, 2)
        self.features = ConditionedConvs(conv, inputs, channels, text_dim, stride)
        self.head = nn.Sequential(nn.Linear(channels[-1] + text_dim, hidden), nn.SiLU(),
                                  nn.Linear(hidden, len(self.dimensions)))
        # The heads predict standardised labels; these map them back (set from the training labels). Scores are
        # not clipped to the labels' range: like a real learned reward, a proxy can be pushed past it.
        self.register_buffer("label_mean", torch.zeros(len(self.dimensions)))
        self.register_buffer("label_std", torch.ones(len(self.dimensions)))

    def frame_scores(self, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Image kind: per-frame scores [B, T]."""
        b, t = frames.shape[:2]
        per_frame = text.repeat_interleave(t, 0)
        x = self.features(frames.flatten(0, 1) * 2 - 1, per_frame).mean(dim=(2, 3))
        return (self.head(torch.cat([x, per_frame], 1)) * self.label_std + self.label_mean).view(b, t)

    def forward(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores [B, len(dimensions)]."""
        text = self.text(prompts)
        if self.kind == "image":
            return self.frame_scores(frames, text).mean(1, keepdim=True)
        motion = torch.cat([frames.diff(dim=1), torch.zeros_like(frames[:, :1])], 1)
        x = torch.cat([frames * 2 - 1, motion * 4], 2).transpose(1, 2)  # [B, 6, T, H, W]
        x = self.features(x, text).mean(dim=(2, 3, 4))
        return self.head(torch.cat([x, text], 1)) * self.label_std + self.label_mean

    def metadata(self, extra: dict | None = None) -> dict[str, str]:
        convs = self.features.convs
        return {"kind": self.kind, "channels": json.dumps([c.out_channels for c in convs]),
                "text_dim": str(self.text.embedding.embedding_dim), "hidden": str(self.head[0].out_features),
                "words": json.dumps(list(self.text.index)), **(extra or {})}


def save_proxy(net: ProxyNet, path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in sorted(net.state_dict().items())}
    save_file(state, str(path), metadata=net.metadata(extra))


def load_proxy(path: str | Path, kind: str) -> ProxyNet:
    """A proxy network from its safetensors file (architecture in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VpoError(f"toy-world {kind} proxy weights not found at '{path}'; reinstall vpo-toyworld, point "
                       f"`weights:` at a file written by contrib/vpo-toyworld/train_proxies.py, or rerun that script")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        net = ProxyNet(meta["kind"], json.loads(meta["channels"]), int(meta["text_dim"]), int(meta["hidden"]),
                       json.loads(meta["words"]))
        net.load_state_dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - any damage to the file is the same user-facing problem
        raise VpoError(f"'{path}' is not a toy-world proxy written by train_proxies.py ({type(exc).__name__}: "
                       f"{exc}); rerun contrib/vpo-toyworld/train_proxies.py") from None
    if net.kind != kind:
        raise VpoError(f"'{path}' holds a {net.kind} proxy, but the reward needs a {kind} proxy; point `weights:` at "
                       f"the {kind} file ({kind}.safetensors)")
    if set(net.text.index) != set(vocabulary()):
        raise VpoError(f"'{path}' was trained on another toy-world vocabulary; rerun train_proxies.py")
    return net.requires_grad_(False).eval()


class ProxyReward:
    differentiable = True

    def __init__(self, kind: str, weights: str | None, device: torch.device | None = None) -> None:
        self.net = load_proxy(weights or WEIGHTS_DIR / f"{kind}.safetensors", kind).to(device or "cpu")
        self.dimensions = self.net.dimensions

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise VpoError(f"toy-world proxy expects frames [B,T,3,H,W], got {tuple(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise VpoError(f"toy-world proxy got {frames.shape[0]} videos but {len(prompts)} prompts")
        weight = self.net.head[0].weight
        scores = self.net(frames.to(weight.device, weight.dtype), prompts)
        return {dim: scores[:, i] for i, dim in enumerate(self.dimensions)}


def build_video_proxy(config: ToyWorldVideoProxyConfig, context=None) -> ProxyReward:
    return ProxyReward("video", config.weights, getattr(context, "device", None))


def build_image_proxy(config: ToyWorldImageProxyConfig, context=None) -> ProxyReward:
    return ProxyReward("image", config.weights, getattr(context, "device", None))
