"""Other people's files: read LyCORIS and official T-LoRA checkpoints, write LyCORIS, diffusers/peft and
kohya files. Conversions are pure tensor maps between a *native state* — (tensors in tlora's layout,
tlora header) — and the other layouts; only reading LyCORIS needs the base model (its frozen tensors are
re-derived from the base weight, as LyCORIS does).

Key layouts:

* LyCORIS: ``lycoris_<path with _>.q_layer.weight | .p_layer.weight | .lambda_layer | .alpha``;
  SimpleTuner keeps the LyCORIS JSON in the metadata key ``lycoris_config``.
* official SDXL: ``<attn path>.processor.to_q_lora.down.weight | .up.weight`` (vanilla) or
  ``.q_layer.weight | .p_layer.weight | .lambda_layer | .base_q.weight | .base_p.weight | .base_lambda``
  (ortho), for to_q, to_k, to_v, to_out; scale 1.
* diffusers/peft: ``unet.<path>.lora_A.weight | .lora_B.weight`` (``transformer.`` for DiTs); alpha = rank.
* kohya: ``lora_unet_<path with _>.lora_down.weight | .lora_up.weight | .alpha``; SDXL in SGM block names.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from . import functional as Fn
from .config import TLoRAConfig
from .families import FAMILIES
from .fileio import looks_like_hub_id, read_mapping
from .layers import FORMS
from .network import TLoRANetwork
from .quantize import dense_weight
from .schedule import active_rank
from . import settings as S
from .weights import (ModuleSpec, WeightsFileError, atomic_save_file, check_state, make_header, network_from_state,
                      parse_header, read, write_native)

Tensors = Dict[str, torch.Tensor]
FORMATS = ("tlora", "lycoris", "official", "diffusers", "kohya")
OFFICIAL_RE = re.compile(r"^(?:unet\.)?(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<rest>.+)$")
OFFICIAL_NAMES = {"down.weight": "lora_down", "up.weight": "lora_up", "q_layer.weight": "q", "p_layer.weight": "p",
                  "lambda_layer": "lam", "base_q.weight": "q0", "base_p.weight": "p0", "base_lambda": "lam0"}


def detect_format(keys, meta: Dict[str, str]) -> str:
    """The format of a safetensors file from its keys and metadata; ValueError when unknown."""
    keys = list(keys)
    if "tlora" in meta:
        return "tlora"
    if any(k.startswith("lycoris_") for k in keys):
        return "lycoris"
    if any(OFFICIAL_RE.match(k) for k in keys):
        return "official"
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora.down." in k for k in keys):
        return "diffusers"
    raise ValueError("unknown weights format: the keys are neither tlora, LyCORIS, official T-LoRA, "
                     "diffusers/peft nor kohya LoRA")


def _header(specs: Dict[str, ModuleSpec], config: TLoRAConfig, family: Optional[str], source: str,
            extra: Optional[dict] = None) -> dict:
    return make_header(specs, config, family, training={"converted_from": source, **(extra or {})})


def _need(value, name: str, source: str):
    if value is None:
        raise ValueError(f"{source} file does not say its {name}: pass --{name.replace('_', '-')}")
    return value


# -- LyCORIS -------------------------------------------------------------------------------------------------
def read_lycoris(tensors: Tensors, meta: Dict[str, str], model: nn.Module, min_rank: Optional[int] = None,
                 exponent: Optional[float] = None, num_train_timesteps: int = 1000) -> Tuple[Tensors, dict]:
    """Native state of a LyCORIS ``tlora`` file. Frozen Q0/P0/λ0 come from saved ``base_*`` tensors when
    present, else from the SVD of the base weight, principal triplets — what LyCORIS itself does on load
    (a warning says so: correct only if the file was trained with that init)."""
    lyc = _lycoris_metadata(meta)
    min_rank = min_rank if min_rank is not None else lyc.get("tlora_min_rank", 1 if lyc else None)
    exponent = exponent if exponent is not None else lyc.get("tlora_alpha", 1.0 if lyc else None)
    _need(min_rank, "min_rank", "LyCORIS")
    _need(exponent, "exponent", "LyCORIS")
    by_name = {"lycoris_" + p.replace(".", "_"): (p, m) for p, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))}
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        name, _, leaf = k.partition(".")
        groups.setdefault(name, {})[leaf] = v
    missing = [n for n in groups if n not in by_name]
    if missing:
        raise ValueError(f"LyCORIS file names {len(missing)} modules this {type(model).__name__} does not have "
                         f"(first: {missing[0]}): wrong base model?")
    for name, g in groups.items():
        _check_lycoris_module(name, g, by_name[name][1], min_rank)
    out: Tensors = {}
    specs = {}
    rederived = 0
    for name, g in groups.items():
        path, base = by_name[name]
        if "lambda_layer" not in g:
            raise ValueError(f"{name}: not a LyCORIS tlora module (no lambda_layer); only algo 'tlora' is read")
        q, p, lam = g["q_layer.weight"].float(), g["p_layer.weight"].float(), g["lambda_layer"].float().reshape(-1)
        rank = q.shape[0]
        if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1):
            raise ValueError(f"{path}: LyCORIS tlora on a {base.kernel_size} conv cannot be read "
                             "(LyCORIS applies a 1x1 kernel with the base padding; its own forward fails there)")
        w = dense_weight(base).detach()                # a dequantized copy when the base is quantized
        w2 = w.float().reshape(w.shape[0], -1)
        if "base_q" in g:
            q0, p0, lam0 = g["base_q"].float(), g["base_p"].float(), g["base_lambda"].float().reshape(-1)
        else:
            q0, p0, lam0, _ = Fn.svd_init(w2, rank, "principal", from_weight=True, method="exact")
            rederived += 1
        alpha = float(g["alpha"]) if "alpha" in g else float(lyc.get("linear_alpha", rank))
        shape_q, shape_p = (rank, *w.shape[1:]), (w.shape[0], rank) + ((1, 1) if q.dim() == 4 else ())
        out.update({f"{path}.q": q.reshape(shape_q), f"{path}.p": p.reshape(shape_p), f"{path}.lam": lam,
                    f"{path}.q0": q0.reshape(shape_q), f"{path}.p0": p0.reshape(shape_p), f"{path}.lam0": lam0})
        specs[path] = ModuleSpec("ortho", rank, alpha, min_rank, float(exponent), "weight", "principal",
                                 "exact", "conv2d" if q.dim() == 4 else "linear", tuple(w.shape))
    if rederived:
        warnings.warn(f"LyCORIS file has no frozen base tensors: Q0/P0/λ0 of {rederived} modules were rebuilt from the "
                      "SVD of the base weight (principal), as LyCORIS does; correct only for LyCORIS's default init",
                      stacklevel=2)
    first = next(iter(specs.values()))
    config = TLoRAConfig(rank=first.rank, alpha=first.alpha, min_rank=first.min_rank, exponent=float(exponent),
                         variant="ortho", init="weight", sig_type="principal", svd="exact",
                         num_train_timesteps=num_train_timesteps,
                         multiplier=float(lyc.get("multiplier", 1.0)), target_module=())
    return out, _header(specs, config, None, "lycoris", {"lycoris_config": lyc} if lyc else None)


LYCORIS_LEAVES = {"q_layer.weight", "p_layer.weight", "lambda_layer", "alpha", "base_q", "base_p", "base_lambda"}
LYCORIS_META = {"tlora_min_rank": "min_rank", "tlora_alpha": "exponent", "linear_alpha": "alpha",
                "multiplier": "multiplier", "linear_dim": "rank"}


def _lycoris_metadata(meta: Dict[str, str]) -> dict:
    """The ``lycoris_config`` metadata (JSON), its schedule keys checked against the schema; {} when absent."""
    if "lycoris_config" not in meta:
        return {}
    try:
        lyc = json.loads(meta["lycoris_config"])
    except (json.JSONDecodeError, RecursionError):
        raise ValueError("its lycoris_config metadata is not valid JSON") from None
    if not isinstance(lyc, dict):
        raise ValueError("its lycoris_config metadata is not a JSON object")
    if lyc.get("algo", "tlora") != "tlora":
        raise ValueError(f"LyCORIS algo {lyc.get('algo')!r} is not supported (only 'tlora')")
    for key, field_name in LYCORIS_META.items():
        if key in lyc:
            try:
                S.check_value(TLoRAConfig, field_name, lyc[key])
            except S.SettingError as e:
                raise ValueError(f"lycoris_config {key} must be {e.requirement}, got {lyc[key]!r}") from None
    return lyc


def _check_lycoris_module(name: str, g: Dict[str, torch.Tensor], base: nn.Module, min_rank: int) -> None:
    """One LyCORIS tlora module's tensors against each other and the base layer, before any math."""
    if "lambda_layer" not in g:
        raise ValueError(f"{name}: not a LyCORIS tlora module (no lambda_layer); only algo 'tlora' is read")
    bad = set(g) - LYCORIS_LEAVES
    if bad or not {"q_layer.weight", "p_layer.weight"} <= set(g):
        raise ValueError(f"{name}: a LyCORIS tlora module holds q_layer.weight, p_layer.weight, lambda_layer "
                         f"(alpha, base_*), not {sorted(g)}")
    if any(k in g for k in ("base_q", "base_p", "base_lambda")) and \
            not all(k in g for k in ("base_q", "base_p", "base_lambda")):
        raise ValueError(f"{name}: base_q, base_p and base_lambda come together")
    non_float = next((k for k, t in g.items() if not t.is_floating_point()), None)
    if non_float:
        raise ValueError(f"{name}.{non_float} is {g[non_float].dtype}; weights must be floating point")
    q, p, lam = g["q_layer.weight"], g["p_layer.weight"], g["lambda_layer"]
    w = getattr(base, "weight", None)
    out_f, in_f = (w.shape[0], w[0].numel()) if w is not None else (0, 0)
    rank = q.shape[0] if q.dim() in (2, 4) else 0
    if not (q.dim() in (2, 4) and p.dim() == q.dim() and q[0].numel() == in_f and tuple(p.shape[:2]) == (out_f, rank)
            and lam.numel() == rank and 0 < rank <= min(out_f, in_f)):
        raise ValueError(f"{name}: tensors q_layer {list(q.shape)}, p_layer {list(p.shape)}, lambda {list(lam.shape)} "
                         f"do not fit its layer of weight {list(w.shape) if w is not None else None}")
    if "base_q" in g and (g["base_q"].shape != q.shape or g["base_p"].shape != p.shape
                          or g["base_lambda"].numel() != rank):
        raise ValueError(f"{name}: base_q / base_p / base_lambda do not match q_layer / p_layer / lambda_layer")
    if "alpha" in g and g["alpha"].numel() != 1:
        raise ValueError(f"{name}.alpha must be one number, got shape {list(g['alpha'].shape)}")
    if min_rank > rank:
        raise ValueError(f"min_rank {min_rank} exceeds the rank {rank} of {name} (the mask would be off); pass "
                         "--min-rank <= rank")


def to_lycoris(tensors: Tensors, header: dict) -> Tuple[Tensors, Dict[str, str]]:
    """A file ``lycoris.create_lycoris_from_weights`` loads. LyCORIS re-derives Q0/P0/λ0 from the base
    weight, so only adapters in LyCORIS's own form (ortho, exact weight SVD, principal) keep the ``tlora``
    algo; every other adapter is written as a LyCORIS ``lora`` module at its exact full-rank factors
    (vanilla rank r, ortho rank 2r), which LyCORIS loads as a plain LoRA. The schedule travels in the
    ``lycoris_config`` metadata, the way SimpleTuner stores it."""
    out: Tensors = {}
    plain = 0
    for path, s in header["modules"].items():
        name = "lycoris_" + path.replace(".", "_")
        if (s["variant"] == "ortho" and s["init"] == "weight" and s["sig_type"] == "principal"
                and s.get("svd", "exact") == "exact"):
            out[f"{name}.q_layer.weight"] = tensors[f"{path}.q"].contiguous()
            out[f"{name}.p_layer.weight"] = tensors[f"{path}.p"].contiguous()
            out[f"{name}.lambda_layer"] = tensors[f"{path}.lam"].reshape(1, -1).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(s["alpha"]))
        else:
            down, up = lora_factors(tensors, path, s)
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # scale already in up
            plain += 1
    c = header["config"]
    lyc = {"algo": "tlora", "multiplier": 1.0, "linear_dim": c["rank"], "linear_alpha": c["alpha"] or c["rank"],
           "tlora_min_rank": c["min_rank"], "tlora_alpha": c["exponent"]}
    meta = {"lycoris_config": json.dumps(lyc), "tlora_export": json.dumps(
        {"from": "tlora", "plain_lora_modules": plain, "mask_dropped": plain > 0,
         "schedule": {k: c[k] for k in ("rank", "min_rank", "exponent")}})}
    return out, meta


# -- official repository ---------------------------------------------------------------------------------------
# hparams.yml keys the official scripts write that are not flags of a TrainConfig / TLoRAConfig field
HPARAM_OWN = {"trainer_class": str, "trainer_type": str, "output_dir": str}


def check_hparams(hp: dict, need=()) -> None:
    """An official ``hparams.yml``: each value tlora reads checked against the schema of the field its flag
    sets (``lora_rank`` is ``TLoRAConfig.rank``; no booleans for numbers, ranges included), min_rank <= lora_rank,
    and the keys ``need`` present; ValueError naming the key otherwise."""
    from .trainconfig import OFFICIAL_FLAGS     # the flag → field table, from the schema
    for key in need:
        if hp.get(key) is None:
            raise ValueError(f"has no {key}: is it a T-LoRA run's logs/hparams.yml?")
    for key, v in hp.items():
        if v is None:
            continue
        where = OFFICIAL_FLAGS.get(key)
        if where is not None:
            try:
                S.check_value(*where, v)
            except S.SettingError as e:
                raise ValueError(f"hparams {key} must be {e.requirement}, got {v!r}") from None
        elif key in HPARAM_OWN and not isinstance(v, HPARAM_OWN[key]):
            raise ValueError(f"hparams {key} must be a string, got {v!r}")
    if isinstance(hp.get("min_rank"), int) and isinstance(hp.get("lora_rank"), int) and hp["min_rank"] > hp["lora_rank"]:
        raise ValueError(f"hparams min_rank ({hp['min_rank']}) must not exceed lora_rank ({hp['lora_rank']})")


def read_official(tensors: Tensors, min_rank: Optional[int] = None, exponent: Optional[float] = None,
                  hparams: Optional[dict] = None) -> Tuple[Tensors, dict]:
    """Native state of an official SDXL checkpoint (``save_attn_procs`` keys), scale 1. Rank, min_rank and
    exponent come from ``hparams`` (its ``logs/hparams.yml``: lora_rank, min_rank, alpha_rank_scale) or options."""
    hp = hparams or {}
    check_hparams(hp)
    min_rank = _need(min_rank if min_rank is not None else hp.get("min_rank"), "min_rank", "official")
    exponent = float(_need(exponent if exponent is not None else hp.get("alpha_rank_scale"), "exponent", "official"))
    out: Tensors = {}
    specs: dict = {}
    for k, v in tensors.items():
        m = OFFICIAL_RE.match(k)
        if not m or m.group("rest") not in OFFICIAL_NAMES:
            raise ValueError(f"unexpected key in an official T-LoRA file: {k}")
        if not v.is_floating_point():
            raise ValueError(f"{k} is {v.dtype}; weights must be floating point")
        path = f"{m.group('attn')}.{'to_out.0' if m.group('proj') == 'to_out' else m.group('proj')}"
        leaf = OFFICIAL_NAMES[m.group("rest")]
        out[f"{path}.{leaf}"] = v.float().reshape(-1) if leaf in ("lam", "lam0") else v.float()
    for path in sorted({k.rsplit(".", 1)[0] for k in out}):
        _check_official_module(path, {k.rsplit(".", 1)[1]: v for k, v in out.items() if k.rsplit(".", 1)[0] == path},
                               int(min_rank))
    for path in sorted({k.rsplit(".", 1)[0] for k in out}):
        vanilla = f"{path}.lora_down" in out
        down = out[f"{path}.lora_down" if vanilla else f"{path}.q"]
        up = out[f"{path}.lora_up" if vanilla else f"{path}.p"]
        rank = down.shape[0]
        specs[path] = ModuleSpec("vanilla" if vanilla else "ortho", rank, float(rank), int(min_rank), exponent,
                                 "random", hp.get("sig_type", "last"), "exact", "linear", (up.shape[0], down.shape[1]))
    first = next(iter(specs.values()))
    config = TLoRAConfig(rank=first.rank, alpha=None, min_rank=first.min_rank, exponent=exponent,
                         variant=first.variant, init="random", sig_type=first.sig_type,
                         target_module=("Attention",))
    return out, _header(specs, config, "sdxl", "official", {"hparams": {k: v for k, v in hp.items()
                                                                         if isinstance(v, (int, float, str, bool))}})


def _check_official_module(path: str, t: Dict[str, torch.Tensor], min_rank: int) -> None:
    """One official module's tensors: a complete vanilla (down, up) or ortho (q, p, λ, q0, p0, λ0) set of 2-D
    factors whose shapes agree, and min_rank <= its rank; before any math."""
    leaves = set(t)
    if leaves not in ({"lora_down", "lora_up"}, {"q", "p", "lam", "q0", "p0", "lam0"}):
        raise ValueError(f"official module {path} holds {sorted(leaves)}: not a complete LoRA (down, up) or "
                         "ortho (q, p, lambda and their base_) set")
    down, up = (t["lora_down"], t["lora_up"]) if "lora_down" in t else (t["q"], t["p"])
    rank = down.shape[0] if down.dim() == 2 else 0
    ok = down.dim() == 2 and up.dim() == 2 and up.shape[1] == rank > 0
    if "q" in t:
        ok = ok and t["q0"].shape == down.shape and t["p0"].shape == up.shape and \
            t["lam"].numel() == rank == t["lam0"].numel() and rank <= min(up.shape[0], down.shape[1])
    if not ok:
        raise ValueError(f"official module {path}: its tensors' shapes do not agree "
                         f"(down {list(down.shape)}, up {list(up.shape)})")
    if min_rank > rank:
        raise ValueError(f"min_rank {min_rank} exceeds the rank {rank} of {path} (the mask would be off)")


def to_official(tensors: Tensors, header: dict) -> Tuple[Tensors, Dict[str, str]]:
    """Native state → the official layout (``save_attn_procs`` keys of to_q/to_k/to_v/to_out.0, scale 1: a
    scale alpha/rank other than 1 is folded into up, or into λ and λ0). The schedule is not in the file: the
    run's ``hparams.yml`` holds it."""
    inverse = {leaf: name for name, leaf in OFFICIAL_NAMES.items()}
    projections = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
    out: Tensors = {}
    for path, spec in header["modules"].items():
        proj = next((p for p in projections if path.endswith("." + p)), None)
        if proj is None or spec["kind"] != "linear":
            raise ValueError(f"the official layout holds only to_q/to_k/to_v/to_out.0 of attention layers, not {path}")
        scale = spec["alpha"] / spec["rank"]
        pre = f"{path[:-len(proj) - 1]}.processor.{projections[proj]}_lora"
        for leaf in (("lora_down", "lora_up") if spec["variant"] == "vanilla" else ("q", "p", "lam", "q0", "p0", "lam0")):
            t = tensors[f"{path}.{leaf}"].float()
            if leaf in ("lora_up", "lam", "lam0"):
                t = t * scale
            out[f"{pre}.{inverse[leaf]}"] = (t.reshape(1, -1) if leaf in ("lam", "lam0") else t).contiguous()
    return out, {"format": "pt"}


# -- plain LoRA exports --------------------------------------------------------------------------------------------
def lora_factors(tensors: Tensors, path: str, spec: dict, r: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(down (k, in, …), up (out, k, …)) with scale folded into up, such that up ∘ down = the adapter's delta
    at its first r ranks (all when None). Vanilla k = r; ortho k = 2r: down = [diag(λ)Q ; diag(λ0)Q0],
    up = [P, −P0]."""
    r = spec["rank"] if r is None else r
    scale = spec["alpha"] / spec["rank"]
    form = FORMS[spec["variant"]]
    down, up = form.factors({n: tensors[f"{path}.{n}"] for n in form.tensors}, r)
    return down.float().contiguous(), (up.float() * scale).contiguous()


def _ranks_at(header: dict, at_timestep: Optional[float]) -> Dict[str, Optional[int]]:
    T = header["num_train_timesteps"]
    return {p: None if at_timestep is None else active_rank(at_timestep, s["rank"], s["min_rank"], s["exponent"], T)
            for p, s in header["modules"].items()}


def _export_note(header: dict, at_timestep: Optional[float]) -> str:
    c = header["config"]
    return json.dumps({"from": "tlora", "mask_dropped": True, "at_timestep": at_timestep,
                       "schedule": {k: c[k] for k in ("rank", "min_rank", "exponent", "num_train_timesteps")},
                       "variant": header["variant"]})


def to_diffusers(tensors: Tensors, header: dict, at_timestep: Optional[float] = None
                 ) -> Tuple[Tensors, Dict[str, str]]:
    """peft-style keys that ``pipe.load_lora_weights`` reads (no alphas: scale is folded into lora_B)."""
    fam = header.get("family")
    prefix = FAMILIES[fam].denoiser_attr if fam in FAMILIES else "unet"
    out: Tensors = {}
    for path, r in _ranks_at(header, at_timestep).items():
        down, up = lora_factors(tensors, path, header["modules"][path], r)
        out[f"{prefix}.{path}.lora_A.weight"], out[f"{prefix}.{path}.lora_B.weight"] = down, up
    return out, {"tlora_export": _export_note(header, at_timestep), "format": "pt"}


RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def sgm_path(path: str, layers_per_block: int) -> str:
    """diffusers UNet module path → SGM (kohya / ComfyUI / A1111) path, e.g.
    down_blocks.1.attentions.0.x → input_blocks.4.1.x for SDXL (layers_per_block = 2)."""
    n = layers_per_block + 1
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        kind, i, inner, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        idx = 1 + i * n + j if kind == "down_blocks" else i * n + j
        head = f"{'input_blocks' if kind == 'down_blocks' else 'output_blocks'}.{idx}.{0 if inner == 'resnets' else 1}"
        return f"{head}.{RESNET_SGM.get(rest, rest) if inner == 'resnets' else rest}"
    m = re.match(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        inner, j, rest = m.group(1), int(m.group(2)), m.group(3)
        idx = 1 if inner == "attentions" else (0 if j == 0 else 2)
        return f"middle_block.{idx}.{RESNET_SGM.get(rest, rest) if inner == 'resnets' else rest}"
    raise ValueError(f"no SGM name for module {path}; kohya export covers attention and resnet layers")


def to_kohya(tensors: Tensors, header: dict, at_timestep: Optional[float] = None,
             layers_per_block: Optional[int] = None, output_name: str = "") -> Tuple[Tensors, Dict[str, str]]:
    """kohya keys with ``.alpha`` tensors (= rank, the scale is folded into lora_up). SDXL uses SGM block
    names (what ComfyUI, A1111 and Forge read); other UNets keep diffusers names; DiTs use lora_transformer_.
    The metadata carries kohya's ``ss_*`` keys (:func:`kohya_metadata`)."""
    fam = FAMILIES.get(header.get("family"))            # unknown family: diffusers paths under lora_unet_
    sgm = fam is not None and fam.sgm_names
    if sgm:
        layers_per_block = layers_per_block or (header.get("denoiser_config") or {}).get("layers_per_block", 2)
    prefix = fam.kohya_prefix if fam is not None else "lora_unet_"
    out: Tensors = {}
    for path, r in _ranks_at(header, at_timestep).items():
        down, up = lora_factors(tensors, path, header["modules"][path], r)
        name = prefix + (sgm_path(path, layers_per_block) if sgm else path).replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out, {"tlora_export": _export_note(header, at_timestep), **kohya_metadata(header, out, output_name)}


def kohya_metadata(header: dict, out: Tensors, output_name: str = "") -> Dict[str, str]:
    """The ``ss_*`` keys kohya's ``train_network.py`` writes, as strings, from a native header and the exported
    tensors: what A1111's, Forge's and Civitai's info panels show (base model, network dim / alpha, resolution,
    steps, the trigger words as tag frequency). Keys the file cannot know (a converted LyCORIS or official file
    has no training record) are left out; a local base model path is reduced to its folder name."""
    dims = [int(t.shape[0]) for k, t in out.items() if k.endswith(".lora_down.weight")]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(dims, default=0)),
            "ss_network_alpha": str(float(max(dims, default=0))),     # the .alpha tensors: rank, scale folded in
            "ss_training_comment": "T-LoRA (tlora); plain LoRA export, timestep mask dropped: see tlora_export"}
    fam = FAMILIES.get(header.get("family"))
    if fam is not None and fam.kohya_version:
        meta["ss_base_model_version"] = fam.kohya_version
    if header.get("base_model"):
        base = str(header["base_model"])
        meta["ss_sd_model_name"] = base if looks_like_hub_id(base) else Path(base).name
    if output_name:
        meta["ss_output_name"] = output_name
    training = header.get("training") or {}
    cfg = training.get("config") or {}
    if cfg:
        res = training.get("resolution") or cfg.get("resolution")
        trigger = " ".join(str(w) for w in (cfg.get("placeholder"), cfg.get("class_name")) if w)
        meta.update({"ss_max_train_steps": str(cfg.get("max_steps")), "ss_learning_rate": str(cfg.get("learning_rate")),
                     "ss_seed": str(cfg.get("seed")), "ss_lr_scheduler": str(cfg.get("lr_scheduler")),
                     "ss_mixed_precision": str(cfg.get("mixed_precision"))})
        if res:
            meta["ss_resolution"] = f"({res}, {res})"
        if trigger:
            meta["ss_tag_frequency"] = json.dumps({Path(str(cfg.get("data_dir") or "data")).name: {trigger: 1}})
    return meta


def read_state(path, model: Optional[nn.Module] = None, min_rank: Optional[int] = None,
               exponent: Optional[float] = None, hparams: Optional[str] = None) -> Tuple[Tensors, dict]:
    """Any T-LoRA file → native state (tensors in tlora's layout, tlora header).

    ``model`` (the denoiser) is needed for LyCORIS files; ``hparams`` is the official ``hparams.yml``."""
    tensors, meta = read(path)
    hp = read_mapping(hparams, "hparams file", kind="yaml") if hparams else None
    return native_state(path, tensors, meta, model, min_rank, exponent, hp)


def native_state(path, tensors: Tensors, meta: Dict[str, str], model: Optional[nn.Module] = None,
                 min_rank: Optional[int] = None, exponent: Optional[float] = None, hparams: Optional[dict] = None
                 ) -> Tuple[Tensors, dict]:
    """The tensors and metadata of a read file (:func:`tlora.weights.read`) → native state, by format."""
    fmt = detect_format(tensors.keys(), meta)
    if fmt == "tlora":
        state = tensors, parse_header(meta, path)
    elif fmt == "lycoris":
        if model is None:
            raise ValueError("reading a LyCORIS file needs the base model (--model): LyCORIS files omit the frozen tensors")
        state = read_lycoris(tensors, meta, model, min_rank, exponent)
    elif fmt == "official":
        state = read_official(tensors, min_rank, exponent, hparams)
    else:
        raise ValueError(f"{path} is a plain {fmt} LoRA: it has no timestep schedule to read")
    check_state(*state, source=path)      # every format ends as one checked native state
    return state


def load(path, model: nn.Module, min_rank: Optional[int] = None, exponent: Optional[float] = None,
         hparams: Optional[str] = None) -> TLoRANetwork:
    """Inject the adapters of a weights file into ``model``. Native files load exactly; LyCORIS and official
    T-LoRA files are converted on the way (``min_rank``, ``exponent``, ``hparams``: see :func:`read_state`)."""
    try:
        tensors, header = read_state(path, model, min_rank, exponent, hparams)
    except WeightsFileError:
        raise
    except ValueError as e:
        raise WeightsFileError(f"{path}: {e}") from None
    return network_from_state(model, tensors, header, str(path))


def write_state(fmt: str, tensors: Tensors, header: dict, path, at_timestep: Optional[float] = None) -> None:
    """Native state → a file of format ``fmt`` (tlora | lycoris | official | diffusers | kohya), written atomically."""
    if fmt == "tlora":
        write_native(tensors, header, path)
        return
    if at_timestep is not None and fmt in ("lycoris", "official"):
        raise ValueError(f"--at-timestep applies to plain LoRA exports (diffusers, kohya), not to {fmt}")
    writers = {"lycoris": lambda: to_lycoris(tensors, header), "official": lambda: to_official(tensors, header),
               "diffusers": lambda: to_diffusers(tensors, header, at_timestep),
               "kohya": lambda: to_kohya(tensors, header, at_timestep, output_name=Path(path).stem)}
    if fmt not in writers:
        raise ValueError(f"unknown output format {fmt!r}; choose one of tlora, lycoris, official, diffusers, kohya")
    out, meta = writers[fmt]()
    atomic_save_file(out, path, meta)


def summary(path) -> dict:
    """What ``tlora inspect`` prints: format, variant, modules, ranks, schedules, metadata. Needs no model."""
    tensors, meta = read(path)
    fmt = detect_format(tensors.keys(), meta)
    info: dict = {"file": str(path), "format": fmt, "tensors": len(tensors),
                  "metadata": {k: (v if len(v) < 200 else v[:200] + "…") for k, v in meta.items() if k != "tlora"}}
    if fmt == "tlora":
        h = parse_header(meta, path)
        check_state(tensors, h, path)
        mods = h["modules"]
        info.update(variant=h["variant"], family=h.get("family"), base_model=h.get("base_model"),
                     num_train_timesteps=h["num_train_timesteps"], modules=len(mods),
                     schedules=sorted({(s["rank"], s["min_rank"], s["exponent"]) for s in mods.values()}))
        return info
    if fmt == "lycoris":
        lyc = _lycoris_metadata(meta)
        names = {k.split(".")[0] for k in tensors}
        ranks = sorted({tensors[f"{n}.q_layer.weight"].shape[0] for n in names if f"{n}.q_layer.weight" in tensors})
        mr, ex = lyc.get("tlora_min_rank"), lyc.get("tlora_alpha")
        info.update(variant="ortho" if ranks else "plain", modules=len(names),
                    schedules=[(r, mr if mr is not None else 1, ex if ex is not None else 1.0) for r in ranks],
                    schedule_known=bool(lyc))
        return info
    if fmt == "official":
        state, h = read_official(tensors, min_rank=1, exponent=1.0)
        info.update(variant=h["variant"], modules=len(h["modules"]), schedule_known=False,
                    schedules=sorted({(s["rank"], s["min_rank"], s["exponent"]) for s in h["modules"].values()}))
        return info
    try:
        note = json.loads(meta["tlora_export"]) if "tlora_export" in meta else None
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: its tlora_export metadata is not valid JSON") from None
    downs = [v for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight"))]
    if any(d.dim() not in (2, 4) for d in downs):
        raise ValueError(f"{path}: a LoRA down weight is not a 2-D or 4-D tensor")
    info.update(variant="plain LoRA (no timestep mask)", modules=len(downs), export=note,
                ranks=sorted({d.shape[0] for d in downs}), schedules=[])
    return info
