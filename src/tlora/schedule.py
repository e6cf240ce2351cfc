"""The T-LoRA rank schedule: pure functions, no nn code.

At timestep t (0 = clean, T = pure noise) only the first

    r(t) = floor(((T - t) / T) ** exponent * (max_rank - min_rank)) + min_rank      (exponent = the paper's α)

ranks of an adapter are active (Soboleva et al. 2025, eq. for the mask M_t). ``t`` is always on the
*training* scale 0..T; see :mod:`tlora.families` for how each pipeline's timestep is brought there.

Ranks are computed with Python floats, one per distinct timestep, so they agree bit for bit with the
official code and with LyCORIS ``compute_timestep_mask`` (both use Python floats and ``int()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .settings import check_schedule

Timesteps = Union[int, float, Sequence[float], torch.Tensor]


def _check(max_rank: int, min_rank: int, exponent: float, num_train_timesteps: int) -> None:
    check_schedule(max_rank, min_rank, exponent, num_train_timesteps)     # the settings schema's types


def _rank(t: float, max_rank: int, min_rank: int, exponent: float, T: int) -> int:
    t = min(max(float(t), 0.0), float(T))  # clamp: t > T with exponent < 1 would be a complex power
    return min(int(((T - t) / T) ** exponent * (max_rank - min_rank)) + min_rank, max_rank)


def active_rank(t: float, max_rank: int, min_rank: int = 1, exponent: float = 1.0,
                num_train_timesteps: int = 1000) -> int:
    """Number of active ranks at training-scale timestep ``t`` (clamped into [0, T])."""
    _check(max_rank, min_rank, exponent, num_train_timesteps)
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"active_rank takes one timestep, got a tensor of shape {tuple(t.shape)}; use rank_mask")
        t = t.item()
    return _rank(t, max_rank, min_rank, exponent, num_train_timesteps)


def timesteps_list(timesteps: Timesteps) -> list[float]:
    """Flatten ints, floats, 0-d or 1-d tensors (any dtype, any device) into a list of floats."""
    if isinstance(timesteps, torch.Tensor):
        if timesteps.dim() > 1:
            raise ValueError(f"timesteps must be a scalar or 1-d, got shape {tuple(timesteps.shape)}")
        return [float(v) for v in timesteps.detach().reshape(-1).to("cpu", torch.float64).tolist()]
    if isinstance(timesteps, (int, float)):
        return [float(timesteps)]
    return [float(v) for v in timesteps]


def active_ranks(timesteps: Timesteps, max_rank: int, min_rank: int = 1, exponent: float = 1.0,
                 num_train_timesteps: int = 1000) -> list[int]:
    """Active rank per sample: a list of B ints."""
    _check(max_rank, min_rank, exponent, num_train_timesteps)
    ts = timesteps_list(timesteps)
    cache: dict[float, int] = {}
    return [cache.setdefault(t, _rank(t, max_rank, min_rank, exponent, num_train_timesteps)) for t in ts]


def mask_from_ranks(ranks: Sequence[int], max_rank: int) -> torch.Tensor:
    """Tensor[B, max_rank] float32 with the first ``ranks[b]`` entries of row b set to 1."""
    r = torch.as_tensor(list(ranks), dtype=torch.long).reshape(-1, 1)
    return (torch.arange(max_rank).reshape(1, -1) < r).to(torch.float32)


def rank_mask(timesteps: Timesteps, max_rank: int, min_rank: int = 1, exponent: float = 1.0,
              num_train_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample binary rank mask, Tensor[B, max_rank] float32 (B = 1 for a scalar timestep)."""
    return mask_from_ranks(active_ranks(timesteps, max_rank, min_rank, exponent, num_train_timesteps), max_rank)


@dataclass(frozen=True)
class RankSchedule:
    """One adapter's schedule. Hashable, so adapters sharing a schedule share one computed mask."""
    max_rank: int
    min_rank: int = 1
    exponent: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        _check(self.max_rank, self.min_rank, self.exponent, self.num_train_timesteps)

    def ranks(self, timesteps: Timesteps) -> list[int]:
        return active_ranks(timesteps, self.max_rank, self.min_rank, self.exponent, self.num_train_timesteps)

    def table(self, at: Sequence[int] = (0, 250, 500, 750, 999)) -> list[tuple[int, int]]:
        """[(t, active rank)] at the given timesteps, for printing."""
        return [(t, r) for t, r in zip(at, self.ranks(list(at)))]
