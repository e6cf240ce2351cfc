"""Timestep masks: the one place where timesteps become per-sample rank masks.

``timestep_mask(network, t)`` is what a training loop uses; :func:`tlora.attach` (the pipeline hook)
calls the same ``network.set_timesteps`` for every denoiser forward.
"""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Optional, Union

import torch
import torch.nn as nn

from .families import Family, denoiser_of, detect
from .formats import load
from .layers import FOLD_MODES
from .network import TLoRANetwork, check_multiplier
from .schedule import Timesteps, timesteps_list


@contextmanager
def timestep_mask(network: TLoRANetwork, timesteps: Timesteps):
    """Mask every adapter for ``timesteps`` (training scale 0..T; (B,) per sample, or a scalar shared by
    the batch) for everything run inside the block: the forward, the backward, and any
    gradient-checkpoint recomputation that the backward triggers. Run ``loss.backward()`` inside the block.
    On exit the previous masks (full rank outside any block) are restored; blocks nest."""
    previous = network.mask_state()
    network.set_timesteps(timesteps)
    try:
        yield network
    finally:
        network.restore_mask_state(previous)


class AttachHandle:
    """What :func:`attach` returns. ``detach()`` leaves the pipeline exactly as before ``attach``.

    ``steps`` (when ``record=True``): one entry per denoiser call, ``(training-scale timesteps (B,),
    active ranks (B,) of the network's first schedule)``.
    """

    def __init__(self, pipe, denoiser: nn.Module, network: TLoRANetwork, family: Family, owns_network: bool,
                 previous_multiplier: float, record: bool):
        self.pipe, self.denoiser, self.network, self.family = pipe, denoiser, network, family
        self._owns, self._prev_mult, self.record = owns_network, previous_multiplier, record
        self.steps: list = []
        self._handles: list = []
        self._saved: list = []
        params = list(inspect.signature(denoiser.forward).parameters)
        self._t_pos = params.index("timestep") if "timestep" in params else 1   # where a positional t sits

    def _hook(self) -> None:
        """Mask every forward of the denoiser: set the masks before it, restore them after it."""
        self._handles = [self.denoiser.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.denoiser.register_forward_hook(self._post, with_kwargs=True, always_call=True)]

    def _pre(self, module, args, kwargs):
        t = kwargs.get("timestep", None)
        if t is None and len(args) > self._t_pos:
            t = args[self._t_pos]
        if t is None:
            raise RuntimeError(f"T-LoRA hook: {type(module).__name__} was called without a timestep")
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = sample.shape[0] if isinstance(sample, torch.Tensor) else 1
        ts = timesteps_list(t)
        if len(ts) == 1:
            ts = ts * batch                      # a 0-d timestep (UNet pipelines) applies to every sample
        ts = self._to_train_scale(ts)
        self._saved.append(self.network.mask_state())
        ranks = self.network.set_timesteps(ts)
        if self.record:
            self.steps.append((ts, next(iter(ranks.values()))))

    def _to_train_scale(self, ts: list) -> list:
        """Denoiser timesteps → training scale. Float noise (σ·1000 = 749.99994) and bf16 rounding of σ
        (Flux) would move t across a rank boundary, so t snaps to the scheduler's own grid when one is
        within 0.5 % of T."""
        scaled = [round(v * self.family.timestep_scale, 3) for v in ts]
        grid = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if not isinstance(grid, torch.Tensor) or grid.numel() == 0:
            return scaled
        grid = grid.detach().to("cpu", torch.float64)
        tol = 0.005 * self.network.config.num_train_timesteps
        out = []
        for v in scaled:
            i = int((grid - v).abs().argmin())
            g = float(grid[i])
            out.append(g if abs(g - v) <= tol else v)
        return out

    def _post(self, module, args, kwargs, output):
        if self._saved:
            self.network.restore_mask_state(self._saved.pop())

    def detach(self) -> None:
        self.network.set_folding(None)      # every base weight back, bit for bit
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._saved:
            self.network.restore_mask_state(self._saved[0])
            self._saved = []
        if self._owns:
            self.network.remove()
        else:
            self.network.multiplier = self._prev_mult

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def attach(pipe, weights_or_network: Union[str, os.PathLike, TLoRANetwork], multiplier: Optional[float] = None,
           mask: bool = True, record: bool = False, fold: Optional[str] = "auto") -> AttachHandle:
    """Mask every denoising step of a stock diffusers pipeline.

    ``pipe``: any pipeline with ``unet`` or ``transformer`` (or the denoiser itself). ``weights_or_network``:
    a native ``.safetensors`` file (loaded into the denoiser) or an injected :class:`TLoRANetwork`.
    A forward pre-hook reads the timestep (positional or keyword), brings it to the training scale of the
    denoiser's family, sets per-sample masks for that forward, and a forward hook clears them after it.
    ``mask=False`` attaches the adapters at full rank (for comparison only).

    ``fold``: sampling's fast path. Every sample of a sampling call shares one timestep, so each layer's masked
    ΔW is one matrix for that call; ``"auto"`` folds it into the base weight where the cost rule says that is
    cheaper than the unmerged adapter (incrementally as the rank grows), ``"always"`` folds at every such call,
    None never folds. Calls whose samples have different ranks run unmerged. Outside a no-grad pipeline call
    nothing is folded; ``detach()`` restores every base weight bit for bit (the weights before folding are
    kept while attached).
    """
    if multiplier is not None:               # every argument checked before anything is loaded or hooked
        multiplier = check_multiplier(multiplier)
    if fold not in FOLD_MODES:
        raise ValueError(f"fold must be None, 'auto' or 'always', got {fold!r}")
    if not isinstance(mask, bool):
        raise ValueError(f"mask must be True or False, got {mask!r}")
    denoiser = denoiser_of(pipe)
    family = detect(denoiser)
    _refuse_unsupported_scheduler(pipe)
    owns = not isinstance(weights_or_network, TLoRANetwork)
    if owns:
        network = load(weights_or_network, denoiser)
    else:
        network = weights_or_network
        network.refuse_if_removed()
        if network.model is not denoiser:
            raise ValueError("this network was injected into another model than the pipeline's denoiser")
    handle = AttachHandle(pipe, denoiser, network, family, owns, network.multiplier, record)
    previous_family = network.family
    try:
        network.refuse_if_merged()
        if multiplier is not None:
            network.multiplier = multiplier
        network.family = family.name
        if mask:
            handle._hook()
        network.set_folding(fold)
    except BaseException:                    # a failed attach leaves the pipeline (and the network) as they were
        handle.detach()
        network.family = previous_family
        raise
    return handle


def _refuse_unsupported_scheduler(pipe) -> None:
    """EDM-style schedulers pass c_noise = 0.25·log σ, not t: the mask would be wrong, so refuse."""
    sched = getattr(pipe, "scheduler", None)
    if sched is None:
        return
    cfg = getattr(sched, "config", {})
    if "EDM" in type(sched).__name__ or getattr(cfg, "timestep_type", None) == "continuous":
        raise ValueError(f"{type(sched).__name__} passes 0.25·log(sigma) as the timestep; T-LoRA masks need "
                         "a discrete-time scheduler (DDPM, DDIM, Euler with timestep_type='discrete', flow matching)")
