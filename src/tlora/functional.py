"""Pure weight math for the two adapter forms; no state, no modules.

Shapes use ``in_flat`` = in_features for Linear and in_channels * kh * kw for Conv2d (the base weight
flattened to 2-D, ``W.reshape(out, -1)``). All functions compute in float32.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from .config import SIG_TYPES, SVD_METHODS

SigType = Literal["principal", "last", "middle"]


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


def _haar_frame(n: int, r: int, generator, device) -> torch.Tensor:
    """n × r with orthonormal columns, Haar-distributed (QR of a Gaussian with the sign fix)."""
    q, rr = torch.linalg.qr(torch.randn(n, r, generator=generator, device=device))
    d = torch.sign(torch.diagonal(rr))
    d[d == 0] = 1
    return q * d


def randomized_principal(w: torch.Tensor, rank: int, generator=None, oversample: int = 16, n_iter: int = 4):
    """Top-``rank`` singular triplets by a randomized range finder with power iterations (Halko et al. 2011):
    orthonormal factors, singular values within a few % of the exact ones on flat spectra and far closer on
    trained weights. Returns (q (rank, in), p (out, rank), lam (rank,))."""
    k = min(rank + oversample, *w.shape)
    y = w @ torch.randn(w.shape[1], k, generator=generator, device=w.device)
    basis = torch.linalg.qr(y)[0]
    for _ in range(n_iter):
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.T @ basis)[0])[0]
    ub, s, vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
    return vh[:rank].contiguous(), (basis @ ub[:, :rank]).contiguous(), s[:rank].contiguous()


def svd_init(weight2d: torch.Tensor, rank: int, sig_type: str, generator: Optional[torch.Generator] = None,
             from_weight: bool = True, method: str = "auto"):
    """Ortho-LoRA initial (Q (rank, in_flat), P (out, rank), λ (rank,)) and the method used.

    from_weight=True: SVD of the base weight (LyCORIS ``use_data_init=True``). ``method="exact"`` is a full
    SVD, bit-compatible with LyCORIS; ``"auto"`` uses a randomized range finder for principal triplets of
    large layers (rank ≤ min(out, in) / 4), ~10× faster on SDXL-size layers.
    from_weight=False: the SVD of a random N(0, 1/rank) matrix (the paper's and the official repository's
    choice). ``"exact"`` computes it; ``"auto"`` samples the same distribution without the full SVD: the
    singular vectors of a Gaussian matrix are Haar-distributed and independent of its singular values, so
    Q and P are Haar frames and λ the selected singular values (from the eigenvalues of the Gram matrix).
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    out_f, in_flat = weight2d.shape
    k = min(out_f, in_flat)
    if rank > k:
        raise ValueError(f"ortho rank {rank} exceeds min(out, in) = {k} of the layer; lower the rank")
    dev = weight2d.device
    if from_weight:
        w = weight2d.detach().to(torch.float32)
        if method == "auto" and sig_type == "principal" and 4 * rank <= k:
            return (*randomized_principal(w, rank, generator), "randomized")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (*select_triplets(u, s, vh, rank, sig_type), "exact")
    m = torch.randn(out_f, in_flat, generator=generator, device=dev) / rank
    if method == "exact":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return (*select_triplets(u, s, vh, rank, sig_type), "exact")
    gram = m @ m.T if out_f <= in_flat else m.T @ m
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)          # k singular values, descending
    _, _, lam = select_triplets(torch.empty(0, k), s, torch.empty(k, 0), rank, sig_type)
    q = _haar_frame(in_flat, rank, generator, dev).T.contiguous()
    p = _haar_frame(out_f, rank, generator, dev).contiguous()
    return q, p, lam, "haar"


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
