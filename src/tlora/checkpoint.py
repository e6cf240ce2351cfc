"""Training checkpoints without pickle: ``checkpoint-N/`` holds

* ``tlora.safetensors``: the native weights file (loads in ``tlora generate`` as is);
* ``state.safetensors``: optimizer tensors (``opt.<param index>.<name>``) and the RNG states;
* ``state.json``: step, optimizer param groups and scalar state, lr-scheduler state.

The folder is written under a temporary name and renamed, so a crash never leaves half a checkpoint.

A checkpoint belongs to a run by its *identity*: the family and every config value that shapes the weights
(``IDENTITY_IGNORES`` lists the ones a continued run may change: max_steps, where and how often it saves and
validates, the device). A run resumes, and prunes (keep-last-K), only checkpoints of its own identity; one of
another run is never deleted or resumed, and :func:`differences` says what differs.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from . import weights
from .errors import UsageError
from .fileio import first_line, plain_mode, show

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


IDENTITY_IGNORES = {"max_steps", "resume", "overwrite", "device", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
                    "validation_steps", "num_validation_images", "validation_inference_steps", "validation_guidance",
                    "validation_multiplier", "validation_prompts", "eval_clip_model", "eval_dino_model", "best_metric"}


# the official flags that set an IDENTITY_IGNORES field (num_train_epochs is max_steps): free to change as well
OFFICIAL_IGNORES = {"num_train_epochs", "checkpointing_steps", "validation_prompts", "num_val_imgs_per_prompt",
                    "output_dir", "device", "wandb_api_key"}


def identity(config: dict, family: Optional[str]) -> dict:
    """What a checkpoint must share with a run to be that run's: the family and the config (a TrainConfig dict)
    without ``IDENTITY_IGNORES`` (and, for a run started with the official flags, without the flags that set
    them), in its JSON form."""
    kept = {k: v for k, v in config.items() if k not in IDENTITY_IGNORES}
    if isinstance(kept.get("official_flags"), dict):
        kept["official_flags"] = {k: v for k, v in kept["official_flags"].items() if k not in OFFICIAL_IGNORES}
    return json.loads(json.dumps({"family": family, **kept}, default=str))


def differences(ours: dict, theirs: dict, prefix: str = "") -> List[str]:
    """``key: theirs → ours`` for every (nested) value that differs; a key one side lacks shows as None."""
    out = []
    for k in sorted(set(ours) | set(theirs)):
        a, b = ours.get(k), theirs.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {b!r} → {a!r}")
    return out


@dataclass
class Found:
    """A ``checkpoint-N`` folder of an output folder: its step and identity (None when unreadable)."""
    path: Path
    step: int
    identity: Optional[dict]
    problem: Optional[str] = None         # why the identity could not be read

def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def scan(output_dir: Path) -> List[Found]:
    """Every checkpoint of ``output_dir`` with the identity its weights header records, oldest first."""
    out = []
    for p in list_checkpoints(output_dir):
        ident, problem = None, None
        try:
            h = weights.parse_header(weights.read_metadata(p / "tlora.safetensors"), p)
            ident = identity(h["training"]["config"], h.get("family"))
        except (ValueError, KeyError, TypeError) as e:
            problem = first_line(e) if isinstance(e, ValueError) else f"{p.name} has no training config"
        out.append(Found(p, int(CKPT_RE.match(p.name).group(1)), ident, problem))
    return out


FINAL_NAME = "tlora.safetensors"


@dataclass
class RunFolder:
    """What an output folder already holds, seen by one run (its identity): this run's checkpoints (oldest
    first), every other ``checkpoint-N`` (another run's, or a folder that only looks like one), and the final
    weights file when there is one (``final_ours``: written by this run's identity)."""
    path: Path
    run_identity: dict
    ours: List[Path]
    foreign: List[Found]
    final: Optional[Path]
    final_ours: bool
    final_problem: Optional[str]

    @classmethod
    def survey(cls, out: Path, run_identity: dict) -> "RunFolder":
        found = scan(out)
        final = out / FINAL_NAME
        final_ours, problem = False, None
        if os.path.lexists(final):
            try:
                h = weights.parse_header(weights.read_metadata(final), final)
                final_ours = not differences(run_identity, identity(h["training"]["config"], h.get("family")))
                problem = None if final_ours else "; ".join(differences(run_identity, identity(
                    h["training"]["config"], h.get("family")))[:3])
            except (ValueError, KeyError, TypeError) as e:
                problem = first_line(e) if isinstance(e, ValueError) else "it records no training config"
        return cls(out, run_identity, [f.path for f in found if f.identity == run_identity],
                   [f for f in found if f.identity != run_identity], final if os.path.lexists(final) else None,
                   final_ours, problem)

    def claim(self, resume: Optional[str], overwrite: bool) -> None:
        """Refuse, in one line, to start a run here that would delete or replace what is not its own, or that
        would silently start over a run of its own (finished or not) without ``resume`` or ``overwrite``."""
        out = show(self.path)
        if resume and overwrite:
            raise UsageError("give --resume or --overwrite, not both")
        if self.final is not None and not self.final_ours:
            raise UsageError(f"{out} holds {FINAL_NAME} of another run ({self.final_problem}); it is kept: move it "
                             "away or choose another output_dir")
        if self.foreign and not (resume and self.ours):
            f = self.foreign[-1]
            if f.identity is None:
                raise UsageError(f"{out} holds {f.path.name}, which is not a checkpoint of this run ({f.problem}); "
                                 "it is kept: move it away or choose another output_dir")
            raise UsageError(f"{out} holds {f.path.name} of another run ({'; '.join(differences(self.run_identity, f.identity)[:3])}); "
                             "it is kept: resume it with its own config, move it away, or choose another output_dir")
        if resume == "latest" and not self.ours:
            raise UsageError(f"--resume latest: {out} holds no checkpoint of this run; run without --resume to "
                             "start at step 0")
        if not resume and not overwrite and (self.ours or self.final is not None):
            what = f"a finished run ({FINAL_NAME})" if self.final is not None else f"this run's {self.ours[-1].name}"
            raise UsageError(f"{out} holds {what}: --resume latest continues it (raise max_steps to train further), "
                             "--overwrite trains it again from step 0, or choose another output_dir")

    def check_collisions(self, start: int, max_steps: int, every: int) -> None:
        """A resumed run writes checkpoint-N at every ``every`` steps and at ``max_steps``: refuse when one of
        those names is taken by a folder that is not this run's (it would be replaced)."""
        for f in self.foreign:
            if start < f.step <= max_steps and (f.step % every == 0 or f.step == max_steps):
                raise UsageError(f"{show(self.path)} holds {f.path.name}, which is not this run's, and this run would "
                                 f"write {f.path.name} at step {f.step}; it is kept: move it away first")

    def clear_own(self) -> None:
        """``--overwrite``: this run's earlier checkpoints and final weights go before it starts again at step 0
        (nothing else of the folder is touched)."""
        for p in self.ours:
            shutil.rmtree(p)
        if self.final is not None and self.final_ours:
            self.final.unlink()
        best = self.path / "tlora-best.safetensors"
        if best.is_file() and not best.is_symlink() and self._is_ours(best):
            best.unlink()
            (self.path / "best.json").unlink(missing_ok=True)
        self.ours, self.final = [], None

    def _is_ours(self, weights_file: Path) -> bool:
        try:
            h = weights.parse_header(weights.read_metadata(weights_file), weights_file)
            return not differences(self.run_identity, identity(h["training"]["config"], h.get("family")))
        except (ValueError, KeyError, TypeError):
            return False


def prune(ours: List[Path], keep: Optional[int]) -> List[Path]:
    """Delete all but the last ``keep`` of ``ours`` (this run's checkpoints, oldest first); returns the rest."""
    if not keep or len(ours) <= keep:
        return list(ours)
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return list(ours[-keep:])


def check_resumable(path: Path, run_identity: dict, max_steps: int) -> int:
    """Refuse, in one line, a checkpoint that cannot continue this run: missing or damaged files, non-finite
    weights, another run's identity, a step past ``max_steps``. Returns its step."""
    if not path.is_dir():
        raise UsageError(f"resume checkpoint not found: {path}" if not path.exists() else
                         f"resume {path} is not a checkpoint-N folder")
    try:
        header = weights.parse_header(weights.read(path / "tlora.safetensors")[1], path / "tlora.safetensors")
        info = _read_state_json(path / "state.json")
        load_file(str(path / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot resume from {path}: {first_line(e)}") from None
    except Exception as e:   # safetensors' own error types for a damaged file
        raise UsageError(f"cannot resume from {path}: state.safetensors is unreadable ({first_line(e)})") from None
    diff = differences(run_identity, identity(header.get("training", {}).get("config", {}), header.get("family")))
    if diff:
        raise UsageError(f"{path} is from another run ({'; '.join(diff[:3])}): resume it with its own config, or "
                         "start this run in another output_dir")
    if info["step"] > max_steps:
        raise UsageError(f"{path} is at step {info['step']}, past max_steps {max_steps}: raise max_steps to continue it")
    return info["step"]


def _read_state_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{path.name} is not valid JSON") from None
    if not (isinstance(info, dict) and isinstance(info.get("optimizer"), dict)
            and isinstance(info.get("lr_scheduler"), dict)):
        raise ValueError(f"{path.name} does not hold step, optimizer and lr_scheduler")
    step = info.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path.name}: step must be an integer >= 0, got {step!r}")
    m = CKPT_RE.match(path.parent.name)
    if m and int(m.group(1)) != step:
        raise ValueError(f"{path.name}: step {step} is not the step of {path.parent.name}")
    _check_optimizer_json(info["optimizer"], path.name)
    _check_scheduler_json(info["lr_scheduler"], path.name)
    return info


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_optimizer_json(opt: dict, name: str) -> None:
    """The optimizer's param groups as AdamW keeps them: finite numbers where numbers go, params as indices."""
    groups = opt.get("param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups) or \
            not isinstance(opt.get("scalars", {}), dict):
        raise ValueError(f"{name}: optimizer.param_groups must be a list of objects")
    for i, g in enumerate(groups):
        for key in ("lr", "eps", "weight_decay"):
            if key in g and not _number(g[key]):
                raise ValueError(f"{name}: optimizer.param_groups[{i}].{key} must be a finite number, got {g[key]!r}")
        if "betas" in g and not (isinstance(g["betas"], list) and len(g["betas"]) == 2 and all(map(_number, g["betas"]))):
            raise ValueError(f"{name}: optimizer.param_groups[{i}].betas must be two numbers, got {g['betas']!r}")
        params = g.get("params")
        if not isinstance(params, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                   for x in params):
            raise ValueError(f"{name}: optimizer.param_groups[{i}].params must be a list of indices")


def _check_scheduler_json(sched: dict, name: str) -> None:
    for key in ("last_epoch", "_step_count"):
        v = sched.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < -1:
            raise ValueError(f"{name}: lr_scheduler.{key} must be an integer, got {v!r}")
    for key in ("base_lrs", "_last_lr"):
        v = sched.get(key, [])
        if not isinstance(v, list) or not all(map(_number, v)):
            raise ValueError(f"{name}: lr_scheduler.{key} must be a list of finite numbers, got {v!r}")


def check_optimizer_tensors(tensors: Dict[str, torch.Tensor], params: list, name: str) -> None:
    """The optimizer tensors of a checkpoint against the parameters they belong to: an index that exists,
    AdamW's moments (``exp_avg``, ``exp_avg_sq``) of the parameter's shape, finite values."""
    for key, t in tensors.items():
        if not key.startswith("opt."):
            continue
        parts = key.split(".")
        idx = int(parts[1]) if parts[1].isdigit() else -1
        if not 0 <= idx < len(params):
            raise ValueError(f"{name}: {key} belongs to no parameter of this run ({len(params)} parameters)")
        if parts[-1] in ("exp_avg", "exp_avg_sq") and len(parts) == 3 and tuple(t.shape) != tuple(params[idx].shape):
            raise ValueError(f"{name}: {key} has shape {list(t.shape)}, its parameter {list(params[idx].shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: {key} holds non-finite values")


def _optimizer_to_files(opt_state: dict) -> tuple[Dict[str, torch.Tensor], dict]:
    """Tensors (``opt.<param index>.<name>``; nested state dicts, as bitsandbytes' 8-bit optimizers keep, as
    ``<name>.<key>``) for the safetensors file; everything else for the JSON."""
    tensors, scalars, storages = {}, {}, set()

    def split(prefix: str, st: dict) -> dict:
        rest = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                t = v.detach().cpu().contiguous()
                if t.untyped_storage().data_ptr() in storages:    # bitsandbytes shares its quantile maps
                    t = t.clone()
                storages.add(t.untyped_storage().data_ptr())
                tensors[f"{prefix}.{k}"] = t
            elif isinstance(v, dict):
                sub = split(f"{prefix}.{k}", v)
                if sub or not v:
                    rest[k] = sub
            else:
                rest[k] = v
        return rest
    for idx, st in opt_state["state"].items():
        rest = split(f"opt.{idx}", st)
        if rest:
            scalars[str(idx)] = rest
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _optimizer_from_files(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, *path = key.split(".")
            node = state.setdefault(int(idx), {})
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = v
    for idx, st in meta["scalars"].items():
        _merge(state.setdefault(int(idx), {}), st)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(output_dir: Path, step: int, network, optimizer, lr_scheduler, generator: torch.Generator,
                    metadata: dict, extra: Optional[Callable[[Path], None]] = None, replace: bool = False) -> Path:
    """``output_dir/checkpoint-<step>``, complete or not at all; ``extra(folder)`` adds files before the rename.
    An existing ``checkpoint-<step>`` is replaced only when ``replace`` (it is this run's); otherwise
    FileExistsError, before anything is written."""
    final = output_dir / f"checkpoint-{step}"
    if os.path.lexists(final) and not replace:
        raise FileExistsError(f"{final} exists and is not this run's checkpoint: it is kept")
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        weights.save(network, tmp / "tlora.safetensors", metadata=metadata)
        tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        tensors["rng.generator"] = generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "state.safetensors"))
        sched = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, "lr_scheduler": sched},
                                                   indent=1, default=float, allow_nan=False))
        if extra is not None:
            extra(tmp)
        for f in tmp.iterdir():
            plain_mode(f)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        plain_mode(tmp, directory=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(path: Path, network, optimizer, lr_scheduler, generator: torch.Generator) -> int:
    """Restore everything ``save_checkpoint`` wrote; returns the step to continue from."""
    tensors, meta = weights.read(path / "tlora.safetensors")
    weights.parse_header(meta, path)
    network.load_state_dict(tensors)
    state = load_file(str(path / "state.safetensors"))
    info = _read_state_json(path / "state.json")
    check_optimizer_tensors(state, network.trainable_parameters(), "state.safetensors")
    for key in ("rng.generator", "rng.torch"):
        if key not in state or state[key].dtype != torch.uint8:
            raise ValueError(f"state.safetensors: {key} is missing or not a random generator state")
    optimizer.load_state_dict(_optimizer_from_files(state, info["optimizer"]))
    lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **info["lr_scheduler"]})
    generator.set_state(state["rng.generator"])
    torch.set_rng_state(state["rng.torch"])
    return int(info["step"])
