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

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as Fn
from .config import INITS, SIG_TYPES, VARIANTS
from .quantize import dense_weight, is_quantized
from .schedule import RankSchedule

ADAPTER_ATTR = "tlora_adapter"
QUANTIZED_MERGE = ("cannot merge into a quantized base weight (int8 / nf4): load the base unquantized "
                   "(base_precision no) to merge, or keep the adapter attached")
FOLD_MODES = (None, "auto", "always")
FOLD_PASS_RANKS = 8    # one pass over a weight (read + write) costs about as much as folding 8 ranks into it


class Variant:
    """One adapter form, as PEFT's ``LoraVariant`` and LyCORIS's one class per algorithm: which tensors the
    adapter holds (``tensors``), how they start, the paths its delta is computed along, its ΔW, and its exact
    factors as a plain LoRA. Stateless: the tensors live on the adapter (``<path>.<name>`` in files)."""
    name = ""
    tensors: tuple = ()

    def create(self, a: "TLoRAAdapter", w: torch.Tensor, generator, init_weights: bool) -> None:
        raise NotImplementedError

    def shapes(self, rank: int, down_shape: tuple, up_shape: tuple) -> Dict[str, tuple]:
        """Each tensor's shape for an adapter of ``rank`` with these down (R, in, …) / up (out, R, …) shapes:
        what a file must hold before any of it is used."""
        raise NotImplementedError

    def paths(self, t: dict, sl: slice) -> list:
        """[(down (k, in, …), up (out, k, …), per-rank factor (k,) or None)] in float32 for ranks ``sl``."""
        raise NotImplementedError

    def delta_weight(self, t: dict, rank: int, out_f: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """ΔW (out, in_flat) in float32, masked by ``mask`` (rank,) or full rank."""
        raise NotImplementedError

    def factors(self, t: dict, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(down (k, in, …), up (out, k, …)) with up ∘ down = the first r ranks' delta, unscaled."""
        raise NotImplementedError

    def slice_factors(self, t: dict, lo: int, hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(down (k, in_flat), up (out, k)) float32 with up @ down = ΔW of ranks lo..hi-1 only, unscaled: what
        folding adds (one in-place ``addmm_`` into the weight) as the rank grows."""
        raise NotImplementedError

    def orthogonality_loss(self, t: dict, rank: int) -> Optional[torch.Tensor]:
        return None


class Vanilla(Variant):
    """y = Wx + scale · up(m ⊙ down(x)); down ~ N(0, 1/rank), up = 0."""
    name, tensors = "vanilla", ("lora_down", "lora_up")

    def create(self, a, w, generator, init_weights):
        down = (torch.randn(a.down_shape, generator=generator, device=w.device) / a.rank if init_weights
                else torch.zeros(a.down_shape, device=w.device))
        a.lora_down = nn.Parameter(down)
        a.lora_up = nn.Parameter(torch.zeros(a.up_shape, device=w.device))

    def shapes(self, rank, down_shape, up_shape):
        return {"lora_down": tuple(down_shape), "lora_up": tuple(up_shape)}

    def paths(self, t, sl):
        return [(t["lora_down"][sl].float(), t["lora_up"][:, sl].float(), None)]

    def delta_weight(self, t, rank, out_f, mask):
        return Fn.lora_delta(t["lora_down"].reshape(rank, -1), t["lora_up"].reshape(out_f, -1), mask)

    def factors(self, t, r):
        return t["lora_down"][:r], t["lora_up"][:, :r]

    def slice_factors(self, t, lo, hi):
        up = t["lora_up"][:, lo:hi]
        return t["lora_down"][lo:hi].reshape(hi - lo, -1).float(), up.reshape(up.shape[0], hi - lo).float()


class Ortho(Variant):
    """ΔW = P·diag(λ⊙m)·Q − P0·diag(λ0⊙m)·Q0: Q, P, λ trained; Q0, P0, λ0 frozen copies of their init (SVD)."""
    name, tensors = "ortho", ("q", "p", "lam", "q0", "p0", "lam0")

    def create(self, a, w, generator, init_weights):
        out_f, k = w.shape[0], w[0].numel()
        if init_weights:
            q, p, lam, a.svd = Fn.svd_init(w.reshape(out_f, -1), a.rank, a.sig_type, generator,
                                           from_weight=(a.init == "weight"), method=a.svd)
        else:  # about to be loaded from a file: skip the SVD
            if a.rank > min(out_f, k):
                raise ValueError(f"ortho rank {a.rank} exceeds min(out, in) = {min(out_f, k)} of the layer")
            q, p, lam = (torch.zeros(a.rank, k, device=w.device), torch.zeros(out_f, a.rank, device=w.device),
                         torch.zeros(a.rank, device=w.device))
        a.q = nn.Parameter(q.reshape(a.down_shape).clone())
        a.p = nn.Parameter(p.reshape(a.up_shape).clone())
        a.lam = nn.Parameter(lam.clone())
        a.register_buffer("q0", q.reshape(a.down_shape).clone())
        a.register_buffer("p0", p.reshape(a.up_shape).clone())
        a.register_buffer("lam0", lam.clone())

    def shapes(self, rank, down_shape, up_shape):
        d, u = tuple(down_shape), tuple(up_shape)
        return {"q": d, "p": u, "lam": (rank,), "q0": d, "p0": u, "lam0": (rank,)}

    def paths(self, t, sl):
        # trained minus frozen, computed the same way so that at init they cancel exactly
        return [(t["q"][sl].float(), t["p"][:, sl].float(), t["lam"][sl].float()),
                (t["q0"][sl].float(), t["p0"][:, sl].float(), t["lam0"][sl].float())]

    def delta_weight(self, t, rank, out_f, mask):
        return Fn.ortho_delta(t["q"].reshape(rank, -1), t["p"].reshape(out_f, -1), t["lam"],
                              t["q0"].reshape(rank, -1), t["p0"].reshape(out_f, -1), t["lam0"], mask)

    def factors(self, t, r):
        q, p = t["q"][:r], t["p"][:, :r]
        d2, u2 = Fn.ortho_as_lora(q.reshape(r, -1), p.reshape(p.shape[0], r), t["lam"][:r],
                                  t["q0"][:r].reshape(r, -1), t["p0"][:, :r].reshape(p.shape[0], r), t["lam0"][:r])
        return d2.reshape(2 * r, *q.shape[1:]), u2.reshape(p.shape[0], 2 * r, *p.shape[2:])

    def slice_factors(self, t, lo, hi):     # the rank-2k form [λQ; λ0Q0], [P, −P0] of ranks lo..hi-1
        k, out_f = hi - lo, t["p"].shape[0]
        return Fn.ortho_as_lora(t["q"][lo:hi].reshape(k, -1), t["p"][:, lo:hi].reshape(out_f, k), t["lam"][lo:hi],
                                t["q0"][lo:hi].reshape(k, -1), t["p0"][:, lo:hi].reshape(out_f, k), t["lam0"][lo:hi])

    def orthogonality_loss(self, t, rank):
        return Fn.orthogonality_loss(t["q"].reshape(rank, -1), t["p"].reshape(t["p"].shape[0], -1))


FORMS = {v.name: v for v in (Vanilla(), Ortho())}     # variant name (config.VARIANTS) → its type


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
        if sig_type not in SIG_TYPES:
            raise ValueError(f"sig_type must be one of {SIG_TYPES}, got {sig_type!r}")
        self.schedule = RankSchedule(rank, min_rank, float(exponent), num_train_timesteps)
        self.rank, self.variant, self.init, self.sig_type, self.svd = rank, variant, init, sig_type, svd
        self.alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self.scale = self.alpha / rank
        self.multiplier = float(multiplier)
        self.is_conv = isinstance(base, nn.Conv2d)
        object.__setattr__(self, "_base", base)  # a reference, not a child: the base owns the adapter

        self.quantized_base = is_quantized(base)                 # frozen weight stored int8 / nf4: never folded
        w = dense_weight(base).detach()                           # a dequantized copy for a quantized base
        self.weight_shape = tuple(w.shape)
        self.down_shape = (rank, *w.shape[1:])                     # (R, in) or (R, in, kh, kw)
        self.up_shape = (w.shape[0], rank) + ((1, 1) if self.is_conv else ())
        self.form: Variant = FORMS[variant]
        self.form.create(self, w, generator, init_weights)
        self._mask: Optional[torch.Tensor] = None      # (B, R) float32, or None = full rank
        self._shared_rank: Optional[int] = None        # r when every row of the mask is the same prefix
        self._max_rank: Optional[int] = None           # per-sample masks: no row has a 1 past this rank
        self.merged = False
        self._backup: Optional[torch.Tensor] = None
        self._hook = base.register_forward_hook(_add_delta)
        self._fold_mode: Optional[str] = None             # None (off), "auto" (cost rule) or "always"
        self._fold_hook = None
        self._fold_backup: Optional[torch.Tensor] = None  # the base weight before folding: restored bit for bit
        self._folded: Optional[Tuple[int, float]] = None  # (ranks folded in, multiplier · scale they carry)
        self._use_fold = False                             # this forward runs on the folded weight
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
        return self.form.paths(self._tensors(), slice(None) if r is None else slice(0, r))

    def _tensors(self) -> dict:
        return {n: getattr(self, n) for n in self.form.tensors}

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
        d = self.form.delta_weight(self._tensors(), self.rank, self.weight_shape[0], mask)
        return (d * (self.scale * self.multiplier)).reshape(self.weight_shape)

    def orthogonality_loss(self) -> torch.Tensor:
        """‖PᵀP − I‖² + ‖QQᵀ − I‖² (ortho only; 0 for vanilla)."""
        t = self._tensors()
        loss = self.form.orthogonality_loss(t, self.rank)
        return loss if loss is not None else torch.zeros((), device=next(iter(t.values())).device)

    # -- folding the active ranks (sampling) --------------------------------------------------------
    def set_folding(self, mode: Optional[str]) -> None:
        """Sampling's fast path. When every sample of a forward shares one rank r (always at sampling: one
        timestep per call, guidance included), ΔW_r is one matrix: ``"auto"`` folds it into the base weight when
        that is cheaper than the unmerged adapter for the call's shapes (:meth:`fold_is_cheaper`), incrementally
        as r changes; ``"always"`` folds at every shared-rank call; None restores the base weight bit for bit and
        runs unmerged. Forwards with per-sample ranks always run unmerged."""
        if mode not in FOLD_MODES:
            raise ValueError(f"folding mode must be None, 'auto' or 'always', got {mode!r}")
        if mode is None:
            self.unfold()
            if self._fold_hook is not None:
                self._fold_hook.remove()
                self._fold_hook = None
        elif self._fold_hook is None:
            self._fold_hook = self._base.register_forward_pre_hook(_fold_before)
        self._fold_mode = mode

    @property
    def folded_for_this_call(self) -> bool:
        return self._fold_mode is not None and self._use_fold

    @property
    def folded_rank(self) -> Optional[int]:
        """Ranks folded into the base weight now (None: the base weight is its own)."""
        return None if self._folded is None else self._folded[0]

    def fold_is_cheaper(self, tokens: int, r: int) -> bool:
        """The cost rule, in multiply-adds per path: folding ranks up to r from what is folded now, out·in·Δr
        (in float32 incrementally; Δr = r from the saved weight in lower precision), plus the read-modify-write
        pass over the weight that any fold makes, counted as FOLD_PASS_RANKS ranks (memory-bound: on small calls
        it, not the arithmetic, is what folding costs), against the unmerged adapter on ``tokens`` rows,
        tokens·r·(in+out)."""
        w = self._base.weight
        out_f, in_flat = w.shape[0], w[0].numel()
        have = 0 if self._folded is None else self._folded[0]
        changed = abs(r - have) if w.dtype == torch.float32 and self._folded is not None else r
        return out_f * in_flat * (changed + FOLD_PASS_RANKS) <= tokens * r * (in_flat + out_f)

    def _call_rank(self) -> Optional[int]:
        """The rank every sample of this forward uses, or None when they differ."""
        return self.rank if self._mask is None else self._shared_rank

    @torch.no_grad()
    def before_forward(self, x: torch.Tensor) -> None:
        """The fold pre-hook: fold (or unfold) for this call, by its rank and shapes. Weights that are not there
        (``meta``: accelerate's sequential CPU offload loads them inside the forward) and quantized weights are
        never folded: the adapter runs unmerged beside them."""
        r = self._call_rank()
        if r is None or self.merged or self.multiplier == 0.0 or torch.is_grad_enabled() or \
                self.quantized_base or self._base.weight.device.type == "meta":
            self.unfold()
            self._use_fold = False
            return
        factor = self.scale * self.multiplier
        if self._folded != (r, factor):
            tokens = x.numel() // (x.shape[1] if self.is_conv else x.shape[-1])
            if self._fold_mode == "always" or self.fold_is_cheaper(tokens, r):
                self._fold_to(r, factor)
            else:
                self.unfold()
        self._use_fold = self._folded == (r, factor)

    def _fold_to(self, r: int, factor: float) -> None:
        w = self._base.weight
        if self._fold_backup is None:
            self._fold_backup = w.detach().clone()
        have = self._folded[0] if self._folded is not None and self._folded[1] == factor else None
        if w.dtype == torch.float32 and have is not None:        # incremental: only the ranks that switch
            lo, hi = sorted((have, r))
            if hi > lo:
                down, up = self.form.slice_factors(self._tensors(), lo, hi)
                w.view(w.shape[0], -1).addmm_(up, down, alpha=factor if r > have else -factor)
        else:                                                    # from the saved weight: one rounding only
            acc = self._fold_backup.to(torch.float32, copy=True).reshape(w.shape[0], -1)   # never the backup itself
            down, up = self.form.slice_factors(self._tensors(), 0, r)
            w.copy_(acc.addmm_(up, down, alpha=factor).reshape(w.shape))
        self._folded = (r, factor)

    @torch.no_grad()
    def unfold(self) -> None:
        """Restore the base weight exactly as it was before folding."""
        if self._fold_backup is not None:
            self._base.weight.copy_(self._fold_backup)
        self._fold_backup, self._folded, self._use_fold = None, None, False

    # -- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the full-rank delta into the base weight (the mask can no longer act). A quantized base is refused
        (ValueError): its weight cannot hold the delta without re-quantizing it."""
        if self.merged:
            return
        if self.quantized_base:
            raise ValueError(QUANTIZED_MERGE)
        self.unfold()
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
        """Remove the hooks and the child entry; the base layer is exactly as before injection."""
        self.unmerge()
        self.set_folding(None)
        self._hook.remove()
        if getattr(self._base, ADAPTER_ATTR, None) is self:
            delattr(self._base, ADAPTER_ATTR)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, rank={self.rank}, alpha={self.alpha:g}, min_rank={self.schedule.min_rank}, "
                f"exponent={self.schedule.exponent:g}, init={self.init}, sig_type={self.sig_type}")


def _add_delta(module: nn.Module, args, output):
    adapter: TLoRAAdapter = module._modules[ADAPTER_ATTR]
    if adapter.merged or adapter.multiplier == 0.0 or adapter.folded_for_this_call:
        return output
    return output + adapter.delta(args[0]).to(output.dtype)


def _fold_before(module: nn.Module, args):
    module._modules[ADAPTER_ATTR].before_forward(args[0])
