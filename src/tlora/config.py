"""``TLoRAConfig``: what to inject where, validated on construction.

Defaults follow the source of a config, so each reproduces its own tool:

* ``TLoRAConfig()`` / our JSON: the paper's T-LoRA — ortho, init from the SVD of a random N(0, 1/r)
  matrix, ``sig_type="last"`` (official README), rank 64, min_rank 1, exponent 1, alpha = rank (scale 1).
* ``TLoRAConfig.from_lycoris(json)``: LyCORIS ``algo: tlora`` — ortho, SVD of the base weight,
  ``sig_type="principal"``, scale = linear_alpha / linear_dim (linear_alpha defaults to 1, as in LyCORIS).
  Our extra keys ``tlora_variant``, ``tlora_init``, ``sig_type`` select the others.
* ``TLoRAConfig.from_official(...)``: the official repository's flags — ``trainer_type`` ortho_lora → ortho
  with random-matrix SVD, lora → vanilla; scale 1; attention projections only.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Dict, Literal, Optional, Tuple

from . import settings as S
from .settings import SettingError, setting

# the words a config may use for the adapter's form and init; the types behind them live in layers / functional
VARIANTS = ("vanilla", "ortho")               # layers.FORMS: one type per variant
INITS = ("random", "weight")
SIG_TYPES = ("principal", "last", "middle")   # functional.select_triplets
SVD_METHODS = ("auto", "exact")

# per-module overrides allowed in module_algo_map
OVERRIDE_KEYS = ("rank", "alpha", "variant", "min_rank", "exponent", "init", "sig_type", "svd")
Names = Tuple[str, ...]


@dataclass
class TLoRAConfig:
    rank: Annotated[S.Rank, setting("adapter rank R (the most ranks active, at t = 0)",
                                 lycoris="linear_dim", official="lora_rank")] = 64
    alpha: Annotated[Optional[float], setting("LoRA alpha: scale = alpha / rank; null or 0: scale 1",
                                              lycoris="linear_alpha")] = None
    min_rank: Annotated[S.Rank, setting("Rmin: ranks active at the noisiest step (<= rank)",
                                     lycoris="tlora_min_rank", official="min_rank", comfyui="min_rank")] = 1
    exponent: Annotated[S.Exponent, setting("schedule exponent α of r(t)", lycoris="tlora_alpha",
                                       official="alpha_rank_scale", comfyui="exponent")] = 1.0
    variant: Annotated[Literal[VARIANTS], setting("adapter form: ortho (the paper's T-LoRA) or vanilla LoRA",
                                                  lycoris="tlora_variant")] = "ortho"
    init: Annotated[Literal[INITS], setting("ortho init: SVD of a random matrix (paper) or of the weight (LyCORIS)",
                                            lycoris="tlora_init")] = "random"
    sig_type: Annotated[Literal[SIG_TYPES], setting("which singular triplets the ortho init takes",
                                                    lycoris="sig_type", official="sig_type")] = "last"
    svd: Annotated[Literal[SVD_METHODS], setting("exact full SVDs (LyCORIS-identical) or auto (fast)")] = "auto"
    multiplier: Annotated[float, setting("adapter strength while training", gt=0, le=1000,
                                         lycoris="multiplier")] = 1.0
    num_train_timesteps: Annotated[S.TrainTimesteps, setting("T, the denoiser's training timesteps",
                                                lycoris="num_train_timesteps")] = 1000
    conv_rank: Annotated[Optional[S.Rank], setting("rank of Conv2d layers; null: rank",
                                                lycoris="conv_dim")] = None
    conv_alpha: Annotated[Optional[float], setting("alpha of Conv2d layers; null: alpha",
                                                   lycoris="conv_alpha")] = None
    target_module: Annotated[Names, setting("class names whose Linear / Conv2d layers get adapters",
                                            strict=False)] = ("Attention",)
    target_name: Annotated[Names, setting("module paths: exact, or regular expressions (fnmatch with "
                                          "use_fnmatch)", strict=False)] = ()
    exclude_name: Annotated[Names, setting("module paths never adapted (same matching)", strict=False)] = ()
    use_fnmatch: Annotated[bool, setting("match target_name / exclude_name as shell patterns")] = False
    module_algo_map: Annotated[Dict[str, Dict[str, Any]], setting(
        "class name or module path → per-module overrides of rank, alpha, variant, min_rank, exponent, init, "
        "sig_type, svd (also targets)")] = field(default_factory=dict)

    def __post_init__(self):
        S.check(self)
        self.module_algo_map = {k: dict(v) for k, v in self.module_algo_map.items()}
        self._check_rules()

    def _check_rules(self) -> None:
        """The rules between fields (each field's own type and range are the schema's): Rmin <= R everywhere,
        patterns that compile, overrides that are settings."""
        self.check_settings(self.layer_kwargs(), "")
        if self.conv_rank is not None and self.conv_rank < self.min_rank:
            raise SettingError("conv_rank", f">= min_rank ({self.min_rank}) or null", self.conv_rank)
        if not self.use_fnmatch:
            for key in ("target_name", "exclude_name"):
                for pattern in getattr(self, key):
                    try:
                        re.compile(pattern)
                    except re.error as e:
                        raise SettingError(key, f"a list of valid regular expressions ({e})", pattern) from None
        for key, over in self.module_algo_map.items():
            bad = set(over) - set(OVERRIDE_KEYS)
            if bad:
                raise S.unknown_keys(bad, OVERRIDE_KEYS, f"module_algo_map[{key!r}]")
            self.check_settings({**self.layer_kwargs(), **over}, f"module_algo_map[{key!r}].")

    @staticmethod
    def check_settings(d: dict, where: str) -> dict:
        """One adapter's settings (rank, min_rank, exponent, alpha, variant, init, sig_type, svd), each against
        the schema, and min_rank <= rank; SettingError naming ``where`` + the key. Returns them normalised."""
        out = {k: S.check_value(TLoRAConfig, k, d[k], where) for k in OVERRIDE_KEYS}
        if out["min_rank"] > out["rank"]:
            raise SettingError(f"{where}min_rank", f"<= rank ({out['rank']})", out["min_rank"])
        return out

    # -- per-layer settings --------------------------------------------------------------------------
    def layer_kwargs(self) -> dict:
        return dict(rank=self.rank, alpha=self.alpha, variant=self.variant, min_rank=self.min_rank,
                    exponent=self.exponent, init=self.init, sig_type=self.sig_type, svd=self.svd)

    def for_layer(self, keys, is_conv: bool) -> dict:
        """Settings of one layer: the defaults, conv settings for convs, then the first ``keys`` entry
        (innermost class name or path) found in ``module_algo_map``."""
        kw = self.layer_kwargs()
        if is_conv:
            kw["rank"] = self.conv_rank or self.rank
            kw["alpha"] = self.conv_alpha if self.conv_alpha is not None else self.alpha
        for k in keys:
            if k in self.module_algo_map:
                kw.update(self.module_algo_map[k])
                break
        if kw["min_rank"] > kw["rank"]:        # never clamped: that would switch the mask off
            raise SettingError("min_rank", f"<= the layer's rank ({kw['rank']})", kw["min_rank"])
        return kw

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("target_module", "target_name", "exclude_name"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "T-LoRA config") -> "TLoRAConfig":
        """Our JSON (field names as keys); SettingError / UsageError naming the key and ``source``."""
        return S.parse(cls, d, source)

    def replace(self, **kw) -> "TLoRAConfig":
        return replace(self, **kw)

    def targets_or(self, target_module: tuple) -> "TLoRAConfig":
        """This config, or with ``target_module`` (a family's default targets) when it names no target at all."""
        if self.target_module or self.target_name or self.module_algo_map:
            return self
        return self.replace(target_module=tuple(target_module))

    @classmethod
    def from_lycoris(cls, d: dict, source: str = "LyCORIS config") -> "TLoRAConfig":
        """The LyCORIS JSON (``algo: tlora``) as SimpleTuner's ``lycoris_config`` file holds it. Every key is
        checked against the schema under its LyCORIS name; a key given null is an error, never a default."""
        return _from_lycoris(cls, d, source)

    @classmethod
    def from_official(cls, trainer_type: str = "ortho_lora", lora_rank: int = 64, min_rank: int = 32,
                      alpha_rank_scale: float = 1.0, sig_type: str = "last") -> "TLoRAConfig":
        """The official repository's flags: LoRA on to_q/to_k/to_v/to_out.0 of every attention, scale 1."""
        variants = {"ortho_lora": "ortho", "lora": "vanilla"}
        if trainer_type not in variants:
            raise SettingError("trainer_type", "one of " + ", ".join(map(repr, variants)), trainer_type,
                               spelled="--trainer_type")
        return S.build(cls, dict(rank=lora_rank, alpha=None, min_rank=min_rank, exponent=alpha_rank_scale,
                                 variant=variants[trainer_type], init="random", sig_type=sig_type,
                                 target_module=("Attention",), target_name=(), exclude_name=()),
                       None, {f: "--" + k for k, f in S.foreign_names(cls, "official").items()})


# -- LyCORIS --------------------------------------------------------------------------------------------------
# LyCORIS keys that are not TLoRAConfig fields, with their exact types; apply_preset is read below
LYCORIS_ONLY = {"algo": str, "apply_preset": dict, "bypass_mode": bool, "dropout": (int, float),
                "use_data_init": bool}
PRESET_KEYS = {"target_module": "target_module", "unet_target_module": "target_module",
               "target_name": "target_name", "unet_target_name": "target_name", "exclude_name": "exclude_name",
               "use_fnmatch": "use_fnmatch"}


def _from_lycoris(cls, d: dict, source: str) -> TLoRAConfig:
    names = S.foreign_names(cls, "lycoris")
    if not isinstance(d, dict):
        raise S.UsageError(f"{source} must hold a JSON object, got {d!r:.60}")
    bad = set(d) - set(names) - set(LYCORIS_ONLY)
    if bad:
        raise S.unknown_keys(bad, list(names) + list(LYCORIS_ONLY), source)
    for k, v in d.items():
        if v is None:
            raise SettingError(k, "given (remove the key for its default; null is not a value)", None, source)
        kind = LYCORIS_ONLY.get(k)
        if kind is not None and (not isinstance(v, kind) or kind is not bool and isinstance(v, bool)):
            raise SettingError(k, {str: "a string", dict: "an object", bool: "true or false"}.get(kind, "a number"),
                               v, source)
    if d.get("algo") != "tlora":
        raise S.UsageError(f"LyCORIS algo {d.get('algo')!r} is not supported: tlora reads only algo 'tlora' "
                           f"({source})")
    if "linear_dim" not in d:
        raise S.UsageError(f"{source} needs 'linear_dim' (the T-LoRA rank)")
    if d.get("dropout"):
        raise S.UsageError(f"LyCORIS 'dropout' in {source} is not supported by tlora; remove it or set it to 0")
    kw = {names[k]: v for k, v in d.items() if k in names}
    if d.get("conv_dim") == 0:                    # LyCORIS: conv_dim 0 = convs like linears
        kw["conv_rank"] = None
    kw.setdefault("alpha", 1)                     # LyCORIS's default linear_alpha is 1
    kw.setdefault("sig_type", "principal")
    kw.setdefault("init", "weight" if d.get("use_data_init", True) else "random")
    kw.update(_preset(d.get("apply_preset", {}), source), svd="exact")     # LyCORIS-identical frozen tensors
    spelled = {f: k for k, f in names.items()} | {f: f"apply_preset.{f}" for f in set(PRESET_KEYS.values())} | \
        {"module_algo_map": "apply_preset.module_algo_map"}
    return S.build(cls, kw, source, spelled)


def _preset(preset: dict, source: str) -> dict:
    """``apply_preset`` → target_module, target_name, exclude_name, use_fnmatch, module_algo_map (LyCORIS
    algo-map keys renamed to fields); lists must be lists (a string is refused by the schema, never iterated)."""
    known = set(PRESET_KEYS) | {"module_algo_map", "name_algo_map"}
    bad = set(preset) - known
    if bad:
        raise S.unknown_keys(bad, known, f"apply_preset in {source}")
    out = {}
    for key, field_name in PRESET_KEYS.items():
        if key in preset and field_name not in out:
            out[field_name] = preset[key]
    names = S.foreign_names(TLoRAConfig, "lycoris")
    algo_map = {}
    for k in ("module_algo_map", "name_algo_map"):
        m = preset.get(k, {})
        if not isinstance(m, dict) or not all(isinstance(v, dict) for v in m.values()):
            raise SettingError(f"apply_preset.{k}", "an object mapping names to objects", m, source)
        for key, over in m.items():
            over = dict(over)
            algo = over.pop("algo", "tlora")
            if algo != "tlora":
                raise S.UsageError(f"apply_preset.{k}[{key!r}] in {source}: algo {algo!r} is not supported "
                                   "(only 'tlora')")
            wrong = {o for o in over if names.get(o) not in OVERRIDE_KEYS}
            if wrong:
                raise S.unknown_keys(wrong, [n for n, f in names.items() if f in OVERRIDE_KEYS],
                                     f"apply_preset.{k}[{key!r}] in {source}")
            algo_map[key] = {names[o]: v for o, v in over.items()}
    if algo_map:
        out["module_algo_map"] = algo_map
    return out

