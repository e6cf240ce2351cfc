"""T-LoRA inside ComfyUI: the glue between a tlora network and a ComfyUI ``ModelPatcher``.

Imported only inside a ComfyUI process (it imports ComfyUI's ``comfy`` package); the nodes in the
repository's ``comfyui_tlora`` folder are a thin layer over :func:`load_tlora` and :func:`schedule_rows`.

How it works, the ComfyUI way:

* **Modules.** A T-LoRA file names its adapters by diffusers module path (``down_blocks.1.attentions.0.
  transformer_blocks.0.attn1.to_q``). ComfyUI's own diffusers key maps (``comfy.utils.unet_to_diffusers``,
  ``mmdit_to_diffusers``, ``flux_to_diffusers``, chosen by model class as ``comfy.lora`` does) give, for
  each path, the ComfyUI module and — for fused projections (SD3 ``qkv``, Flux ``qkv`` and ``linear1``) —
  the rows of its output that the diffusers projection is. Each adapter writes only its rows, masked by its
  own schedule.
* **Adapters.** The network is built by :func:`tlora.weights.network_from_state` on a *skeleton*: a module
  tree with the diffusers paths whose layers have the diffusers shapes and no memory (zero-stride weights).
  Loading checks (missing keys, shapes, checksum) are the same as ``tlora.load``; adapter math is
  ``TLoRAAdapter.delta`` (float32 whatever the base dtype).
* **Lifetime.** Nothing is written into the shared base model. The cloned ModelPatcher gets an
  ``APPLY_MODEL`` wrapper; for each denoiser call it converts the per-sample sigmas to training-scale t
  through ``model_sampling``, sets the per-sample masks, registers forward hooks on the mapped modules,
  runs the model and removes the hooks. Two graphs sharing a base model never see each other's adapters,
  and the base model's weights are never touched (plain LoRA patches, fp8 / low-VRAM casting and stacked
  T-LoRAs compose because the hooks add to whatever the module computes).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

import comfy.model_base
import comfy.model_sampling
import comfy.patcher_extension
import comfy.utils

from . import settings as S
from .config import TLoRAConfig
from .fileio import first_line, read_mapping
from .formats import detect_format, native_state
from .masking import timestep_mask
from .network import TLoRANetwork, check_multiplier
from .schedule import RankSchedule
from .weights import WeightsFileError, network_from_state, read

WRAPPER_PREFIX = "tlora:"
# ComfyUI model configs → tlora family (``supported_models`` classes; subclasses are looked up by MRO)
FAMILY_OF_CONFIG = {"SD15": "sd15", "SDXL": "sdxl", "SD3": "sd3", "Flux": "flux", "Flux2": "flux2"}


class TLoRAComfyError(ValueError):
    """A T-LoRA file or setting that cannot be used with this model; the message is one line."""


@dataclass(frozen=True)
class Target:
    """Where a diffusers projection lives in the ComfyUI model: ``module`` (path from the BaseModel, e.g.
    ``diffusion_model.joint_blocks.0.x_block.attn.qkv``) and, for fused projections, ``rows`` = (start,
    length) of the module's output features that the projection is (None = the whole output)."""
    module: str
    rows: Optional[Tuple[int, int]] = None


# -- the ComfyUI model ----------------------------------------------------------------------------------
def family_of(model: comfy.model_base.BaseModel) -> str:
    """The tlora family of a ComfyUI BaseModel, from its ``model_config`` class."""
    for cls in type(model.model_config).__mro__:
        if cls.__name__ in FAMILY_OF_CONFIG:
            return FAMILY_OF_CONFIG[cls.__name__]
    raise TLoRAComfyError(f"T-LoRA supports SD1.5, SDXL, SD3, Flux.1 and Flux.2 models; this model is "
                          f"{type(model.model_config).__name__}")


def _diffusers_keys(model: comfy.model_base.BaseModel) -> dict:
    """ComfyUI's own diffusers → ComfyUI key map for this model (as ``comfy.lora.model_lora_keys_unet``); for
    Flux.2, whose diffusers names ComfyUI's map does not know, diffusers' own converter (:func:`_flux2_keys`)."""
    unet_config = model.model_config.unet_config
    if isinstance(model, comfy.model_base.Flux2):
        return _flux2_keys(model)
    if isinstance(model, comfy.model_base.SD3):
        return comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="diffusion_model.")
    if isinstance(model, comfy.model_base.Flux):
        return comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.")
    return {k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(unet_config).items()}


def _flux2_keys(model: comfy.model_base.BaseModel) -> dict:
    """diffusers Flux.2 key → ComfyUI key (+ rows), read off diffusers' single-file converter (BFL / ComfyUI keys →
    diffusers keys): it is run on probe tensors whose row i of ComfyUI weight number k holds k·2²⁰ + i, so each
    diffusers weight names the ComfyUI rows it came from. Weights whose rows are not one contiguous block of one
    ComfyUI weight (the swapped adaLN halves) are left out."""
    try:
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers as convert  # diffusers >= 0.36
    except ImportError:
        raise TLoRAComfyError("Flux.2 models need diffusers >= 0.36 (its Flux.2 converter names the modules)") from None
    shapes = {k: t.shape for k, t in model.diffusion_model.state_dict().items() if k.endswith(".weight") and t.dim() >= 2}
    names = sorted(shapes)
    probes = {k: (i * 2 ** 20 + torch.arange(shapes[k][0], dtype=torch.float64))[:, None] for i, k in enumerate(names)}
    out = {}
    for dkey, t in convert(probes).items():
        ids = t[:, 0].long()
        key, start = names[int(ids[0]) >> 20], int(ids[0]) & (2 ** 20 - 1)
        if not torch.equal(ids, ids[0] + torch.arange(len(ids))):
            continue
        full = f"diffusion_model.{key}"
        out[dkey] = full if len(ids) == shapes[key][0] else (full, (0, start, len(ids)))
    return out


def module_map(model: comfy.model_base.BaseModel) -> Dict[str, Target]:
    """diffusers module path → :class:`Target` for every Linear / Conv2d weight in ComfyUI's key map."""
    modules = dict(model.named_modules())
    out: Dict[str, Target] = {}
    for dkey, to in _diffusers_keys(model).items():
        if not dkey.endswith(".weight"):
            continue
        if isinstance(to, str):
            key, rows = to, None
        elif len(to) == 2 and to[1] is not None and to[1][0] == 0:   # (key, (dim 0, start, length)): fused rows
            key, rows = to[0], (int(to[1][1]), int(to[1][2]))
        else:                                                         # transformed weights: not an adapter target
            continue
        mod = modules.get(key[: -len(".weight")])
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and (rows is None or isinstance(mod, nn.Linear)):
            out[dkey[: -len(".weight")]] = Target(key[: -len(".weight")], rows)
    return out


def _proxy(mod: nn.Module, rows: Optional[Tuple[int, int]], weight: Optional[torch.Tensor]) -> nn.Module:
    """A layer with the diffusers projection's shape and the ComfyUI layer's geometry. ``weight``: the
    real rows (to rebuild LyCORIS's frozen tensors), or None for a zero-stride weight that owns no memory."""
    w_shape = list(mod.weight.shape)
    if rows is not None:
        w_shape[0] = rows[1]
    if isinstance(mod, nn.Conv2d):
        proxy = nn.Conv2d(mod.in_channels, w_shape[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                          mod.groups, bias=False, padding_mode=mod.padding_mode, device="meta")
    else:
        proxy = nn.Linear(w_shape[1], w_shape[0], bias=False, device="meta")
    w = weight if weight is not None else torch.zeros((), dtype=torch.float32).expand(w_shape)
    proxy.weight = nn.Parameter(w, requires_grad=False)
    return proxy


def skeleton(model: comfy.model_base.BaseModel, targets: Dict[str, Target], paths, weights: bool = False
             ) -> nn.Module:
    """A module tree with the given diffusers ``paths``, each a proxy of its ComfyUI layer (see :func:`_proxy`).
    ``weights=True`` gives the proxies views of the real (unpatched) base weights."""
    modules = dict(model.named_modules())
    root = nn.Module()
    for path in paths:
        t = targets[path]
        mod = modules[t.module]
        w = None
        if weights:
            w = mod.weight.detach()
            w = w if t.rows is None else w[t.rows[0]: t.rows[0] + t.rows[1]]
        parent = root
        *heads, leaf = path.split(".")
        for h in heads:
            if not hasattr(parent, h):
                parent.add_module(h, nn.Module())
            parent = getattr(parent, h)
        parent.add_module(leaf, _proxy(mod, t.rows, w))
    return root


# -- reading a file -------------------------------------------------------------------------------------------
def _unknown(paths, targets: Dict[str, Target], family: str) -> None:
    missing = [p for p in paths if p not in targets]
    if missing:
        raise TLoRAComfyError(f"{len(missing)} of {len(paths)} modules of this T-LoRA have no place in this {family} "
                              f"model (first: {missing[0]}): is the file for another base model?")


def _hparams_beside(path: Path) -> Optional[dict]:
    """The official run's hyper-parameters: ``<file stem>.hparams.yml`` or ``hparams.yml`` beside the file."""
    for cand in (path.with_name(path.stem + ".hparams.yml"), path.with_name("hparams.yml")):
        if cand.is_file():
            return read_mapping(cand, "the official run's hparams file", TLoRAComfyError, kind="yaml")
    return None


def _schedule_inputs(min_rank: Optional[int], exponent: Optional[float], carried: Optional[str]) -> None:
    if carried and (min_rank is not None or exponent is not None):
        raise TLoRAComfyError(f"this file carries its schedule ({carried}); set min_rank and exponent to 0")


def read_state(path, model: comfy.model_base.BaseModel, targets: Dict[str, Target], min_rank: Optional[int] = None,
               exponent: Optional[float] = None) -> Tuple[dict, dict]:
    """Any T-LoRA file → native state (tensors, header) for this ComfyUI model, through the same readers as
    ``tlora.load`` (:func:`tlora.formats.native_state`). ``min_rank`` / ``exponent`` are used only for a file that
    does not carry its schedule (LyCORIS without ``lycoris_config``, official without ``hparams.yml``); a file
    that carries one refuses them."""
    path = Path(path)
    try:
        tensors, meta = read(path)
        fmt = detect_format(tensors.keys(), meta)
    except ValueError as e:
        raise TLoRAComfyError(f"{path.name}: {first_line(e)}") from None
    family = family_of(model)
    skel, hp = None, None
    if fmt == "tlora":
        _schedule_inputs(min_rank, exponent, "native tlora header")
    elif fmt == "lycoris":
        carried = "lycoris_config metadata" if "lycoris_config" in meta else None
        _schedule_inputs(min_rank, exponent, carried)
        if not carried and (min_rank is None or exponent is None):
            raise TLoRAComfyError(f"{path.name} is a LyCORIS file without SimpleTuner's lycoris_config metadata: "
                                  "its schedule is unknown; set the node's min_rank and exponent")
        names = {"lycoris_" + p.replace(".", "_"): p for p in targets}
        paths = sorted({names.get(k.split(".")[0], k.split(".")[0]) for k in tensors})
        _unknown(paths, targets, family)
        skel = skeleton(model, targets, paths, weights=True)
    elif fmt == "official":
        hp = _hparams_beside(path)
        _schedule_inputs(min_rank, exponent, "hparams.yml beside it" if hp else None)
        if hp is None and (min_rank is None or exponent is None):
            raise TLoRAComfyError(f"{path.name} is an official T-LoRA checkpoint without its hparams.yml beside it: put "
                                  f"the run's logs/hparams.yml next to it as {path.stem}.hparams.yml, or set min_rank "
                                  "and exponent")
    else:
        raise TLoRAComfyError(f"{path.name} is a plain {fmt} LoRA with no timestep schedule: load it with ComfyUI's "
                              "LoraLoader")
    try:                  # the CLI's readers: structure checked before math, the same one line
        return native_state(path, tensors, meta, skel, min_rank, exponent, hp)
    except ValueError as e:
        raise TLoRAComfyError(f"{path.name}: {first_line(e)}") from None


# -- sigma → training-scale timestep ---------------------------------------------------------------------------
def train_timesteps(model_sampling, sigma: torch.Tensor, num_train_timesteps: int = 1000) -> List[float]:
    """Per-sample training-scale t (0 = clean, T = noise) for ComfyUI sigmas (B,), through ``model_sampling``:
    discrete (SD1.5 / SDXL): ``timestep(σ)``, the index on ComfyUI's own T-step grid; flow (SD3, Flux):
    σ · T. Computed in float64 and rounded to 1e-3 so float noise never moves t across a rank boundary."""
    ms = model_sampling
    s = sigma.detach().reshape(-1).to("cpu", torch.float64)
    if isinstance(ms, (comfy.model_sampling.ModelSamplingDiscreteEDM, comfy.model_sampling.ModelSamplingContinuousEDM,
                       comfy.model_sampling.StableCascadeSampling)):
        raise TLoRAComfyError(f"{type(ms).__name__} passes 0.25·log(sigma) or a continuous time: T-LoRA masks need a "
                              "discrete-time (SD1.5 / SDXL) or flow-matching (SD3 / Flux) model sampling")
    if isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow):
        t = ms.timestep(s) * (num_train_timesteps / ms.multiplier)
    elif isinstance(ms, comfy.model_sampling.ModelSamplingFlux):
        t = ms.timestep(s) * num_train_timesteps
    elif isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete):
        if ms.sigmas.shape[0] != num_train_timesteps:
            raise TLoRAComfyError(f"the model samples {ms.sigmas.shape[0]} discrete timesteps but the T-LoRA was trained "
                                  f"with T = {num_train_timesteps}")
        t = ms.timestep(s).to(torch.float64)
    else:
        raise TLoRAComfyError(f"T-LoRA does not know how {type(ms).__name__} maps sigma to a timestep")
    return [round(float(v), 3) for v in t.tolist()]


# -- the adapters on a ModelPatcher ------------------------------------------------------------------------------
class ComfyTLoRA:
    """One T-LoRA on one cloned ModelPatcher: the network (adapters keyed by diffusers path), where each
    adapter writes in the ComfyUI model, and the ``APPLY_MODEL`` wrapper that masks every denoiser call.

    ``steps`` (when ``record`` is True): per call, (training-scale t (B,), {schedule: active ranks (B,)})."""

    def __init__(self, network: TLoRANetwork, targets: Dict[str, Target], name: str, mask: bool = True):
        self.network, self.name, self.mask = network, name, mask
        self.key = f"{WRAPPER_PREFIX}{uuid.uuid4().hex}"
        self.record = False
        self.steps: list = []
        by_module: Dict[str, list] = {}
        for path, adapter in network.adapters.items():
            by_module.setdefault(targets[path].module, []).append((adapter, targets[path].rows))
        self._by_module = by_module
        self._device: Optional[torch.device] = None

    @property
    def schedules(self) -> List[RankSchedule]:
        return list(self.network.schedules())

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            for a in self.network.adapters.values():
                a.to(device)
            self._device = device

    @staticmethod
    def _hook(entries):
        def hook(module, args, output):
            x = args[0]
            for adapter, rows in entries:
                if adapter.multiplier == 0.0:
                    continue
                d = adapter.delta(x).to(output.dtype)
                if rows is None:
                    output = output + d
                else:
                    output[..., rows[0]: rows[0] + rows[1]] += d
            return output
        return hook

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        """``WrappersMP.APPLY_MODEL``: ``t`` is the per-sample sigma (B,) of this call."""
        base = executor.class_obj
        self._to(x.device)
        handles = [comfy.utils.get_attr(base, m).register_forward_hook(self._hook(entries))
                   for m, entries in self._by_module.items()]
        try:
            if not self.mask:
                return executor(x, t, *args, **kwargs)
            ts = train_timesteps(base.model_sampling, t, self.network.config.num_train_timesteps)
            if len(ts) == 1 and x.shape[0] > 1:
                ts = ts * x.shape[0]
            with timestep_mask(self.network, ts):
                if self.record:
                    self.steps.append((ts, {s: s.ranks(ts) for s in self.network.schedules()}))
                return executor(x, t, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()


def attached(patcher) -> List[ComfyTLoRA]:
    """The T-LoRAs on a ModelPatcher, in the order they were loaded."""
    return [v for k, v in patcher.attachments.items() if k.startswith(WRAPPER_PREFIX)]


def build(model: comfy.model_base.BaseModel, path, strength: float = 1.0, mask: bool = True,
          min_rank: Optional[int] = None, exponent: Optional[float] = None) -> ComfyTLoRA:
    """Read a T-LoRA file for this ComfyUI model and build its adapters (nothing is attached yet)."""
    try:                  # the node's inputs against the settings schema (min_rank, exponent: TLoRAConfig's)
        strength = check_multiplier(strength)
        for name, value in (("min_rank", min_rank), ("exponent", exponent)):
            if value is not None:
                S.check_value(TLoRAConfig, name, value)
    except ValueError as e:
        raise TLoRAComfyError(first_line(e)) from None
    family = family_of(model)
    targets = module_map(model)
    tensors, header = read_state(path, model, targets, min_rank, exponent)
    if header.get("family") not in (None, family):
        raise TLoRAComfyError(f"{Path(path).name} is a T-LoRA for {header['family']}, but this model is {family}")
    _unknown(list(header["modules"]), targets, family)
    root = skeleton(model, targets, header["modules"])
    try:
        network = network_from_state(root, tensors, header, Path(path).name)
    except WeightsFileError as e:
        raise TLoRAComfyError(str(e)) from None
    network.multiplier = float(strength)
    return ComfyTLoRA(network, targets, Path(path).name, mask)


def load_tlora(patcher, path, strength: float = 1.0, mask: bool = True, min_rank: Optional[int] = None,
               exponent: Optional[float] = None):
    """A clone of ``patcher`` with the T-LoRA of ``path`` masked at every denoiser call (the node's work)."""
    tl = build(patcher.model, path, strength, mask, min_rank, exponent)
    clone = patcher.clone()
    clone.set_attachments(tl.key, tl)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, tl.key, tl.apply_model_wrapper)
    return clone


# -- the schedule preview ----------------------------------------------------------------------------------------
def schedule_rows(patcher, sigmas: torch.Tensor) -> List[dict]:
    """Per sampler step (every sigma but the final one): sigma, training-scale t and the active rank of every
    schedule of every T-LoRA on ``patcher``."""
    tls = attached(patcher)
    if not tls:
        raise TLoRAComfyError("this model has no T-LoRA: connect the MODEL output of a Load T-LoRA node")
    sig = sigmas.detach().reshape(-1)
    if sig.numel() < 2:
        raise TLoRAComfyError("sigmas must hold at least two values (a sampler's schedule ends with its last sigma)")
    ms = patcher.get_model_object("model_sampling")
    rows = []
    for i, s in enumerate(sig[:-1]):
        row = {"step": i, "sigma": float(s), "ranks": {}}
        for tl in tls:
            t = train_timesteps(ms, s.reshape(1), tl.network.config.num_train_timesteps)[0]
            row["t"] = t
            for sched in tl.schedules:
                row["ranks"][f"{tl.name} R={sched.max_rank} Rmin={sched.min_rank} α={sched.exponent:g}"] = sched.ranks([t])[0]
        rows.append(row)
    return rows


def schedule_text(rows: List[dict]) -> str:
    names = list(rows[0]["ranks"])
    lines = [f"{'step':>4} {'sigma':>10} {'t':>9}  " + "  ".join(names)]
    for r in rows:
        lines.append(f"{r['step']:>4} {r['sigma']:>10.4f} {r['t']:>9.3f}  " +
                     "  ".join(f"{r['ranks'][n]:>{len(n)}}" for n in names))
    return "\n".join(lines)


def schedule_image(rows: List[dict]) -> torch.Tensor:
    """Active rank against sampler step, as a ComfyUI IMAGE (1, H, W, 3) float in [0, 1] (matplotlib)."""
    try:
        import matplotlib   # optional (the comfyui extra)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TLoRAComfyError("the schedule image needs matplotlib: pip install -r requirements.txt of the tlora node (or pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in rows]
    for name in rows[0]["ranks"]:
        ax.step(steps, [r["ranks"][name] for r in rows], where="mid", marker="o", label=name)
    ax.set_title(f"T-LoRA active ranks at each of {len(rows)} sampler steps", fontsize=10)
    ax.set_xlabel("sampler step (noisy → clean)")
    ax.set_ylabel("active ranks")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    plt.close(fig)
    return torch.from_numpy(img.copy())[None]
