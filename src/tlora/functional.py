"""Pure weight math for the two adapter forms; no state, no modules.

Shapes use ``in_flat`` = in_features for Linear and in_channels * kh * kw for Conv2d (the base weight
flattened to 2-D, ``W.reshape(out, -1)``). All functions compute in float32.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

SigType = Literal["principal", "last", "middle"]
SIG_TYPES = ("principal", "last", "middle")


def select_triplets(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, sig_type: str):
    """Pick ``rank`` singular triplets from a thin SVD ``u (out, k), s (k,), vh (k, in_flat)``.

    principal: the largest; last: the smallest; middle: the block centred in the spectrum.
    Returns (q (rank, in_flat), p (out, rank), lam (rank,)).
    """
    k = s.shape[0]
    if rank > k:
        raise ValueError(f"ortho rank {rank} exceeds min(out, in) = {k} of the layer; lower the rank")
    if sig_type == "principal":
        sl = slice(0, rank)
    elif sig_type == "last":
        sl = slice(k - rank, k)
    elif sig_type == "middle":
        start = (k - rank) // 2
        sl = slice(start, start + rank)
    else:
        raise ValueError(f"sig_type must be one of {SIG_TYPES}, got {sig_type!r}")
    return vh[sl].contiguous(), u[:, sl].contiguous(), s[sl].contiguous()


def svd_init(weight2d: torch.Tensor, rank: int, sig_type: str, generator: Optional[torch.Generator] = None,
             from_weight: bool = True):
    """Ortho-LoRA initial (Q, P, λ).

    from_weight=True: SVD of the base weight (LyCORIS ``use_data_init=True``).
    from_weight=False: SVD of a random N(0, 1/rank) matrix of the weight's shape (the paper's and the
    official repository's choice; equal in distribution to its (in, out) layout).
    """
    out_f, in_flat = weight2d.shape
    if from_weight:
        m = weight2d.detach().to(torch.float32)
    else:
        m = torch.randn(out_f, in_flat, generator=generator, device=weight2d.device) / rank
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return select_triplets(u, s, vh, rank, sig_type)


def lora_delta(down: torch.Tensor, up: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ΔW = up · diag(mask) · down: down (r, in_flat), up (out, r), mask (r,) → (out, in_flat)."""
    down, up = down.float(), up.float()
    if mask is not None:
        up = up * mask.float()
    return up @ down


def ortho_delta(q, p, lam, q0, p0, lam0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ΔW = P·diag(λ⊙m)·Q − P0·diag(λ0⊙m)·Q0, all (r, in_flat) / (out, r) / (r,) → (out, in_flat)."""
    m = torch.ones_like(lam, dtype=torch.float32) if mask is None else mask.float()
    return (p.float() * (lam.float() * m)) @ q.float() - (p0.float() * (lam0.float() * m)) @ q0.float()


def ortho_as_lora(q, p, lam, q0, p0, lam0):
    """The full-rank ortho adapter as a plain LoRA of rank 2r (exact):
    down = [diag(λ)Q ; diag(λ0)Q0] (2r, in_flat), up = [P, −P0] (out, 2r)."""
    down = torch.cat([lam.float()[:, None] * q.float(), lam0.float()[:, None] * q0.float()], 0)
    up = torch.cat([p.float(), -p0.float()], 1)
    return down, up


def orthogonality_loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F for q (r, in_flat), p (out, r); a float32 scalar."""
    q, p = q.float(), p.float()
    eye = torch.eye(q.shape[0], device=q.device)
    return ((p.T @ p - eye) ** 2).sum() + ((q @ q.T - eye) ** 2).sum()
