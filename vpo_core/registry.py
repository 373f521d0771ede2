"""The catalogue of known plugins (``registry.yaml``), used for "not installed: pip install ..." hints."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")  # a link to the repository's registry.yaml


@dataclass
class RegistryEntry:
    name: str
    distribution: str
    path: str
    install: str
    summary: str
    parts: dict[str, list[str]] = field(default_factory=dict)


@lru_cache(maxsize=1)
def load_registry(path: Path = REGISTRY_PATH) -> list[RegistryEntry]:
    if not path.exists():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    entries = []
    for item in data.get("plugins", []):
        entries.append(RegistryEntry(
            name=item["name"], distribution=item["distribution"], path=item.get("path", ""),
            install=item.get("install", f"pip install {item['distribution']}"), summary=item.get("summary", ""),
            parts={k: list(v or []) for k, v in (item.get("parts") or {}).items()},
        ))
    return entries


def find_provider(kind: str, name: str) -> RegistryEntry | None:
    for entry in load_registry():
        if name in entry.parts.get(kind, []):
            return entry
    return None
