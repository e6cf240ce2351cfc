"""Timestep masks: the one place where timesteps become per-sample rank masks.

``timestep_mask(network, t)`` is what a training loop uses; :func:`tlora.attach` (the pipeline hook)
calls the same ``network.set_timesteps`` for every denoiser forward.
"""
from __future__ import annotations

from contextlib import contextmanager

from .network import TLoRANetwork
from .schedule import Timesteps


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
