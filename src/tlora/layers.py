"""T-LoRA adapters for ``nn.Linear`` and ``nn.Conv2d``.

An adapter never replaces its base layer: it is registered as the child ``tlora_adapter`` of the base
layer and adds its delta through a forward hook, so the model's own code (diffusers attention processors,
fused projections, gradient checkpointing) runs unchanged:

    y = base(x) + multiplier · scale · up(mask ⊙ down(x))                          (vanilla)
    y = base(x) + multiplier · scale · [P(λ⊙m ⊙ Qx) − P0(λ0⊙m ⊙ Q0x)]                (ortho)

For Conv2d the down projection is a conv with the base layer's geometry (kernel, stride, padding,
dilation, padding mode) and the up projection is 1×1, so ΔW = up ∘ down is an exact conv kernel.

The mask is per sample, shape (B, R) (or (1, R), shared by the batch), broadcast over tokens or pixels.
When every sample has the same prefix rank r, only the first r ranks are computed (the fast path).
Adapter math runs in float32 whatever the base dtype; the delta is cast back to the output dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as Fn
from .schedule import RankSchedule

VARIANTS = ("vanilla", "ortho")
INITS = ("random", "weight")
ADAPTER_ATTR = "tlora_adapter"


class TLoRAAdapter(nn.Module):
    """The delta of one base layer.

    Parameters (float32): vanilla ``lora_down`` (R, in, [kh, kw]), ``lora_up`` (out, R, [1, 1]);
    ortho ``q`` (R, in, [kh, kw]), ``p`` (out, R, [1, 1]), ``lam`` (R,), and frozen buffers ``q0``, ``p0``,
    ``lam0`` (their initial values). ``scale`` = alpha / rank.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: Optional[float] = None, variant: str = "ortho",
                 init: str = "random", sig_type: str = "last", min_rank: int = 1, exponent: float = 1.0,
                 num_train_timesteps: int = 1000, multiplier: float = 1.0,
                 generator: Optional[torch.Generator] = None, init_weights: bool = True, svd: str = "auto"):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"T-LoRA wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"grouped Conv2d (groups={base.groups}) is not supported")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if sig_type not in Fn.SIG_TYPES:
            raise ValueError(f"sig_type must be one of {Fn.SIG_TYPES}, got {sig_type!r}")
        self.schedule = RankSchedule(rank, min_rank, float(exponent), num_train_timesteps)
        self.rank, self.variant, self.init, self.sig_type, self.svd = rank, variant, init, sig_type, svd
        self.alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self.scale = self.alpha / rank
        self.multiplier = float(multiplier)
        self.is_conv = isinstance(base, nn.Conv2d)
        object.__setattr__(self, "_base", base)  # a reference, not a child: the base owns the adapter

        w = base.weight.detach()
        out_f = w.shape[0]
        down_shape = (rank, *w.shape[1:])                     # (R, in) or (R, in, kh, kw)
        up_shape = (out_f, rank) + ((1, 1) if self.is_conv else ())
        dev = w.device
        if variant == "vanilla":
            down = (torch.randn(down_shape, generator=generator, device=dev) / rank if init_weights  # N(0, 1/rank)
                    else torch.zeros(down_shape, device=dev))
            self.lora_down = nn.Parameter(down)
            self.lora_up = nn.Parameter(torch.zeros(up_shape, device=dev))
        else:
            if init_weights:
                q, p, lam, self.svd = Fn.svd_init(w.reshape(out_f, -1), rank, sig_type, generator,
                                                  from_weight=(init == "weight"), method=svd)
            else:  # about to be loaded from a file: skip the SVD
                if rank > min(out_f, w[0].numel()):
                    raise ValueError(f"ortho rank {rank} exceeds min(out, in) = {min(out_f, w[0].numel())} of the layer")
                q, p, lam = (torch.zeros(rank, w[0].numel(), device=dev), torch.zeros(out_f, rank, device=dev),
                             torch.zeros(rank, device=dev))
            self.q = nn.Parameter(q.reshape(down_shape).clone())
            self.p = nn.Parameter(p.reshape(up_shape).clone())
            self.lam = nn.Parameter(lam.clone())
            self.register_buffer("q0", q.reshape(down_shape).clone())
            self.register_buffer("p0", p.reshape(up_shape).clone())
            self.register_buffer("lam0", lam.clone())
        self._mask: Optional[torch.Tensor] = None      # (B, R) float32, or None = full rank
        self._shared_rank: Optional[int] = None        # r when every row of the mask is the same prefix
        self._max_rank: Optional[int] = None           # per-sample masks: no row has a 1 past this rank
        self.merged = False
        self._backup: Optional[torch.Tensor] = None
        self._hook = base.register_forward_hook(_add_delta)
        base.add_module(ADAPTER_ATTR, self)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        return self._base

    def set_mask(self, mask: Optional[torch.Tensor], shared_rank: Optional[int] = None,
                 max_rank: Optional[int] = None) -> None:
        """Mask the ranks: ``mask`` (B, R) or (1, R) of 0/1, or None for full rank. ``shared_rank`` (if
        known) says every row is the same prefix of that length; ``max_rank`` that no row has a 1 past it
        (per-sample masks then compute only those ranks). Both are derived when not given."""
        if mask is None:
            self._mask, self._shared_rank, self._max_rank = None, None, None
            return
        if mask.dim() != 2 or mask.shape[1] != self.rank:
            raise ValueError(f"mask must have shape (B, {self.rank}), got {tuple(mask.shape)}")
        if shared_rank is None:
            r = int(mask[0].sum().item())
            prefix = torch.zeros(self.rank, dtype=mask.dtype, device=mask.device)
            prefix[:r] = 1
            if bool((mask == prefix).all()):
                shared_rank = r
        if max_rank is None and shared_rank is None:
            used = mask.ne(0).any(0).nonzero()
            max_rank = int(used.max()) + 1 if used.numel() else 0
        self._mask, self._shared_rank, self._max_rank = mask, shared_rank, max_rank

    def mask_state(self) -> tuple:
        """(mask, shared_rank, max_rank) as :meth:`set_mask` takes them back."""
        return self._mask, self._shared_rank, self._max_rank

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() must not touch the adapter's dtype: adapter math stays float32.
        def keep_dtype(t):
            out = fn(t)
            return out.to(t.dtype) if t.is_floating_point() and out.dtype != t.dtype else out
        return super()._apply(keep_dtype, recurse)

    # -- math ----------------------------------------------------------------------------------------
    def _paths(self, r: Optional[int]):
        """[(down (k, in, …), up (out, k, …), per-rank factor (k,) or None)] in float32, first r ranks.
        Ortho has two paths, trained minus frozen, computed the same way so that at init they cancel exactly."""
        sl = slice(None) if r is None else slice(0, r)
        if self.variant == "vanilla":
            return [(self.lora_down[sl].float(), self.lora_up[:, sl].float(), None)]
        return [(self.q[sl].float(), self.p[:, sl].float(), self.lam[sl].float()),
                (self.q0[sl].float(), self.p0[:, sl].float(), self.lam0[sl].float())]

    def _down(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._base._conv_forward(x, w, None) if self.is_conv else F.linear(x, w)

    def _up(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, w) if self.is_conv else F.linear(h, w)

    def _scale_ranks(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Multiply h (B, …, k) [Linear] or (B, k, H, W) [Conv] by a per-rank (k,) or per-sample (B, k) factor."""
        if s.dim() == 2 and h.dim() >= 2 and s.shape[0] not in (1, h.shape[0]):
            raise ValueError(f"T-LoRA mask has batch {s.shape[0]} but the layer input has batch {h.shape[0]}")
        if self.is_conv:
            return h * (s.reshape(-1, s.shape[-1], 1, 1) if s.dim() == 2 else s.reshape(1, -1, 1, 1))
        if s.dim() == 2 and h.dim() > 2:
            s = s.reshape(s.shape[0], *([1] * (h.dim() - 2)), s.shape[1])
        elif s.dim() == 2 and h.dim() == 1:
            s = s.reshape(-1)
        return h * s

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier · scale · adapter(x), float32, same leading shape as base(x)."""
        r = self._shared_rank
        m = None
        if self._mask is not None and r is None:     # per-sample masks: ranks up to the largest, zeroed per sample
            r = max(self._max_rank, 1)
            m = self._mask[:, :r].to(x.device, torch.float32)
        xf = x.float()
        out = None
        for down, up, lam in self._paths(r):
            s = lam if m is None else (m if lam is None else lam * m)
            h = self._down(xf, down)
            if s is not None:
                h = self._scale_ranks(h, s)
            y = self._up(h, up)
            out = y if out is None else out - y
        return out * (self.scale * self.multiplier)

    def delta_weight(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """multiplier · scale · ΔW in the base weight's shape, float32. ``mask`` (R,) or None (full rank)."""
        out_f = self._base.weight.shape[0]
        if self.variant == "vanilla":
            d = Fn.lora_delta(self.lora_down.reshape(self.rank, -1), self.lora_up.reshape(out_f, -1), mask)
        else:
            d = Fn.ortho_delta(self.q.reshape(self.rank, -1), self.p.reshape(out_f, -1), self.lam,
                               self.q0.reshape(self.rank, -1), self.p0.reshape(out_f, -1), self.lam0, mask)
        return (d * (self.scale * self.multiplier)).reshape(self._base.weight.shape)

    def orthogonality_loss(self) -> torch.Tensor:
        """‖PᵀP − I‖² + ‖QQᵀ − I‖² (ortho only; 0 for vanilla)."""
        if self.variant != "ortho":
            return torch.zeros((), device=self.lora_down.device)
        return Fn.orthogonality_loss(self.q.reshape(self.rank, -1), self.p.reshape(self.p.shape[0], -1))

    # -- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the full-rank delta into the base weight (the mask can no longer act)."""
        if self.merged:
            return
        w = self._base.weight
        self._backup = w.detach().clone()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before ``merge``."""
        if not self.merged:
            return
        self._base.weight.copy_(self._backup)
        self._backup, self.merged = None, False

    def detach_from_base(self) -> None:
        """Remove the hook and the child entry; the base layer is exactly as before injection."""
        self.unmerge()
        self._hook.remove()
        if getattr(self._base, ADAPTER_ATTR, None) is self:
            delattr(self._base, ADAPTER_ATTR)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, rank={self.rank}, alpha={self.alpha:g}, min_rank={self.schedule.min_rank}, "
                f"exponent={self.schedule.alpha:g}, init={self.init}, sig_type={self.sig_type}")


def _add_delta(module: nn.Module, args, output):
    adapter: TLoRAAdapter = module._modules[ADAPTER_ATTR]
    if adapter.merged or adapter.multiplier == 0.0:
        return output
    return output + adapter.delta(args[0]).to(output.dtype)
