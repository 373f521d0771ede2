"""The module a policy tunes, shared by the policy plugins: a LoRA adapter (peft) or all of its weights, plus the
reference that DPO and GRPO's KL term compare against, without a second copy of the model under LoRA:

* LoRA: the reference is the base (adapters disabled) until ``update_reference()`` copies the learner into a
  second adapter named ``reference`` (Flow-GRPO's cheap curriculum update; VideoDPO's ``shared_ref_pred``). Under
  FSDP2 that adapter is made before sharding (peft cannot add one to a sharded module) and left unused until then.
* full fine-tuning: the reference is a frozen copy of the module taken before any update.

Forward passes go through ``forward_module``: the module, its DDP/FSDP wrapper once ``wrap`` was called, or the
frozen copy inside ``use_reference()``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from .errors import VpoError
from .types import LoraSpec

REFERENCE = "reference"


def sorted_config(config: Any) -> dict[str, Any]:
    """A peft config as a dict with sets turned into sorted lists: identical runs write identical bytes."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}


class TrainableModule:
    def __init__(self, module: torch.nn.Module, lora: LoraSpec | None, seed: int) -> None:
        self.module = module
        self.lora = lora
        self.reference_copy: torch.nn.Module | None = None
        self._wrapped: torch.nn.Module | None = None
        self._in_reference = False
        self._unused_reference = False  # LoRA under FSDP2: a reference adapter made early, unused until updated
        self.sharded = False  # by FSDP2: every forward pass is then a collective that all processes must make
        self._tree: dict[str, Any] | None = None  # see _walk()
        module.requires_grad_(False)
        if lora is None:
            module.to(torch.float32).requires_grad_(True)  # optimizer state and updates in float32
            self.reference_copy = copy.deepcopy(module).requires_grad_(False).eval()
            return
        from peft import LoraConfig

        self.peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=sorted(lora.target_modules), init_lora_weights=True)
        with torch.random.fork_rng(devices=[]):  # LoRA A's random init reproducible from the run seed
            torch.manual_seed(seed)
            try:
                self._add_adapter("default")
            except ValueError as error:  # peft: "Target modules {...} not found in the base model"
                names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)][:8]
                raise VpoError(f"lora.target_modules {sorted(lora.target_modules)} match no layer of "
                               f"{type(module).__name__} ({error}); linear layers are named e.g. {names}") from None
        for parameter in self.parameters():
            parameter.data = parameter.data.float()

    # ------------------------------------------------------------------------------------------ adapters
    def _add_adapter(self, name: str) -> None:
        config = copy.deepcopy(self.peft_config)
        if hasattr(self.module, "add_adapter"):  # diffusers models keep their own peft bookkeeping
            self.module.add_adapter(config, adapter_name=name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, self.module, adapter_name=name)
            self.module.peft_config = {**getattr(self.module, "peft_config", {}), name: config}
        self._tree = None  # new LoRA layers, which peft builds in train mode: they follow the module's mode
        self.module.train(self.module.training)
        self._set_adapter("default")

    def _walk(self) -> dict[str, Any]:
        """What mode and adapter switches touch, found once: they run several times a step, and a walk over the
        module tree in Python costs 0.1-0.2 ms each time even on the tiny test models. Reset when modules or
        parameters are replaced (a new adapter, sharding)."""
        if self._tree is None:
            modules = list(self.module.modules())
            self._tree = {"modules": modules, "plain": all(type(m).train is torch.nn.Module.train for m in modules),
                          "tuners": [], "lora": [(n, p) for n, p in self.module.named_parameters() if ".lora_" in n]}
            if self.lora is not None:
                from peft.tuners.tuners_utils import BaseTunerLayer

                self._tree["tuners"] = [m for m in modules if isinstance(m, BaseTunerLayer)]
        return self._tree

    def _set_adapter(self, name: str | None) -> None:
        """Activate one adapter (peft makes it the only one requiring grad), or disable all with ``None``."""
        tree = self._walk()
        for layer in tree["tuners"]:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)  # re-activates the active adapter
                if layer.active_adapters != [name]:
                    layer.set_adapter(name)
        if name is not None:  # only the learner is ever trained
            for pname, parameter in tree["lora"]:
                parameter.requires_grad_(f".{REFERENCE}." not in pname)

    def _add_reference_adapter(self) -> None:
        with warnings.catch_warnings():  # peft warns about a second adapter: that is the point here
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            self._add_adapter(REFERENCE)
        for name, parameter in self.module.named_parameters():
            if f".{REFERENCE}." in name:
                parameter.data = parameter.data.float()  # an exact copy of the float32 learner

    @property
    def has_reference_adapter(self) -> bool:
        return self.lora is not None and REFERENCE in getattr(self.module, "peft_config", {}) and \
            not self._unused_reference

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: the learner adapter, or every weight under full fine-tuning."""
        if self.lora is None:
            return list(self.module.parameters())
        return [p for n, p in self.module.named_parameters() if ".lora_" in n and f".{REFERENCE}." not in n]

    def adapted_module_names(self) -> list[str]:
        """Names of the modules that carry the learner adapter (for checks of ``target_modules``)."""
        return sorted(n for n, m in self.module.named_modules()
                      if n and any(name == "default" for name in getattr(m, "lora_A", {})))

    # ------------------------------------------------------------------------------------------ forward
    def train(self, mode: bool) -> bool:
        """Train (True) or eval mode; returns the previous mode. Sets what ``Module.train()`` sets, without its
        per-module ``__setattr__`` (0.2 ms a call on the tiny test models, twice a step), unless a module
        overrides ``train()``."""
        previous = self.module.training
        if mode != previous:
            tree = self._walk()
            if tree["plain"]:
                for module in tree["modules"]:
                    vars(module)["training"] = mode  # all that Module.train() sets
            else:
                self.module.train(mode)
        return previous

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode inside (sampling: a row must not depend on dropout draws), the previous mode after."""
        previous = self.train(False)
        try:
            yield
        finally:
            self.train(previous)

    @property
    def forward_module(self) -> torch.nn.Module:
        if self._in_reference and self.reference_copy is not None:
            return self.reference_copy
        return self._wrapped if self._wrapped is not None else self.module

    def wrap(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Route forward passes through ``wrap(module)`` (the engine's DDP wrapper)."""
        self._wrapped = wrap(self.module)

    def shard(self) -> None:
        """FSDP2: shard each block (``shard_units``) and then the module (and the frozen reference of full
        fine-tuning the same way) over every process with torch's ``fully_shard``. A block's weights are gathered
        only around its own forward and backward; the rest of the module's, around the whole forward."""
        from torch.distributed.fsdp import fully_shard

        if self.lora is not None and REFERENCE not in getattr(self.module, "peft_config", {}):
            self._add_reference_adapter()  # peft cannot add one to a sharded module later
            self._unused_reference = True
        self._tree, self.sharded = None, True  # parameters become DTensors
        for module in (self.module, self.reference_copy):
            if module is not None:
                for block in shard_units(module):
                    fully_shard(block)
                fully_shard(module)

    def reshard(self) -> None:
        """FSDP2: make every parameter the sharded DTensor that the optimizer holds again. A forward pass without
        a backward (sampling) leaves the root module's parameters gathered."""
        for module in (self.module, self.reference_copy):
            for m in module.modules() if module is not None else ():
                if hasattr(m, "reshard"):  # an FSDP2 module
                    m.reshard()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Inside, sharded (FSDP2) parameters are replaced by full tensors, so ordinary save code works. Every
        process must enter it together (it all-gathers)."""
        self.reshard()
        swapped = [(m, n, p) for m in self.module.modules() for n, p in m.named_parameters(recurse=False)
                   if hasattr(p, "full_tensor")]
        for m, n, p in swapped:
            m._parameters[n] = torch.nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
        try:
            yield
        finally:
            for m, n, p in swapped:
                m._parameters[n] = p

    @contextlib.contextmanager
    def use_reference(self) -> Iterator[None]:
        previous, self._in_reference = self._in_reference, True
        if self.lora is not None:
            self._set_adapter(REFERENCE if self.has_reference_adapter else None)
        try:
            yield
        finally:
            self._in_reference = previous
            if self.lora is not None and not previous:
                self._set_adapter("default")

    @torch.no_grad()
    def update_reference(self) -> None:
        """Reference := the current weights."""
        if self.reference_copy is not None:
            self.reference_copy.load_state_dict(self.module.state_dict())
            return
        if REFERENCE not in getattr(self.module, "peft_config", {}):
            self._add_reference_adapter()
        self._unused_reference = False
        parameters = dict(self.module.named_parameters())
        for name, parameter in parameters.items():
            if ".lora_" in name and ".default." in name:
                parameters[name.replace(".default.", f".{REFERENCE}.")].copy_(parameter)  # in place: FSDP2 shards too

    # ------------------------------------------------------------------------------------------ state
    # Under FSDP2 parameters are sharded DTensors: these gather them, so every rank must call them together.
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learner weights under ``module.*`` (the reference adapter's names contain ``.reference.``), and the
        frozen copy under ``reference.*`` with full fine-tuning."""
        state = {f"module.{n}": _full(p) for n, p in self.module.named_parameters()
                 if self.lora is None or (".lora_" in n and not (self._unused_reference and f".{REFERENCE}." in n))}
        if self.reference_copy is not None:
            state.update({f"reference.{n}": _full(t) for n, t in self.reference_copy.state_dict().items()})
        return state


    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], what: str = "policy") -> None:
        if self.lora is not None and any(f".{REFERENCE}." in key for key in state):
            self.update_reference()  # creates the adapter; its weights are overwritten below
        parameters = dict(self.module.named_parameters())
        reference = self.reference_copy.state_dict() if self.reference_copy is not None else {}
        expected = set(self.state_dict())
        bad = sorted(set(state) ^ expected)
        for key, value in state.items():
            prefix, _, name = key.partition(".")
            target = (parameters if prefix == "module" else reference).get(name)
            if target is None or target.shape != value.shape:
                bad.append(key)
            elif hasattr(target, "device_mesh"):  # an FSDP2 shard: keep this rank's part of the full tensor
                from torch.distributed.tensor import distribute_tensor

                target.copy_(distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                               target.placements))
            else:
                target.copy_(value)
        if bad:
            raise VpoError(f"checkpoint does not match this {what} ({len(set(bad))} missing, unknown or mis-shaped "
                           f"entries, e.g. {sorted(set(bad))[:3]}): was it saved with another model, LoRA rank, "
                           f"target_modules or full fine-tuning setting?")

    def save_peft_adapter(self, directory: Path) -> None:
        """``adapter_model.safetensors`` + ``adapter_config.json``, loadable with ``peft.PeftModel.from_pretrained``
        on the same base module (for models without a diffusers LoRA format)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.module, adapter_name="default")
        save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in sorted(weights.items())},
                  str(directory / "adapter_model.safetensors"))
        config = sorted_config(self.module.peft_config["default"])
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def shard_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP2 shards one by one, inner before outer: the submodules whose class is named in a
    ``_no_split_modules`` declared in the tree (the convention of diffusers and transformers models, which
    accelerate's FSDP wrapping follows too), else the children of every outermost ``ModuleList``."""
    names = {n for m in module.modules() for n in getattr(m, "_no_split_modules", None) or ()}
    if names:
        return [m for m in reversed(list(module.modules())) if type(m).__name__ in names and m is not module]
    units, todo = [], list(module.children())
    while todo:
        child = todo.pop(0)
        if isinstance(child, torch.nn.ModuleList):
            units.extend(child)
        else:
            todo.extend(child.children())
    return units


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, unsharded copy (DTensor shards are all-gathered)."""
    tensor = tensor.detach()
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).clone()
