"""The native weights file: safetensors holding every tensor needed for an exact reload, and a JSON
header that describes the adapter completely, so nothing has to be retyped at inference.

Tensors: ``<module path>.<lora_down | lora_up | q | p | lam | q0 | p0 | lam0>`` (float32). The frozen
ortho tensors Q0, P0, λ0 are stored, never re-derived.

Header metadata (safetensors ``__metadata__``, all strings):

* ``tlora``: JSON — ``format`` ("tlora"), ``format_version``, ``variant`` (or "mixed"),
  ``num_train_timesteps``, ``family`` and ``timestep_convention`` (when known), ``config`` (the
  TLoRAConfig), ``modules`` (path → variant, rank, alpha, min_rank, exponent, init, sig_type, kind,
  base_shape), ``base_model``, ``base_fingerprint`` (sha256 of the targeted base weights' paths and
  shapes), ``training`` (free-form).
* ``tlora_sha256``: sha256 over the ``tlora`` JSON and every tensor's name, dtype, shape and bytes, so a
  flipped byte anywhere is reported instead of silently loaded.

Nothing is ever unpickled: safetensors and JSON only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import WeightsFileError   # also tlora.weights' own name
from .config import TLoRAConfig
from .families import FAMILIES
from .fileio import atomic_write, first_line
from .layers import FORMS, TLoRAAdapter
from .network import TLoRANetwork

FORMAT = "tlora"
FORMAT_VERSION = 1




@dataclass(frozen=True)
class ModuleSpec:
    """One adapter as the header describes it: enough to rebuild it exactly (with its tensors) on a base layer
    of ``base_shape``. ``alpha`` is the LoRA scale numerator (scale = alpha / rank); ``exponent`` is the
    schedule's α."""
    variant: str
    rank: int
    alpha: float
    min_rank: int
    exponent: float
    init: str
    sig_type: str
    svd: str
    kind: str                     # "linear" | "conv2d"
    base_shape: tuple

    @classmethod
    def of(cls, a: TLoRAAdapter) -> "ModuleSpec":
        s = a.schedule
        return cls(a.variant, a.rank, a.alpha, s.min_rank, s.exponent, a.init, a.sig_type, a.svd,
                   "conv2d" if a.is_conv else "linear", a.weight_shape)

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleSpec":
        """A header entry; files written before ``svd`` was recorded used exact SVDs."""
        return cls(d["variant"], d["rank"], d["alpha"], d["min_rank"], d["exponent"], d["init"], d["sig_type"],
                   d.get("svd", "exact"), d["kind"], tuple(d["base_shape"]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base_shape"] = list(self.base_shape)
        return d

    def adapter_kwargs(self) -> dict:
        """Keyword arguments of :class:`~tlora.layers.TLoRAAdapter` for this spec."""
        return dict(rank=self.rank, alpha=self.alpha, variant=self.variant, min_rank=self.min_rank,
                    exponent=self.exponent, init=self.init, sig_type=self.sig_type, svd=self.svd)


def fingerprint(shapes: Dict[str, list]) -> str:
    """sha256 of the sorted (module path, base weight shape) pairs."""
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum(header_json: str, tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_save_file(tensors: Dict[str, torch.Tensor], path: os.PathLike, metadata: Dict[str, str]) -> None:
    """safetensors ``save_file`` to a temporary name in the same folder, then rename. A write that fails (a full
    disk) is an OSError, as for every other file: safetensors' own error type is not one."""
    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:
            raise OSError(errno.ENOSPC if "space" in str(e).lower() else errno.EIO,
                          f"could not write the weights ({first_line(e)})", str(path)) from None
    atomic_write(path, write)


def make_header(specs: Dict[str, ModuleSpec], config: TLoRAConfig, family: Optional[str] = None,
                base_model: Optional[str] = None, training: Optional[dict] = None,
                denoiser_config: Optional[dict] = None) -> dict:
    """The ``tlora`` header for adapters ``specs`` (module path → spec): the one place it is built."""
    variants = {s.variant for s in specs.values()}
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "variant": variants.pop() if len(variants) == 1 else "mixed",
        "num_train_timesteps": config.num_train_timesteps,
        "family": family,
        "timestep_convention": FAMILIES[family].timestep_convention if family in FAMILIES else None,
        "base_model": base_model,
        "config": config.to_dict(),
        "base_fingerprint": fingerprint({p: list(s.base_shape) for p, s in specs.items()}),
        "modules": {p: s.to_dict() for p, s in specs.items()},
        "training": dict(training or {}),
    }
    if denoiser_config is not None:
        header["denoiser_config"] = denoiser_config
    return header


def header_of(network: TLoRANetwork, metadata: Optional[dict] = None) -> dict:
    """The header of an injected network; ``metadata`` may give ``base_model``, ``family`` and ``training``;
    other keys go into ``training``."""
    meta = dict(metadata or {})
    family = meta.pop("family", network.family)
    base_model = meta.pop("base_model", None)
    header = make_header({p: ModuleSpec.of(a) for p, a in network.adapters.items()}, network.config, family,
                         base_model, meta.pop("training", {}) | meta)
    header["denoiser_config"] = _jsonable_config(network.model)
    return header


def _jsonable_config(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    try:
        return json.loads(json.dumps(dict(cfg), default=str))
    except (TypeError, ValueError):
        return None


def write_native(tensors: Dict[str, torch.Tensor], header: dict, path: os.PathLike) -> Path:
    """A native file: the tensors as float32, the header as JSON, the checksum over both; written atomically."""
    text = json.dumps(header, sort_keys=True, allow_nan=False)
    t = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_save_file(t, path, {"tlora": text, "tlora_sha256": _checksum(text, t), "format": "pt"})
    return Path(path)


def save(network: TLoRANetwork, path: os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Write ``network`` to ``path`` (safetensors, atomically). ``metadata`` may give ``base_model``,
    ``family`` and ``training``; other keys go into ``training``. A removed network is refused (its file
    would hold no adapters)."""
    network.refuse_if_removed()
    return write_native(network.state_dict(), header_of(network, metadata), path)


def read(path: os.PathLike, verify: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, raw metadata) of any safetensors file, with one-line errors for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise WeightsFileError(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                               f"{first_line(e)}") from None
    if verify and "tlora" in meta and "tlora_sha256" not in meta:
        raise WeightsFileError(f"{path} is a tlora file without its tlora_sha256 checksum: it cannot be checked "
                               "(read it with verify=False to load it anyway)")
    if verify and "tlora_sha256" in meta and _checksum(meta.get("tlora", ""), tensors) != meta["tlora_sha256"]:
        raise WeightsFileError(f"{path} is corrupted: its checksum does not match its contents")
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise WeightsFileError(f"{path} holds non-finite values (NaN or inf) in {bad}: it is not usable weights")
    return tensors, meta


def read_metadata(path: os.PathLike) -> Dict[str, str]:
    """The raw metadata of a safetensors file, no tensors read and nothing verified (what a file says it is)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise WeightsFileError(f"{path} is not a readable safetensors file: {first_line(e)}") from None


def read_header(path: os.PathLike) -> dict:
    """The ``tlora`` JSON header of a native file."""
    _, meta = read(path)
    return parse_header(meta, path)


def parse_header(meta: Dict[str, str], path: Any = "file") -> dict:
    if "tlora" not in meta:
        raise WeightsFileError(f"{path} is not a tlora weights file (no 'tlora' header); "
                               "use `tlora convert` for LyCORIS, official or LoRA files")
    try:
        header = json.loads(meta["tlora"])
    except (json.JSONDecodeError, RecursionError):
        raise WeightsFileError(f"{path} has a corrupted 'tlora' header (invalid JSON)") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: its 'tlora' header is not a JSON object")
    if header.get("format") != FORMAT or not isinstance(header.get("format_version"), int) or \
            header["format_version"] > FORMAT_VERSION:
        raise WeightsFileError(f"{path}: its 'tlora' header has format {header.get('format')!r} version "
                               f"{header.get('format_version')!r}, which this tlora does not read; upgrade tlora")
    try:
        _check_header(header)
    except (ValueError, TypeError) as e:
        raise WeightsFileError(f"{path}: malformed 'tlora' header: {first_line(e)}") from None
    return header


def _check_header(header: dict) -> None:
    """The structure :func:`build_network` relies on: T, a valid config, a non-empty map of valid module specs."""
    T = header.get("num_train_timesteps")
    if not isinstance(T, int) or isinstance(T, bool) or T <= 0:
        raise ValueError(f"num_train_timesteps must be an int > 0, got {T!r}")
    if not isinstance(header.get("config"), dict):
        raise ValueError(f"config must be an object, got {header.get('config')!r}")
    TLoRAConfig.from_dict(header["config"])
    mods = header.get("modules")
    if not isinstance(mods, dict) or not mods or not all(isinstance(m, dict) for m in mods.values()):
        raise ValueError(f"modules must be a non-empty object of module entries, got {str(mods)[:60]}")
    for path, m in mods.items():
        missing = {f for f in ModuleSpec.__dataclass_fields__ if f != "svd"} - set(m)
        if missing:
            raise ValueError(f"modules[{path!r}] lacks {', '.join(sorted(missing))}")
        TLoRAConfig.check_settings({**m, "svd": "exact"}, f"modules[{path!r}].")   # svd here: the method used
        shape = m["base_shape"]
        if m["kind"] not in ("linear", "conv2d") or not isinstance(shape, list) or \
                not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError(f"modules[{path!r}] has kind {m['kind']!r} and base_shape {shape!r}")
        if isinstance(m["alpha"], bool) or not isinstance(m["alpha"], (int, float)):
            raise ValueError(f"modules[{path!r}].alpha must be a number, got {m['alpha']!r}")


def check_state(tensors: Dict[str, torch.Tensor], header: dict, source: Any = "file") -> None:
    """Structure before math: the tensors a native state holds are exactly those its header's modules describe
    (names, shapes from each variant's :meth:`~tlora.layers.Variant.shapes`, floating-point dtypes), so nothing
    downstream (export, inspect, load) indexes a missing tensor or multiplies mismatched ones. WeightsFileError
    naming the first difference."""
    want: Dict[str, tuple] = {}
    for path, m in header["modules"].items():
        shape, rank = list(m["base_shape"]), m["rank"]
        conv = m["kind"] == "conv2d"
        if len(shape) != (4 if conv else 2):
            raise WeightsFileError(f"{source}: modules[{path!r}] is {m['kind']} with base_shape {shape}")
        if m["variant"] == "ortho" and rank > min(shape[0], math.prod(shape[1:])):
            raise WeightsFileError(f"{source}: modules[{path!r}] has ortho rank {rank} above min(out, in) of "
                                   f"its layer {shape}")
        down, up = (rank, *shape[1:]), (shape[0], rank) + ((1, 1) if conv else ())
        for name, sh in FORMS[m["variant"]].shapes(rank, down, up).items():
            want[f"{path}.{name}"] = sh
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise WeightsFileError(f"{source}: its tensors do not match its header ("
                               + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
                               + f"; {len(missing)} missing, {len(extra)} unexpected)")
    for k, sh in want.items():
        t = tensors[k]
        if not t.is_floating_point():
            raise WeightsFileError(f"{source}: tensor {k} is {t.dtype}; weights must be floating point")
        if tuple(t.shape) != sh:
            raise WeightsFileError(f"{source}: tensor {k} has shape {list(t.shape)}, its header says {list(sh)}")


def build_network(model: nn.Module, specs: Dict[str, dict], config: TLoRAConfig, source: str = "file"
                  ) -> TLoRANetwork:
    """Adapters exactly as the header's ``specs`` describe them (path → :class:`ModuleSpec` entry), uninitialised,
    checked against the model. Raises WeightsFileError naming what does not fit."""
    specs = {p: ModuleSpec.from_dict(s) for p, s in specs.items()}
    modules = dict(model.named_modules())
    missing = [p for p in specs if p not in modules]
    if missing:
        raise WeightsFileError(f"{source} targets {len(missing)} of {len(specs)} modules that this "
                               f"{type(model).__name__} does not have (first: {missing[0]}): wrong base model?")
    for p, s in specs.items():
        have = list(getattr(modules[p], "weight", torch.empty(0)).shape)
        if have != list(s.base_shape):
            raise WeightsFileError(f"{source}: module {p} has weight shape {have} here but "
                                   f"{list(s.base_shape)} in the file: wrong base model?")
    adapters = {}
    try:
        for p, s in specs.items():
            adapters[p] = TLoRAAdapter(modules[p], num_train_timesteps=config.num_train_timesteps,
                                       multiplier=config.multiplier, init_weights=False, **s.adapter_kwargs())
    except Exception:
        for a in adapters.values():
            a.detach_from_base()
        raise
    return TLoRANetwork(model, config, adapters)


def network_from_state(model: nn.Module, tensors: Dict[str, torch.Tensor], header: dict, source: str = "file"
                       ) -> TLoRANetwork:
    """Inject the adapters a native state describes into ``model`` and load its tensors exactly."""
    config = TLoRAConfig.from_dict(header["config"])
    net = build_network(model, header["modules"], config, source=source)
    try:
        net.load_state_dict(tensors)
    except ValueError as e:
        net.remove()
        raise WeightsFileError(f"{source}: {e}") from None
    net.family = header.get("family")
    net.header = header
    return net
