"""The run spec: one YAML file validated by pydantic, with YAML line numbers in every message.

Validation has two stages. ``RunSpec`` checks the core's own sections strictly (unknown keys are errors) and
keeps each part's section open. Then each part's ``type`` is resolved to a registered part type and the rest
of its section is validated by that part type's config model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .errors import SpecError, SpecErrors
from .plugins import PartType, PluginManager
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
    timeout_s: Optional[float] = Field(None, gt=0, description="A score() call taking longer fails the run.")


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

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads an unquoted `no` as false


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


REWARD_CORE_KEYS = ("type", "name", "weight", "timeout_s")


# ----------------------------------------------------------------------------------------------- YAML
# A spec is untrusted input: these limits (documented in docs/spec.md) bound the time and memory of reading one.
MAX_SPEC_BYTES = 1 << 20  # 1 MiB; long prompt lists belong in `prompts_file`
MAX_DEPTH = 32  # nesting of mappings and lists (a real spec uses about 5)
MAX_NODES = 100_000  # values after expanding aliases (an alias bomb expands exponentially)
MAX_STRING = 10_000  # characters in one string
MAX_NUMBER = 64  # characters in one number


@dataclass
class SpecSource:
    data: Any
    lines: dict[tuple, int]
    name: str
    overrides: dict[tuple, str] = field(default_factory=dict)  # path -> "--set KEY=VALUE" that set it

    def line(self, path: tuple) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)

    def where(self, path: tuple) -> tuple[str, int | None]:
        """(path text, line) of a value; values given with --set are named by that option, not a line."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.overrides:
                return f"{_fmt_path(path)} (from {self.overrides[path[:n]]})", None
        return _fmt_path(path), self.line(path)


def read_spec_file(path: str | Path) -> SpecSource:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"'{path}' is a directory; give the path of a YAML spec file" if path.is_dir()
                        else f"spec file '{path}' does not exist")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read spec file '{path}': {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"spec file '{path}' is larger than {MAX_SPEC_BYTES >> 10} KiB, more than any spec needs; "
                        f"put long prompt lists in a `data.prompts_file`")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(f"spec file '{path}' is not UTF-8 text (byte {exc.start})", line=line) from None
    return parse_spec_text(text, str(path))


def parse_yaml(text: str, what: str = "the spec") -> tuple[Any, dict[tuple, int]]:
    """Safe YAML with the limits above -> (plain data, {path: line}). One document, no tags; aliases and merge
    keys are allowed but count towards ``MAX_NODES`` as if written out."""
    try:
        events = yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        depth = documents = count = 0
        for event in events:  # a flat pass first: cheap, and no recursion on deep nesting
            count += 1
            tag = getattr(event, "tag", None)
            if tag is not None and not isinstance(event, yaml.DocumentStartEvent):
                raise SpecError(f"YAML tags are not allowed in {what} (found '{tag}')", line=event.start_mark.line + 1)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(f"{what} nests deeper than {MAX_DEPTH} levels", line=event.start_mark.line + 1)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise SpecError(f"{what} holds several YAML documents ('---'); keep one",
                                    line=event.start_mark.line + 1)
            if count > MAX_NODES:
                raise SpecError(f"{what} has more than {MAX_NODES} values")
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"not valid YAML: {problem}", line=mark.line + 1 if mark is not None else None) from None
    lines: dict[tuple, int] = {}
    budget = [MAX_NODES]
    return (None if node is None else _plain(node, (), lines, budget, 0, what)), lines


_SCALARS = {"tag:yaml.org,2002:null": lambda v: None, "tag:yaml.org,2002:bool": lambda v: v.lower() in (
    "yes", "true", "on", "y"), "tag:yaml.org,2002:int": None, "tag:yaml.org,2002:float": None}


def _plain(node: yaml.Node, path: tuple, lines: dict, budget: list[int], depth: int, what: str) -> Any:
    """A composed node -> dicts, lists and scalars, with alias expansion bounded by ``budget``."""
    line = node.start_mark.line + 1
    lines.setdefault(path, line)
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:  # an alias bomb, or an alias that contains itself
        raise SpecError(f"{what} expands (through aliases) to more than {MAX_NODES} values or {MAX_DEPTH} levels",
                        line=line)
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, path + (i,), lines, budget, depth + 1, what) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges a mapping (or a list of them)
                merged = _plain(value_node, path, lines, budget, depth + 1, what)
                for item in merged if isinstance(merged, list) else [merged]:
                    if not isinstance(item, dict):
                        raise SpecError("a YAML merge key '<<' must name a mapping", line=line)
                    out.update({k: v for k, v in item.items() if k not in out})
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(f"keys of {what} must be plain names", line=key_node.start_mark.line + 1)
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _plain(value_node, path + (key,), lines, budget, depth + 1, what)
        return out
    value = node.value
    if node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and len(value) > MAX_NUMBER:
        raise SpecError(f"a number of {len(value)} characters in {what}; numbers are at most {MAX_NUMBER}", line=line)
    if len(value) > MAX_STRING:
        raise SpecError(f"a string of {len(value)} characters in {what}; strings are at most {MAX_STRING}", line=line)
    if node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        return yaml.SafeLoader("").construct_object(node)
    return _SCALARS[node.tag](value) if node.tag in _SCALARS else value  # timestamps etc. stay text


def parse_spec_text(text: str, name: str = "<spec>") -> SpecSource:
    data, lines = parse_yaml(text)
    if data is None:
        raise SpecError(f"spec '{name}' is empty; see README 'Spec reference' for a minimal spec")
    if not isinstance(data, dict):
        raise SpecError(f"the spec must be a YAML mapping (key: value), got a {type(data).__name__}", line=1)
    return SpecSource(data, lines, name)


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
        path, line = source.where(full)
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
    part_type: PartType
    config: PartConfig
    name: str  # rewards: alias used in score keys; others: the type
    weight: float = 1.0
    timeout_s: float | None = None


@dataclass
class ResolvedSpec:
    spec: RunSpec
    policy: ResolvedPart
    rewards: list[ResolvedPart]
    selector: ResolvedPart | None
    objective: ResolvedPart
    source_name: str = ""
    trackers: list[str] = field(default_factory=list)

    @property
    def requires(self) -> str:
        return self.objective.config.requires

    @property
    def mode(self) -> str:
        """"online pairs", "offline pairs", "rollout" or "trajectories"."""
        if self.requires != "pairs":
            return self.requires
        return "offline pairs" if self.spec.data.pairs else "online pairs"

    def to_dict(self) -> dict[str, Any]:
        """The spec with every default filled in (written to final/spec.yaml)."""
        out = self.spec.model_dump(mode="json", exclude={"policy", "rewards", "selector", "objective"})
        for kind in ("policy", "selector", "objective"):
            part = getattr(self, kind)
            if part is not None:
                out[kind] = {"type": part.part_type.name, **part.config.model_dump(mode="json")}
        out["rewards"] = [{"type": r.part_type.name, "name": r.name, "weight": r.weight, "timeout_s": r.timeout_s,
                           **r.config.model_dump(mode="json")} for r in self.rewards]
        return out


def apply_overrides(source: SpecSource, overrides: list[str]) -> None:
    """``--set train.steps=3``: dotted path = YAML value (read with the spec's limits)."""
    data = source.data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set expects KEY=VALUE (e.g. train.steps=10), got '{item[:80]}'")
        try:
            value = parse_yaml(raw, f"--set {key}")[0]
        except SpecError as exc:
            raise SpecError(f"--set {key}=...: {exc.message}") from None
        target, parts = data, key.split(".")
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
        path = tuple(int(p) if p.isdigit() and isinstance(t, list) else p for p, t in zip(parts, _walk(data, parts)))
        source.overrides[path] = f"--set {key}={raw[:60]}"


def _walk(data: Any, parts: list[str]) -> list[Any]:
    """The container each part of a dotted path indexes into."""
    out = []
    for part in parts:
        out.append(data)
        data = data[int(part)] if isinstance(data, list) else data.get(part) if isinstance(data, dict) else None
    return out


def resolve(source: SpecSource, pm: PluginManager) -> ResolvedSpec:
    """Validate the whole spec; raise ``SpecErrors`` listing every problem found."""
    try:
        spec = RunSpec.model_validate(source.data)
    except ValidationError as exc:
        raise SpecErrors(_errors_from_validation(exc, source, RunSpec), source.name) from None
    errors: list[SpecError] = []

    def part(kind: Kind, section: PartSpec, loc: tuple, core_keys: tuple = ("type",)) -> ResolvedPart | None:
        try:
            comp = pm.get(kind, section.type, *source.where(loc + ("type",)))
        except SpecError as exc:
            errors.append(exc)
            return None
        raw = {k: v for k, v in section.model_dump().items() if k not in core_keys}
        try:
            config = comp.config_model.model_validate(raw)
        except ValidationError as exc:
            errors.extend(_errors_from_validation(exc, source, comp.config_model, loc))
            return None
        return ResolvedPart(kind, comp, config, getattr(section, "name", None) or section.type,
                            getattr(section, "weight", 1.0), getattr(section, "timeout_s", None))

    resolved = ResolvedSpec(spec, part("policy", spec.policy, ("policy",)),
                            [part("reward", r, ("rewards", i), REWARD_CORE_KEYS) for i, r in enumerate(spec.rewards)],
                            part("selector", spec.selector, ("selector",)) if spec.selector is not None else None,
                            part("objective", spec.objective, ("objective",)), source.name)
    if not errors:
        errors = check_spec(resolved, source)
    if errors:
        raise SpecErrors(errors, source.name)
    return resolved


def check_spec(r: ResolvedSpec, source: SpecSource) -> list[SpecError]:
    """Every check that needs only the spec and the installed plugins' declarations (no model is loaded)."""
    import importlib.util

    spec, errors = r.spec, []

    def error(message: str, *path: Any) -> None:
        errors.append(SpecError(message, *source.where(path)))
    requires, name = r.requires, r.objective.part_type.name
    if r.mode == "online pairs" and r.selector is None:
        error("objective needs preference pairs: add a `selector:` section (e.g. `type: best_worst`) or point "
              "`data.pairs` at a stored pair dataset", "selector")
    if r.mode != "offline pairs" and not r.rewards:
        error(f"objective '{name}' ({r.mode}) needs at least one reward in `rewards:`", "rewards")
    if not (spec.data.prompts or spec.data.prompts_file or spec.data.pairs):
        error("no training data: set `data.prompts`, `data.prompts_file` or `data.pairs`", "data")
    for key in ("prompts_file", "eval_prompts_file"):
        value = getattr(spec.data, key)
        if value and not Path(value).is_file():
            error(f"file '{value}' does not exist", "data", key)
    if requires == "trajectories" and "trajectories" not in r.policy.config.capabilities:
        error(f"objective '{name}' trains on recorded denoising trajectories, which policy "
              f"'{r.policy.part_type.name}' does not offer (capability 'trajectories')", "objective", "type")
    keys = {"total"}
    for i, reward in enumerate(r.rewards):
        try:
            keys |= {f"{reward.name}.{d}" for d in reward.config.score_dimensions()}
        except NotImplementedError as exc:
            error(f"{reward.part_type.origin}: {exc}", "rewards", i, "type")
        if requires == "rollout" and not reward.config.differentiable:
            error(f"reward '{reward.name}' is not differentiable, but objective '{name}' back-propagates through "
                  f"the rewards; remove it or use a pair-based objective", "rewards", i)
    for kind in ("selector", "objective"):
        part = getattr(r, kind)
        missing = [k for k in (part.config.score_keys() if part is not None else ()) if k not in keys]
        if missing:
            error(f"score key(s) {missing} are not provided by any reward; available keys: {sorted(keys)} "
                  f"('<reward name>.<dimension>' or 'total')", kind)
    if spec.train.mixed_precision == "fp16" and not _cuda_available():
        error("mixed_precision fp16 needs a GPU; use 'bf16' or 'no' on CPU", "train", "mixed_precision")
    trackers = spec.logging.trackers
    if trackers == "auto":
        trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    for t in trackers:
        if importlib.util.find_spec(t) is None:
            error(f"tracker '{t}' is not installed: pip install {t}", "logging", "trackers")
    r.trackers = list(trackers)
    return errors


def _cuda_available() -> bool:
    import torch  # only a spec asking for fp16 pays for this import

    return torch.cuda.is_available()


def load_spec(path: str | Path, pm: PluginManager, overrides: list[str] | None = None) -> ResolvedSpec:
    source = read_spec_file(path)
    if overrides:
        apply_overrides(source, overrides)
    return resolve(source, pm)


# ----------------------------------------------------------------------------------------------- schema
def json_schema(pm: PluginManager) -> dict[str, Any]:
    """JSON Schema of the spec with every installed part's config model, discriminated by ``type``."""

    def union(kind: Kind, extra_fields: dict[str, Any]) -> Any:
        variants = []
        for comp in pm.part_types[kind].values():
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
