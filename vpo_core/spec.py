"""The run spec: one YAML file validated by pydantic, with YAML line numbers in every message.

Validation has two stages. ``RunSpec`` checks the core's own sections strictly (unknown keys are errors) and
keeps each part's section open. Then each part's ``type`` is resolved to a registered component and the rest
of its section is validated by that component's own config model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from .errors import SpecError, SpecErrors
from .plugins import Component, PluginManager
from .types import Kind, PartConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PartSpec(BaseModel):
    """A part's section: ``type`` plus the plugin's own keys (validated in the second stage)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Registered name of the part (see `vpo plugins`).")


class RewardSpec(PartSpec):
    name: Optional[str] = Field(None, description="Alias used in score keys '<name>.<dimension>'; default: type.")
    weight: float = Field(1.0, description="Weight of this reward in the 'total' score.")


class DataSpec(Strict):
    prompts: list[str] = Field(default_factory=list, description="Training prompts.")
    prompts_file: Optional[str] = Field(None, description="Text file, one training prompt per line.")
    eval_prompts: list[str] = Field(default_factory=list, description="Held-out prompts for evaluation.")
    eval_prompts_file: Optional[str] = None
    pairs: Optional[str] = Field(None, description="Stored pair dataset directory: offline training.")
    pairs_format: str = Field("vpo", description="Layout of `pairs` ('vpo', or one an objective understands).")


class TrainSpec(Strict):
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    prompts_per_step: int = Field(1, ge=1, description="Prompts per micro-step (online and rollout modes).")
    candidates_per_prompt: int = Field(4, ge=2, description="N videos sampled per prompt (online pairs).")
    pairs_per_step: int = Field(1, ge=1, description="Pairs per micro-step (offline pairs).")
    pair_batch_size: Optional[int] = Field(None, ge=1, description="Max pairs per forward pass (memory).")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping; null disables.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


class EvalSpec(Strict):
    every: int = Field(0, ge=0, description="Evaluate every N steps (0: only before and after training).")
    seeds_per_prompt: int = Field(2, ge=1)
    max_prompts: Optional[int] = Field(None, ge=1)
    videos: int = Field(4, ge=0, description="Held-out prompts whose videos are written to samples/.")
    video_format: Literal["gif", "mp4"] = "gif"
    fps: int = Field(8, ge=1)
    video_scale: int = Field(1, ge=1, description="Integer upscaling of written videos (tiny models).")


class CheckpointSpec(Strict):
    every: int = Field(50, ge=0, description="Save every N steps (0: only at the end).")
    keep_last: int = Field(2, ge=1)


class LoggingSpec(Strict):
    trackers: Union[Literal["auto"], list[Literal["tensorboard", "wandb"]]] = Field(
        "auto", description="'auto': tensorboard when installed. metrics.jsonl is always written.")
    project: str = "vpo"
    run_name: Optional[str] = None


class SafetySpec(Strict):
    max_consecutive_nonfinite: int = Field(5, ge=1, description="Stop after this many non-finite steps in a row.")
    allow_pickle: bool = Field(False, description="Allow loading pickled checkpoints (arbitrary code!).")
    trust_remote_code: bool = Field(False, description="Allow hub code execution in transformers/diffusers.")


class RunSpec(Strict):
    """The whole run. See README 'Spec reference'."""

    output_dir: str = Field("runs/vpo", description="Where metrics, checkpoints, final/ and report go.")
    seed: int = 0
    policy: PartSpec
    rewards: list[RewardSpec] = Field(default_factory=list)
    selector: Optional[PartSpec] = None
    objective: PartSpec
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    safety: SafetySpec = Field(default_factory=SafetySpec)

    @model_validator(mode="after")
    def _unique_reward_names(self) -> "RunSpec":
        seen = set()
        for reward in self.rewards:
            name = reward.name or reward.type
            if name in seen:
                raise ValueError(f"two rewards are named '{name}'; give one a different `name:`")
            seen.add(name)
        return self


REWARD_CORE_KEYS = ("type", "name", "weight")


# ----------------------------------------------------------------------------------------------- YAML
def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Path of every YAML node (keys and list indices) -> 1-based line."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            _line_map(value_node, path + (key,), out)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


@dataclass
class SpecSource:
    data: Any
    lines: dict[tuple, int]
    name: str

    def line(self, path: tuple) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


def read_spec_file(path: str | Path) -> SpecSource:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file '{path}' does not exist")
    if path.is_dir():
        raise SpecError(f"'{path}' is a directory; give the path of a YAML spec file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file '{path}': {exc}") from None
    return parse_spec_text(text, str(path))


def parse_spec_text(text: str, name: str = "<spec>") -> SpecSource:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)  # safe loading only: no python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"not valid YAML: {problem}", line=line) from None
    if node is None or data is None:
        raise SpecError(f"spec '{name}' is empty; see README 'Spec reference' for a minimal spec")
    if not isinstance(data, dict):
        raise SpecError(f"the spec must be a YAML mapping (key: value), got a {type(data).__name__}", line=1)
    return SpecSource(data, _line_map(node), name)


# ----------------------------------------------------------------------------------------------- errors
def _fmt_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of ``loc`` (for 'did you mean' hints)."""
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field_info = model.model_fields.get(part)
        if field_info is None:
            return None
        model = _inner_model(field_info.annotation)
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _errors_from_validation(exc: ValidationError, source: SpecSource, model: type[BaseModel],
                            prefix: tuple = ()) -> list[SpecError]:
    errors = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        full = prefix + loc
        path = _fmt_path(full)
        line = source.line(full)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            known = sorted(owner.model_fields) if owner else []
            if model is not None and owner is model and prefix and prefix[0] == "rewards":
                known = sorted(set(known) | {"name", "weight", "type"})
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; allowed keys: {', '.join(known)}" if known else "")
            errors.append(SpecError(f"unknown key '{loc[-1]}'{hint}", path, line))
        elif err["type"] == "missing":
            errors.append(SpecError("required key is missing", path, line))
        else:
            given = err.get("input")
            shown = f" (got {given!r})" if not isinstance(given, (dict, list)) and given is not None else ""
            errors.append(SpecError(f"{err['msg']}{shown}", path, line))
    return errors


# ----------------------------------------------------------------------------------------------- resolve
@dataclass
class ResolvedPart:
    kind: Kind
    component: Component
    config: PartConfig
    name: str  # rewards: alias used in score keys; others: the type
    weight: float = 1.0


@dataclass
class ResolvedSpec:
    spec: RunSpec
    policy: ResolvedPart
    rewards: list[ResolvedPart]
    selector: ResolvedPart | None
    objective: ResolvedPart
    source_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The spec with every default filled in (written to final/spec.yaml)."""
        out = self.spec.model_dump(mode="json", exclude={"policy", "rewards", "selector", "objective"})
        out["policy"] = {"type": self.policy.component.name, **self.policy.config.model_dump(mode="json")}
        out["rewards"] = [{"type": r.component.name, "name": r.name, "weight": r.weight,
                           **r.config.model_dump(mode="json")} for r in self.rewards]
        if self.selector is not None:
            out["selector"] = {"type": self.selector.component.name, **self.selector.config.model_dump(mode="json")}
        out["objective"] = {"type": self.objective.component.name, **self.objective.config.model_dump(mode="json")}
        return out


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """``--set train.steps=3``: dotted path = YAML value."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set expects KEY=VALUE (e.g. train.steps=10), got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict):
                target = target.setdefault(part, {})
            else:
                raise SpecError(f"--set {key}: '{part}' is not a section of the spec")
        last = parts[-1]
        if isinstance(target, list) and last.isdigit() and int(last) < len(target):
            target[int(last)] = value
        elif isinstance(target, dict):
            target[last] = value
        else:
            raise SpecError(f"--set {key}: cannot set '{last}' there")


def resolve(source: SpecSource, pm: PluginManager) -> ResolvedSpec:
    """Validate the whole spec; raise ``SpecErrors`` listing every problem found."""
    try:
        spec = RunSpec.model_validate(source.data)
    except ValidationError as exc:
        raise SpecErrors(_errors_from_validation(exc, source, RunSpec), source.name) from None

    errors: list[SpecError] = []

    def part(kind: Kind, section: PartSpec, loc: tuple, core_keys: tuple = ("type",)) -> ResolvedPart | None:
        try:
            comp = pm.get(kind, section.type, _fmt_path(loc + ("type",)), source.line(loc + ("type",)))
        except SpecError as exc:
            errors.append(exc)
            return None
        raw = {k: v for k, v in section.model_dump().items() if k not in core_keys}
        try:
            config = comp.config_model.model_validate(raw)
        except ValidationError as exc:
            errors.extend(_errors_from_validation(exc, source, comp.config_model, loc))
            return None
        name = getattr(section, "name", None) or section.type
        return ResolvedPart(kind, comp, config, name, getattr(section, "weight", 1.0))

    policy = part("policy", spec.policy, ("policy",))
    rewards = [part("reward", r, ("rewards", i), REWARD_CORE_KEYS) for i, r in enumerate(spec.rewards)]
    selector = part("selector", spec.selector, ("selector",)) if spec.selector is not None else None
    objective = part("objective", spec.objective, ("objective",))

    if not errors:
        # Objective config models declare ``requires: ClassVar[...] = "pairs" | "rollout"``.
        requires = getattr(objective.config, "requires", None)
        online_pairs = requires != "rollout" and not spec.data.pairs
        if online_pairs and selector is None and requires == "pairs":
            errors.append(SpecError(
                "objective needs preference pairs: add a `selector:` section (e.g. `type: best_worst`) "
                "or point `data.pairs` at a stored pair dataset", "selector", source.line(("objective",))))
        if requires in ("pairs", "rollout") and not spec.rewards and not spec.data.pairs:
            errors.append(SpecError("this objective needs at least one reward in `rewards:`", "rewards",
                                    source.line(("objective",))))
        if not (spec.data.prompts or spec.data.prompts_file or spec.data.pairs):
            errors.append(SpecError("no training data: set `data.prompts`, `data.prompts_file` or `data.pairs`",
                                    "data", source.line(("data",))))
        for key in ("prompts_file", "eval_prompts_file"):
            value = getattr(spec.data, key)
            if value and not Path(value).is_file():
                errors.append(SpecError(f"file '{value}' does not exist", f"data.{key}", source.line(("data", key))))
    if errors:
        raise SpecErrors(errors, source.name)
    return ResolvedSpec(spec, policy, rewards, selector, objective, source.name)


def load_spec(path: str | Path, pm: PluginManager, overrides: list[str] | None = None) -> ResolvedSpec:
    source = read_spec_file(path)
    if overrides:
        apply_overrides(source.data, overrides)
    return resolve(source, pm)


# ----------------------------------------------------------------------------------------------- schema
def json_schema(pm: PluginManager) -> dict[str, Any]:
    """JSON Schema of the spec with every installed part's config model, discriminated by ``type``."""

    def union(kind: Kind, extra_fields: dict[str, Any]) -> Any:
        variants = []
        for comp in pm.components[kind].values():
            variants.append(create_model(
                f"{kind}_{comp.name}".replace("-", "_"), __base__=comp.config_model,
                type=(Literal[comp.name], ...), **extra_fields))
        if not variants:
            return None
        return Union[tuple(variants)] if len(variants) > 1 else variants[0]

    reward_extra = {"name": (Optional[str], None), "weight": (float, 1.0)}
    overrides: dict[str, Any] = {}
    for kind, fname, extra in (("policy", "policy", {}), ("objective", "objective", {})):
        u = union(kind, extra)
        if u is not None:
            is_union = getattr(u, "__origin__", None) is Union
            overrides[fname] = (u, Field(..., discriminator="type") if is_union else ...)
    u = union("reward", reward_extra)
    if u is not None:
        overrides["rewards"] = (list[u], Field(default_factory=list))  # type: ignore[valid-type]
    u = union("selector", {})
    if u is not None:
        overrides["selector"] = (Optional[u], None)  # type: ignore[valid-type]
    model = create_model("VpoRunSpec", __base__=RunSpec, **overrides)
    return model.model_json_schema()
