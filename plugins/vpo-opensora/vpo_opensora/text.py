"""Open-Sora v1.2's text side: the prompt suffix, the caption cleaning its T5 saw in training, and the T5 encoder.

At inference the release appends `` aesthetic score: 6.5.`` to each prompt (unless it already has one), then runs
PixArt's caption cleaning twice (``opensora/models/text_encoder/t5.py``: ``text_preprocessing``) and encodes with
T5-v1.1-XXL padded to 300 tokens (``DeepFloyd/t5-v1_1-xxl``; the tokenizer appends ``</s>``). The cleaning below
applies the same substitutions in the same order; it needs ``ftfy`` and ``beautifulsoup4`` as the original does.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from pathlib import Path

import torch
from vpo_core import VpoError

_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}")
_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
# Raw strings: ``re`` reads the \u escapes (a literal "-" would be a range inside the class).
_CJK_BLOCKS = (r"\u31c0-\u31ef", r"\u31f0-\u31ff", r"\u3200-\u32ff", r"\u3300-\u33ff", r"\u3400-\u4dbf",
               r"\u4dc0-\u4dff", r"\u4e00-\u9fff")
_DASHES = (r"\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
           r"\uFE58\uFE63\uFF0D")
_FILE_EXTENSIONS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"

# (pattern, replacement) in the order PixArt / Open-Sora apply them, in four runs split where the HTML parse,
# the joiner rule and the ftfy pass come.
_BEFORE_HTML = [
    ("<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),  # urls
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),
]
_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),  # @nicknames
    *[(f"[{block}]+", "") for block in _CJK_BLOCKS],
    (f"[{_DASHES}]+", "-"),  # every dash -> "-"
    ("[`´«»“”¨]", '"'),
    ("[‘’]", "'"),
    ("&quot;?", ""),
    ("&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.(?:{_FILE_EXTENSIONS})", ""),  # file names
    (r"[\"\']{2,}", r'"'),
    (r"[\.]{2,}", r" "),
    (_BAD_PUNCT, r" "),
    (r"\s+\.\s+", r" "),
]
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640, jc6640vc, 6640vc231
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_EXTENSIONS})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes such as 1920x1080
    (r"\b\s+\:\s+", r": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
]
_TRIM = [
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", r""),
    (r"[\'\_,\-\:\-\+]$", r""),
    (r"^\.\S+$", ""),
]
_JOINERS = re.compile(r"(?:\-|\_)")


def _apply(table, caption: str) -> str:
    for pattern, replacement in table:
        caption = re.sub(pattern, replacement, caption)
    return caption


def clean_caption(caption: str) -> str:
    """One pass of PixArt's caption cleaning (lower-case; urls, html, ids, odd punctuation removed)."""
    import ftfy
    from bs4 import BeautifulSoup

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = _apply(_BEFORE_HTML, caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = _apply(_AFTER_HTML, caption)
    if len(_JOINERS.findall(caption)) > 3:  # this-is-my-cute-cat -> words
        caption = _JOINERS.sub(" ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption))).strip()
    caption = _apply(_AFTER_FTFY, caption)
    return _apply(_TRIM, caption).strip()


def prepare_prompt(prompt: str, aesthetic_score: float | None, motion_score: float | None) -> str:
    """The text T5 sees for a user prompt: score suffixes as the release's inference appends them, cleaned twice."""
    if aesthetic_score is not None and "aesthetic score:" not in prompt:
        prompt = f"{prompt} aesthetic score: {aesthetic_score:.1f}."
    if motion_score is not None and "motion score:" not in prompt:
        prompt = f"{prompt} motion score: {motion_score:.1f}."
    return clean_caption(clean_caption(prompt))


def load_text_encoder(name: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """T5 encoder + tokenizer from a hub id (``DeepFloyd/t5-v1_1-xxl``) or a local directory in that layout
    (config.json, safetensors weights, tokenizer files). Weights are read from safetensors only."""
    from transformers import AutoTokenizer, T5EncoderModel

    if (name.startswith((".", "/", "~")) or Path(name).expanduser().exists()) and not Path(name).expanduser().is_dir():
        raise VpoError(f"text encoder directory {name!r} does not exist; expected a T5 encoder in the "
                       "'DeepFloyd/t5-v1_1-xxl' layout (config.json, *.safetensors, tokenizer files).")
    name = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    try:
        encoder = T5EncoderModel.from_pretrained(name, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise VpoError(f"could not load the T5 text encoder from {name!r}: {error}. Expected a hub id such as "
                       "'DeepFloyd/t5-v1_1-xxl' or a directory with config.json, safetensors weights and the "
                       "tokenizer files.") from None
    return encoder, tokenizer
