"""``tlora memory``: the expected training memory of a T-LoRA run, from the denoiser's config alone.

The denoiser is built from its ``config.json`` on the meta device (no weights are read or allocated), the adapters
are injected as training injects them, and one training forward runs on meta tensors. What it counts:

* **weights**: every parameter and buffer of the frozen denoiser at the run's dtype; with ``base_precision`` int8
  / nf4, each quantized linear weight at its backend's storage (:data:`QUANTIZED_BYTES`, checked against the real
  storages of quantized tiny models in tests/test_memory.py);
* **adapter**: T-LoRA parameters and frozen buffers (float32), their gradients, and the optimizer state (AdamW: two
  float32 moments; 8-bit AdamW: two uint8 moments with a float32 absmax per 256 values for tensors of ≥ 4096
  values, as bitsandbytes stores them);
* **activations**: every storage autograd saves for the backward during that forward, counted once. Attention is
  counted as the fused kernels save it (q, k, v, output, log-sum-exp: what PyTorch's flash / memory-efficient
  kernels keep), not as the L×L matrix of the math fallback; a quantized linear layer keeps what its backend's
  linear keeps (:data:`LINEAR_KEEPS`). With gradient checkpointing, diffusers' checkpointed blocks keep only their
  inputs; during the backward one block at a time is recomputed, so the peak is the saved tensors outside blocks +
  every block's inputs + the largest block's own saved tensors.

Not counted: the transient buffers of single ops (an op's workspace, the gradient of the activation being
back-propagated), the CUDA context and the caching allocator's slack — the measured GPU peak is above the estimate
by those; the VAE and text encoders, which leave the accelerator after the inputs are cached.
"""
from __future__ import annotations

import json
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import TLoRAConfig
from .errors import UsageError
from .fileio import first_line, looks_like_hub_id, model_path
from .families import FAMILIES, TRAINING, detect
from .network import inject
from .quantize import BasePrecision, compute_dtype_of

TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "sd3": 333, "flux": 512}   # what each pipeline's encode_prompt returns
CONFIGS = Path(__file__).parent / "assets" / "configs"


def _nf4(out_f: int, in_f: int, c: int) -> int:
    return math.ceil(out_f * in_f / 2) + math.ceil(out_f * in_f / 64) * 4      # packed 4-bit + fp32 absmax / 64


# What a quantized linear layer keeps for the backward beyond a plain frozen linear (which keeps only its weight):
# quanto's and bitsandbytes' own autograd functions keep the input; torchao's int8 layout computes
# linear(x, dequantize(w)) under autograd, which keeps a dequantized copy of the weight (one per call).
LINEAR_KEEPS = {"quanto": "input", "bitsandbytes": "input", "torchao": "dense weight"}

QUANTIZED_BYTES = {   # (precision, backend) → bytes of an (out, in) linear weight, compute dtype of c bytes
    ("int8", "quanto"): lambda o, i, c: o * i + o * c + 8,               # int8 data + row scale + 2 fp32 buffers
    ("int8", "torchao"): lambda o, i, c: o * i + o * 4 + o,              # int8 data + fp32 scale + int8 zero point
    ("int8", "bitsandbytes"): lambda o, i, c: o * i + o * 4,             # int8 data + fp32 row scale (SCB)
    ("nf4", "bitsandbytes"): _nf4,
}


@dataclass
class Estimate:
    """Bytes of each part of a training step's peak (see the module docstring), of ``family`` at ``resolution``²."""
    family: str
    resolution: int
    weights: int
    adapter: int          # parameters + frozen buffers
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations

    PARTS = ("weights", "adapter", "gradients", "optimizer", "activations")

    def as_gib(self) -> Dict[str, float]:
        return {k: getattr(self, k) / 2 ** 30 for k in (*self.PARTS, "total")}


# -- the denoiser on the meta device ------------------------------------------------------------------------------
def read_denoiser_config(path: str) -> dict:
    """A denoiser config: a ``config.json`` file, a model folder with ``unet/`` or ``transformer/``, or the name of
    a shipped config (:func:`shipped_configs`) or pipeline (``toyworld``)."""
    path = model_path(path)
    p = Path(path)
    if not p.exists() and (CONFIGS / f"{path}.json").is_file():
        p = CONFIGS / f"{path}.json"
    if p.is_dir():
        sub = [p / d / "config.json" for d in ("unet", "transformer") if (p / d / "config.json").is_file()]
        if not sub and (p / "config.json").is_file():
            sub = [p / "config.json"]
        if not sub:
            raise UsageError(f"{path} has no unet/config.json or transformer/config.json")
        p = sub[0]
    if not p.exists() and looks_like_hub_id(path):
        p = _hub_config(path)
    if not p.is_file():
        raise UsageError(f"model config not found: {path} (a config.json, a diffusers model folder, or one of "
                         f"{', '.join(shipped_configs())})")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{p} is not a readable JSON config: {type(e).__name__}") from None
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise UsageError(f"{p} is not a diffusers model config (no _class_name)")
    return cfg


def _hub_config(repo: str) -> Path:
    """The denoiser's config.json of a hub model (a few kB; no weights)."""
    from huggingface_hub import hf_hub_download
    problems = []
    for sub in ("transformer", "unet"):
        try:
            return Path(hf_hub_download(repo, f"{sub}/config.json"))
        except Exception as e:   # not found, gated, offline: say what happened, in one line
            problems.append(first_line(e))
    raise UsageError(f"cannot read the denoiser config of {repo} from the hub: {problems[-1]}")


def shipped_configs() -> list:
    return sorted(f.stem for f in CONFIGS.glob("*.json"))


def meta_denoiser(config: dict) -> nn.Module:
    """The denoiser of ``config`` with every tensor on the meta device."""
    import diffusers
    from accelerate import init_empty_weights
    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None or not any(f.denoiser_class == config["_class_name"] for f in FAMILIES.values()):
        known = sorted({f.denoiser_class for f in FAMILIES.values()})
        raise UsageError(f"{config['_class_name']} is not a denoiser tlora trains; known: {', '.join(known)}")
    with init_empty_weights(include_buffers=True):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _cast(den: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``den.to(dtype)`` without diffusers' note about float32 modules (a meta model has no checkpoint dtype)."""
    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return den.to(dtype)
    finally:
        dlog.set_verbosity(level)


def training_inputs(den: nn.Module, family: str, batch: int, resolution: int, dtype: torch.dtype, device,
                    text_tokens: Optional[int] = None):
    """(latents, model timesteps, conditioning) of the shapes the training step feeds the denoiser."""
    cfg, fam = den.config, FAMILIES[family]
    side = resolution // 8
    channels = cfg.in_channels // 4 if family == "flux" else cfg.in_channels
    tokens = text_tokens or TEXT_TOKENS[family]
    kw = dict(dtype=dtype, device=device)
    x = torch.zeros(batch, channels, side, side, **kw)
    t = torch.full((batch,), 500.0 / fam.timestep_scale, device=device)
    if family in ("sd15", "sdxl"):
        cond = {"encoder_hidden_states": torch.zeros(batch, tokens, cfg.cross_attention_dim, **kw)}
        if family == "sdxl":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            cond["text_embeds"] = torch.zeros(batch, pooled, **kw)
    else:
        cond = {"encoder_hidden_states": torch.zeros(batch, tokens, cfg.joint_attention_dim, **kw),
                "pooled_projections": torch.zeros(batch, cfg.pooled_projection_dim, **kw)}
        if family == "flux":
            cond["txt_ids"] = torch.zeros(tokens, 3, **kw)
    return x, t, cond


# -- counting what autograd saves ----------------------------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention that saves what the fused kernels save (q, k, v, output, log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):      # never run: the estimate does not go backward
        raise NotImplementedError


class _AsTrained(TorchFunctionMode):
    """The meta forward's stand-ins for what the real kernels keep: scaled dot-product attention as the fused
    kernels save it, and each frozen linear layer as its quantization backend's linear keeps it for the backward
    (:data:`LINEAR_KEEPS`)."""

    def __init__(self, saved: "SavedTensors", frozen: set, keeps: Optional[str]):
        super().__init__()
        self.saved, self.frozen, self.keeps = saved, frozen, keeps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
            return _FusedAttention.apply(q, k, v)
        out = func(*args, **kwargs)
        if func is F.linear and self.keeps and id(args[1]) in self.frozen and args[0].requires_grad:
            x, w = args[0], args[1]
            self.saved.keep(x if self.keeps == "input" else torch.empty_like(w))
        return out


class Held:
    """What a pack hook hands autograd instead of the tensor: alive exactly as long as the graph keeps the tensor
    (a saved tensor whose node was never recorded, e.g. inside a function none of whose inputs needs a gradient,
    is dropped at once and costs nothing)."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def unpack(self) -> torch.Tensor:
        return self.tensor


class SavedTensors:
    """Storages the autograd graph keeps after a forward (each once, the model's own weights excluded), attributed
    to the checkpointed block running when they were saved (None: outside every block)."""

    def __init__(self, model: nn.Module):
        self.skip = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
        self.held: list = []                      # (weak reference to the Held, block, storage id, bytes)
        self.pinned: list = []                    # stand-ins kept by the stand-in kernels themselves
        self.block_inputs: Dict[int, int] = {}
        self.block: Optional[int] = None
        self.blocks = 0

    def pack(self, t: torch.Tensor) -> Held:
        h = Held(t)
        st = t.untyped_storage()
        if st._cdata not in self.skip:
            self.held.append((weakref.ref(h), self.block, st._cdata, st.nbytes()))
        return h

    def keep(self, t: torch.Tensor) -> None:
        """Count ``t`` as kept for the backward by a kernel the meta forward stands in for."""
        self.pinned.append(self.pack(t))

    def run_block(self, fn, *args, **kwargs):
        """diffusers' ``gradient_checkpointing_func``: runs the block as is, remembering what it keeps."""
        outer, self.block = self.block, self.blocks
        self.blocks += 1
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                st = a.untyped_storage()
                if st._cdata not in self.skip:
                    self.block_inputs[st._cdata] = st.nbytes()
        try:
            return fn(*args, **kwargs)
        finally:
            self.block = outer

    def by_block(self) -> Dict[Optional[int], Dict[int, int]]:
        """Block → {storage id: bytes} of what the graph still keeps (call while the forward's output lives)."""
        out: Dict[Optional[int], Dict[int, int]] = {None: {}}
        for ref, block, key, nbytes in self.held:
            if ref() is not None:
                out.setdefault(block, {})[key] = nbytes
        return out

    def peak(self, checkpointing: bool) -> int:
        by_block = self.by_block()
        everything = {k: v for d in by_block.values() for k, v in d.items()}
        if not checkpointing:
            return sum(everything.values())
        outside = by_block[None]
        inputs = {k: v for k, v in self.block_inputs.items() if k not in outside}
        inner = [sum(v for k, v in d.items() if k not in outside and k not in inputs)
                 for b, d in by_block.items() if b is not None]
        return sum(outside.values()) + sum(inputs.values()) + max(inner, default=0)


@contextmanager
def _counting(saved: SavedTensors, frozen: set, keeps: Optional[str]):
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, Held.unpack), _AsTrained(saved, frozen, keeps):
        yield


# -- the estimate -------------------------------------------------------------------------------------------------
def weight_bytes(den: nn.Module, mixed_precision: str, base: BasePrecision) -> int:
    """The frozen denoiser's parameters and buffers at the run's dtype, quantized linear weights at their backend's
    storage (adapters excluded)."""
    c = compute_dtype_of(mixed_precision).itemsize
    bp = base.resolved()
    quantized = {id(m.weight) for m in den.modules() if isinstance(m, nn.Linear)} if bp.quantized else set()
    total = 0
    for name, t in [*den.named_parameters(), *den.named_buffers()]:
        if ".tlora_adapter." in f".{name}":
            continue
        if id(t) in quantized:
            total += QUANTIZED_BYTES[(bp.precision, bp.backend)](t.shape[0], t.shape[1:].numel(), c)
        else:
            total += t.numel() * (c if t.is_floating_point() else t.element_size())
    return total


def optimizer_bytes(params: list, optimizer: str) -> int:
    if optimizer == "adamw8bit":
        return sum(2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel()
                   for p in params)
    return sum(8 * p.numel() for p in params)


def estimate(config: dict, tlora: TLoRAConfig, resolution: Optional[int] = None, batch: int = 1,
             gradient_checkpointing: bool = True, mixed_precision: str = "bf16",
             base: BasePrecision = BasePrecision(), optimizer: str = "adamw",
             text_tokens: Optional[int] = None) -> Estimate:
    """The expected peak of one training step of ``config``'s denoiser (module docstring); nothing is allocated.
    ``resolution`` None: the family's native resolution."""
    dtype = compute_dtype_of(mixed_precision)
    den = _cast(meta_denoiser(config), dtype)
    family = detect(den).name
    if family not in TEXT_TOKENS:
        raise UsageError(f"memory estimates cover {', '.join(TEXT_TOKENS)}; {family} is not one of them yet")
    resolution = resolution or FAMILIES[family].resolution
    network = inject(den, tlora.targets_or(FAMILIES[family].target_module), init_weights=False)
    den.requires_grad_(False)
    for p in network.parameters():
        p.requires_grad_(True)
    params = network.trainable_parameters()
    saved = SavedTensors(den)
    if gradient_checkpointing:
        den.enable_gradient_checkpointing(gradient_checkpointing_func=saved.run_block)
    den.train()
    x, t, cond = training_inputs(den, family, batch, resolution, dtype, "meta", text_tokens)
    bp = base.resolved()
    frozen = {id(m.weight) for m in den.modules() if isinstance(m, nn.Linear)} if bp.quantized else set()
    with _counting(saved, frozen, LINEAR_KEEPS.get(bp.backend)):
        out = TRAINING[family].call(den, x, t, cond)
    acts = saved.peak(gradient_checkpointing)          # while ``out`` holds the graph
    del out
    adapter = sum(v.numel() * 4 for v in network.state_dict().values())
    return Estimate(family, resolution, weight_bytes(den, mixed_precision, base), adapter, sum(p.numel() * 4 for p in params),
                    optimizer_bytes(params, optimizer), acts)


def table(rows: list) -> list:
    """Markdown lines of [(label, Estimate)]: GiB per part and in total."""
    lines = ["| run | weights | adapter | gradients | optimizer | activations | total GiB |", "|---|---|---|---|---|---|---|"]
    for label, e in rows:
        g = e.as_gib()
        lines.append(f"| {label} | " + " | ".join(f"{g[k]:.2f}" for k in Estimate.PARTS) + f" | **{g['total']:.2f}** |")
    return lines
