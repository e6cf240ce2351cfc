"""Inject T-LoRA adapters into a model and handle them as one network.

``inject(model, config)`` walks ``model.named_modules()`` with LyCORIS semantics: every nn.Linear /
nn.Conv2d inside a module whose class name is in ``config.target_module`` (or a key of
``module_algo_map``), and every module whose path matches ``config.target_name``, gets a
:class:`~tlora.layers.TLoRAAdapter`. The model's own modules are not replaced; ``remove()`` restores
the model's state_dict exactly.
"""
from __future__ import annotations

import math

import fnmatch
import re
import warnings
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn

from .config import TLoRAConfig
from .layers import ADAPTER_ATTR, QUANTIZED_MERGE, TLoRAAdapter
from .quantize import weight_shape
from .schedule import RankSchedule, Timesteps, mask_from_ranks


class TLoRANetwork:
    """The adapters of one model, by module path (``network.adapters["down_blocks.1...to_q"]``)."""

    def __init__(self, model: nn.Module, config: TLoRAConfig, adapters: Dict[str, TLoRAAdapter]):
        self.model, self.config, self.adapters = model, config.replace(), adapters   # a copy: ours to change
        self.family: Optional[str] = None      # set by tlora.attach / training; saved in the file header
        self.header: Optional[dict] = None     # the file header, when loaded from a file

    # -- parameters ----------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        for a in self.adapters.values():
            yield from a.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, a in self.adapters.items():
            for n, p in a.named_parameters():
                yield f"{path}.{n}", p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Every tensor of every adapter (parameters and frozen buffers), key ``<path>.<name>``."""
        return {f"{path}.{k}": v for path, a in self.adapters.items() for k, v in a.state_dict().items()}

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        """Strict load; raises ValueError listing missing, unexpected and mis-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if shapes:
            problems.append(f"{len(shapes)} with another shape (first: {shapes[0]})")
        if problems:
            raise ValueError("weights do not fit this model: " + "; ".join(problems))
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(sd[k].to(v.dtype))

    # -- multiplier, merge, removal ------------------------------------------------------------------
    @property
    def multiplier(self) -> float:
        return self.config.multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        value = check_multiplier(value)                 # refused before anything changes
        self.config.multiplier = value
        for a in self.adapters.values():
            a.multiplier = float(value)

    def merge(self) -> None:
        """Merge every adapter into its base weight; a quantized base refuses before any weight changes."""
        if any(a.quantized_base for a in self.adapters.values()):
            raise ValueError(QUANTIZED_MERGE)
        for a in self.adapters.values():
            a.merge()

    def unmerge(self) -> None:
        for a in self.adapters.values():
            a.unmerge()

    def set_folding(self, mode) -> None:
        """Sampling's fast path for every adapter (:meth:`TLoRAAdapter.set_folding`): "auto", "always" or None."""
        for a in self.adapters.values():
            a.set_folding(mode)

    def folded_ranks(self) -> Dict[str, Optional[int]]:
        """Module path → ranks folded into its base weight now (None: not folded)."""
        return {p: a.folded_rank for p, a in self.adapters.items()}

    def remove(self) -> None:
        """Detach every adapter; the model is exactly as before ``inject``. The network is empty afterwards:
        saving or attaching it is refused."""
        for a in self.adapters.values():
            a.detach_from_base()
        self.adapters = {}
        self.removed = True

    def refuse_if_removed(self) -> None:
        if getattr(self, "removed", False):
            raise ValueError("this network was removed from its model (remove()): it holds no adapters to save "
                             "or attach; inject or load again")

    def orthogonality_loss(self) -> torch.Tensor:
        """Sum over ortho adapters of ‖PᵀP − I‖² + ‖QQᵀ − I‖²."""
        losses = [a.orthogonality_loss() for a in self.adapters.values()]          # vanilla adapters give 0
        return torch.stack(losses).sum() if losses else torch.zeros(())

    # -- masks ---------------------------------------------------------------------------------------
    def schedules(self) -> Dict[RankSchedule, list[TLoRAAdapter]]:
        groups: Dict[RankSchedule, list[TLoRAAdapter]] = {}
        for a in self.adapters.values():
            groups.setdefault(a.schedule, []).append(a)
        return groups

    def set_timesteps(self, timesteps: Timesteps) -> Dict[RankSchedule, list[int]]:
        """Mask every adapter for per-sample training-scale timesteps (B,) (or a scalar, shared).
        One mask is computed per distinct schedule. Returns the active ranks per schedule."""
        self.refuse_if_merged()
        out = {}
        for sched, adapters in self.schedules().items():
            ranks = sched.ranks(timesteps)
            shared = ranks[0] if all(r == ranks[0] for r in ranks) else None
            mask = mask_from_ranks(ranks[:1] if shared is not None else ranks, sched.max_rank)
            by_device: Dict[torch.device, torch.Tensor] = {}
            for a in adapters:
                dev = a.base_layer.weight.device
                if dev not in by_device:
                    by_device[dev] = mask.to(dev)
                a.set_mask(by_device[dev], shared, max(ranks))
            out[sched] = ranks
        return out

    def refuse_if_merged(self) -> None:
        """A timestep mask cannot act on merged weights: refuse while any adapter is merged."""
        if any(a.merged for a in self.adapters.values()):
            raise RuntimeError("adapters are merged: a timestep mask cannot act on merged weights; call unmerge() first")

    def clear_mask(self) -> None:
        for a in self.adapters.values():
            a.set_mask(None)

    def mask_state(self) -> list:
        return [a.mask_state() for a in self.adapters.values()]

    def restore_mask_state(self, state: list) -> None:
        for a, s in zip(self.adapters.values(), state):
            a.set_mask(*s)

    def __repr__(self) -> str:
        return (f"TLoRANetwork({len(self.adapters)} adapters, {self.num_parameters():,} trainable parameters, "
                f"variant={self.config.variant}, rank={self.config.rank})")


def _matches(pattern: str, name: str, use_fnmatch: bool) -> bool:
    if name == pattern:
        return True
    if use_fnmatch:
        return fnmatch.fnmatch(name, pattern)
    try:
        return re.match(pattern, name) is not None
    except re.error:
        return False


def _wrappable(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d))


def find_targets(model: nn.Module, config: TLoRAConfig) -> Dict[str, list[str]]:
    """Module paths to wrap → lookup keys for ``module_algo_map`` (innermost class name first, then path)."""
    # module_algo_map keys are targets too (LyCORIS): class names, or module paths when they contain "."
    classes = set(config.target_module) | {k for k in config.module_algo_map if "." not in k}
    names = list(config.target_name) + [k for k in config.module_algo_map if "." in k]
    excluded = lambda p: any(_matches(x, p, config.use_fnmatch) for x in config.exclude_name)  # noqa: E731
    targets: Dict[str, list[str]] = {}
    for path, mod in model.named_modules():
        if not path or excluded(path) or isinstance(mod, TLoRAAdapter):
            continue
        cls = type(mod).__name__
        if cls in classes:
            for sub, leaf in mod.named_modules():
                full = f"{path}.{sub}" if sub else path
                if _wrappable(leaf) and not excluded(full):
                    # nested targeted classes: the innermost one (visited later) decides the overrides
                    keys = targets.get(full, [])
                    targets[full] = [full, cls] + [k for k in keys if k not in (full, cls)]
        if any(_matches(n, path, config.use_fnmatch) for n in names):
            leaves = [(path, mod)] if _wrappable(mod) else [
                (f"{path}.{s}", m) for s, m in mod.named_modules() if s and _wrappable(m)]
            for full, leaf in leaves:
                if not excluded(full):
                    targets.setdefault(full, [full, type(leaf).__name__])
    return targets


def check_multiplier(value) -> float:
    """An adapter strength: a finite real number (no bool, no NaN or inf); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"multiplier must be a finite number, got {value!r}")
    return float(value)


def inject(model: nn.Module, config: Optional[TLoRAConfig] = None, generator: Optional[torch.Generator] = None,
           init_weights: bool = True) -> TLoRANetwork:
    """Attach T-LoRA adapters to ``model`` (in place) and return the network that holds them. ``init_weights``
    False leaves the tensors zero (no SVD): for weights about to be loaded, or shapes only (the meta device).

    Raises ValueError when nothing matches, naming the targets and a few module classes of the model.
    """
    config = TLoRAConfig() if config is None else config
    if not isinstance(config, TLoRAConfig):
        raise TypeError(f"inject takes a TLoRAConfig, got {type(config).__name__}")
    targets = find_targets(model, config)
    if not targets:
        classes = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise ValueError(f"T-LoRA targets matched nothing in {type(model).__name__}: target_module="
                         f"{list(config.target_module)}, target_name={list(config.target_name)}; "
                         f"module classes here include {classes}")
    modules = dict(model.named_modules())
    taken = next((p for p in targets if hasattr(modules[p], ADAPTER_ATTR)), None)
    if taken is not None:                      # checked for all before any adapter is made
        raise ValueError(f"{taken} already has a T-LoRA adapter; remove() the other network first")
    adapters: Dict[str, TLoRAAdapter] = {}
    try:
        clamped = _make_adapters(modules, targets, config, generator, init_weights, adapters)
    except BaseException:                      # a failed inject leaves the model as it was
        for a in adapters.values():
            a.detach_from_base()
        raise
    if clamped:
        warnings.warn(f"{len(clamped)} layers are narrower than rank {config.rank} (first: {clamped[0]}); their "
                      "ranks are clamped to the layer size", stacklevel=2)
    return TLoRANetwork(model, config, adapters)


def _make_adapters(modules: dict, targets: dict, config: TLoRAConfig, generator, init_weights: bool,
                   adapters: Dict[str, TLoRAAdapter]) -> list:
    """One adapter per target into ``adapters`` (filled as they are made, so a failure can undo them); returns
    the paths whose ortho rank was clamped to a narrow layer."""
    clamped = []
    for path, keys in targets.items():
        base = modules[path]
        kw = config.for_layer(keys, isinstance(base, nn.Conv2d))
        shape = weight_shape(base)
        size = min(shape[0], shape[1:].numel())
        if kw["variant"] == "ortho" and kw["rank"] > size:
            # an orthonormal Q (r × in) needs r ≤ in: narrow layers get the largest rank they can hold,
            # with a schedule of their own (never a mask padded with ones)
            clamped.append(path)
            kw.update(rank=size, min_rank=min(kw["min_rank"], size))
        adapters[path] = TLoRAAdapter(base, num_train_timesteps=config.num_train_timesteps,
                                      multiplier=config.multiplier, generator=generator,
                                      init_weights=init_weights, **kw)
    return clamped
