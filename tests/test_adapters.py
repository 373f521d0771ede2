"""TrainableModule's train/eval switch: it sets the flags itself (Module.train() is slow in Python), so it must set
exactly what Module.train() would, follow modules added later, and defer to a module that overrides train(). Which
blocks FSDP2 shards one by one."""

from __future__ import annotations

import torch

from vpo_core.adapters import TrainableModule, shard_units
from vpo_core.types import LoraSpec


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(8, 8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.to_q(x))


def flags(module: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


def lora() -> LoraSpec:
    return LoraSpec(rank=2, alpha=2, dropout=0.5, target_modules=["to_q"])


def test_train_switch_sets_every_flag_like_module_train_and_follows_a_new_adapter():
    trainable = TrainableModule(Net(), lora(), seed=0)
    expected = TrainableModule(Net(), lora(), seed=0)  # Module.train() on a twin, to compare every flag
    assert trainable.train(False) is True  # returns the previous mode
    expected.module.train(False)
    assert flags(trainable.module) == flags(expected.module)
    assert not any(flags(trainable.module).values())
    x = torch.randn(4, 8)
    assert torch.equal(trainable.module(x), trainable.module(x))  # no dropout draws in eval mode

    trainable.update_reference()  # adds the "reference" adapter: new LoRA layers and dropouts
    added = [n for n in flags(trainable.module) if ".reference" in n]
    assert added and not any(flags(trainable.module)[n] for n in added)  # peft builds them in train mode
    with trainable.use_reference():
        assert torch.equal(trainable.module(x), trainable.module(x))
    assert trainable.train(True) is False
    assert all(flags(trainable.module).values())  # the new modules too
    assert not torch.equal(trainable.module(x), trainable.module(x))  # dropout draws again

    with trainable.eval_mode():
        assert not any(flags(trainable.module).values())
    assert all(flags(trainable.module).values())


def test_train_switch_defers_to_a_module_that_overrides_train():
    calls = []

    class Custom(torch.nn.Linear):
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    net = Net()
    net.block[0] = Custom(8, 8)
    trainable = TrainableModule(net, lora(), seed=0)
    calls.clear()
    trainable.train(False)
    assert calls == [False] and not any(flags(trainable.module).values())
    trainable.train(False)  # no change: nothing is walked
    assert calls == [False]
    trainable.train(True)
    assert calls == [False, True] and all(flags(trainable.module).values())



class TwoLists(torch.nn.Module):
    """Two block lists (as Open-Sora's spatial and temporal blocks), a list nested inside a block (as diffusers'
    ``to_out``) and a module outside any list."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.first = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2))
        self.second = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Dropout()])])


def unit_names(net: torch.nn.Module) -> list[str]:
    names = {id(m): n for n, m in net.named_modules()}
    return [names[id(m)] for m in shard_units(net)]


def test_fsdp2_shards_every_outermost_list_block_by_block_or_the_declared_blocks_inner_first():
    assert unit_names(TwoLists()) == ["first.0", "first.1", "second.0"]
    declared = TwoLists()
    declared._no_split_modules = ["Sequential", "Linear"]  # as diffusers models declare their block classes
    # each block before the blocks that contain it (fully_shard's order); the module itself is sharded last, apart
    assert unit_names(declared) == ["second.0.0", "first.1.0", "first.1", "first.0.0", "first.0", "embed"]
