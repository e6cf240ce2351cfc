"""The frozen base's precision: a quantized denoiser for training and sampling, in one place.

Adapters stay float32 and attach to a quantized linear layer exactly as to a plain one (a forward hook on the
layer, :mod:`tlora.layers`); only the frozen weights shrink. Quantization is diffusers' own: the denoiser is loaded
with a ``quantization_config`` (:meth:`BasePrecision.pipeline_config`), nothing here quantizes by hand.

| precision | backend (default first) | diffusers config                               | runs on                      |
|-----------|-------------------------|------------------------------------------------|------------------------------|
| no        | —                       | —                                              | everywhere                   |
| int8      | quanto                  | ``QuantoConfig(weights_dtype="int8")``         | CPU, CUDA, MPS               |
| int8      | torchao                 | ``TorchAoConfig(Int8WeightOnlyConfig())``      | CPU, CUDA                    |
| int8      | bitsandbytes            | ``BitsAndBytesConfig(load_in_8bit=True)``      | GPU (diffusers refuses CPU)  |
| nf4       | bitsandbytes            | ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` | GPU (the QLoRA recipe) |

Why quanto is the int8 default, measured here on tiny models (tests/test_quantize.py, tests/test_memory.py): of
the three it is the one whose int8 linear layer runs on the CPU as well as on CUDA and MPS *and* keeps only the
int8 weight for the backward (its own autograd function saves the input and the quantized weight). torchao is the
better-kept library (the PyTorch team's, released with PyTorch; diffusers marks ``QuantoConfig`` deprecated, to be
removed in diffusers 1.0), but its stable int8 weight-only layout computes ``linear(x, dequantize(w))`` under
autograd, which saves a dequantized copy of every weight it runs for the backward: with gradient checkpointing that
is one block's weights at a time, without it the whole denoiser again in the compute dtype. Its training layout
(``int8_weight_only_quantized_training``, SimpleTuner's ``int8-torchao``) saves the int8 weight but is a prototype
whose backward fails on UNets here (``view`` of a non-contiguous gradient). When diffusers drops quanto, torchao
becomes the default. NF4 exists only in bitsandbytes, whose diffusers integration requires a GPU (CUDA, XPU or
MPS): on a CPU-only machine ``nf4`` is refused in one line.

SimpleTuner's ``base_model_precision`` maps onto (precision, backend): :data:`SIMPLETUNER_PRECISIONS`.
"""
from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError

# torch is imported where a tensor or a device is asked about, not here: a config naming a precision is checked
# before torch is imported
PRECISIONS = ("no", "int8", "nf4")
BACKENDS = ("torchao", "quanto", "bitsandbytes")
DEFAULT_BACKEND = {"int8": "quanto", "nf4": "bitsandbytes"}
COMBINATIONS = {"int8": ("quanto", "torchao", "bitsandbytes"), "nf4": ("bitsandbytes",)}
SIMPLETUNER_PRECISIONS = {"no_change": ("no", None), "int8-torchao": ("int8", "torchao"),
                          "int8-quanto": ("int8", "quanto"), "nf4-bnb": ("nf4", "bitsandbytes")}
_IMPORT = {"torchao": "torchao", "quanto": "optimum.quanto", "bitsandbytes": "bitsandbytes"}
_PIP = {"torchao": "torchao", "quanto": "optimum-quanto", "bitsandbytes": "bitsandbytes"}


@dataclass(frozen=True)
class BasePrecision:
    """How the frozen denoiser's linear weights are stored: ``precision`` in :data:`PRECISIONS`, ``backend`` in
    :data:`BACKENDS` (None: the precision's default)."""
    precision: str = "no"
    backend: Optional[str] = None

    @classmethod
    def from_simpletuner(cls, value: str) -> "BasePrecision":
        if value not in SIMPLETUNER_PRECISIONS:
            raise UsageError(f"base_model_precision {value!r} is not supported by tlora; use one of "
                             f"{', '.join(SIMPLETUNER_PRECISIONS)}")
        return cls(*SIMPLETUNER_PRECISIONS[value])

    @property
    def quantized(self) -> bool:
        return self.precision != "no"

    def resolved(self) -> "BasePrecision":
        """Names checked (no import, no device): the backend filled in. One-line UsageError otherwise."""
        if self.precision not in PRECISIONS:
            raise UsageError(f"base_precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise UsageError(f"quantization_backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.quantized:
            if self.backend is not None:
                raise UsageError(f"quantization_backend {self.backend} needs base_precision int8 or nf4 "
                                 "(base_precision is 'no')")
            return self
        backend = self.backend or DEFAULT_BACKEND[self.precision]
        if backend not in COMBINATIONS[self.precision]:
            raise UsageError(f"base_precision {self.precision} is not available in {backend}; use "
                             f"{' or '.join(COMBINATIONS[self.precision])}")
        return BasePrecision(self.precision, backend)

    def check_runtime(self) -> "BasePrecision":
        """The backend is installed and can run on this machine; one-line UsageError saying how to fix it."""
        bp = self.resolved()
        if not bp.quantized:
            return bp
        if not _installed(bp.backend):
            raise UsageError(f"base_precision {bp.precision} through {bp.backend} needs the package "
                             f"{_PIP[bp.backend]}: pip install {_PIP[bp.backend]}")
        if bp.backend == "bitsandbytes" and not _has_gpu():
            other = "; on the CPU use base_precision int8 (quanto)" if bp.precision == "nf4" else \
                "; on the CPU use quantization_backend quanto or torchao"
            raise UsageError(f"base_precision {bp.precision} through bitsandbytes needs a GPU (CUDA, XPU or MPS): "
                             f"diffusers' bitsandbytes integration refuses the CPU{other}")
        return bp

    def diffusers_config(self, compute_dtype=None):
        """The diffusers ``quantization_config`` of one model (None when not quantized); ``compute_dtype``: a
        torch dtype, float32 when None."""
        bp = self.resolved()
        if bp.backend == "torchao":
            from diffusers import TorchAoConfig
            from torchao.quantization import Int8WeightOnlyConfig
            return TorchAoConfig(Int8WeightOnlyConfig())
        if bp.backend == "quanto":
            from diffusers import QuantoConfig
            return QuantoConfig(weights_dtype="int8")
        if bp.backend == "bitsandbytes":
            from diffusers import BitsAndBytesConfig
            if bp.precision == "int8":
                return BitsAndBytesConfig(load_in_8bit=True)
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute_dtype or compute_dtype_of("no"))
        return None

    def pipeline_config(self, component: str, compute_dtype=None):
        """A diffusers ``PipelineQuantizationConfig`` quantizing only ``component`` (the denoiser)."""
        from diffusers.quantizers import PipelineQuantizationConfig
        return PipelineQuantizationConfig(quant_mapping={component: self.diffusers_config(compute_dtype)})

    def __str__(self) -> str:
        return self.precision if not self.quantized else f"{self.precision} ({self.resolved().backend})"


def _installed(backend: str) -> bool:
    try:
        importlib.import_module(_IMPORT[backend])     # the loader imports it next anyway
    except ImportError:
        return False
    return True


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


# -- importing the backends ----------------------------------------------------------------------------------------
# Loggers that announce, while a backend is imported, kernels this machine does not have (bitsandbytes' optional
# "kernels" package, torchao's CUDA-only builds and the torch.compile registrations they make, diffusers' note that
# follows): notices, at every start of every command, not problems of the run.
IMPORT_NOTICE_LOGGERS = ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.quantizers")


@contextmanager
def _quiet(names=IMPORT_NOTICE_LOGGERS):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_backends() -> None:
    """Import diffusers' quantizer registry (which imports every installed backend) and the backends now, with
    their import-time notices muted; warnings they give later, while loading or running, pass as usual."""
    with _quiet():
        import diffusers.quantizers.auto  # noqa: F401
        for backend in BACKENDS:
            _installed(backend)


# -- quantized layers ------------------------------------------------------------------------------------------
def compute_dtype_of(mixed_precision: str):
    """The torch dtype a ``mixed_precision`` setting (no / bf16 / fp16) computes in."""
    import torch
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def is_quantized(layer) -> bool:
    """Whether the layer's weight is stored quantized (torchao / quanto tensor subclass, bitsandbytes params)."""
    import torch
    w = getattr(layer, "weight", None)
    return w is not None and (type(w) not in (torch.Tensor, torch.nn.Parameter) or not w.is_floating_point())


def weight_shape(layer):
    """The weight's logical shape (out, in[, kh, kw]), a ``torch.Size``; bitsandbytes 4-bit packs its storage
    into (n, 1)."""
    import torch
    w = layer.weight
    state = getattr(w, "quant_state", None)
    return torch.Size(state.shape) if state is not None else w.shape


def dense_weight(layer):
    """The weight as a plain float tensor of :func:`weight_shape` (the weight itself when not quantized; a
    dequantized copy otherwise), e.g. for the SVD of an ortho init."""
    w = layer.weight
    if not is_quantized(layer):
        return w
    import torch
    with torch.no_grad():
        if getattr(w, "quant_state", None) is not None:                  # bitsandbytes 4-bit
            import bitsandbytes.functional as bnbf
            return bnbf.dequantize_4bit(w.data, w.quant_state)
        if getattr(w, "SCB", None) is not None:                          # bitsandbytes LLM.int8
            import bitsandbytes.functional as bnbf
            return bnbf.int8_vectorwise_dequant(w.data, w.SCB)
        if hasattr(w, "dequantize"):                                     # torchao, quanto
            return w.dequantize()
    raise TypeError(f"cannot read the quantized weight of {type(layer).__name__} ({type(w).__name__})")


def quantized_layers(model) -> list:
    """Paths of the model's quantized layers."""
    from torch import nn
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and is_quantized(m)]
