"""Training checkpoints without pickle: ``checkpoint-N/`` holds

* ``tlora.safetensors``: the native weights file (loads in ``tlora generate`` as is);
* ``state.safetensors``: optimizer tensors (``opt.<param index>.<name>``) and the RNG states;
* ``state.json``: step, optimizer param groups and scalar state, lr-scheduler state.

The folder is written under a temporary name and renamed, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from . import weights
from .fileio import plain_mode

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _optimizer_to_files(opt_state: dict) -> tuple[Dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(output_dir: Path, step: int, network, optimizer, lr_scheduler, generator: torch.Generator,
                    metadata: dict, keep: Optional[int]) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        weights.save(network, tmp / "tlora.safetensors", metadata=metadata)
        tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        tensors["rng.generator"] = generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "state.safetensors"))
        sched = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, "lr_scheduler": sched},
                                                   indent=1, default=float))
        if final.exists():
            shutil.rmtree(final)
        plain_mode(tmp, directory=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, network, optimizer, lr_scheduler, generator: torch.Generator) -> int:
    """Restore everything ``save_checkpoint`` wrote; returns the step to continue from."""
    tensors, meta = weights.read(path / "tlora.safetensors")
    weights.parse_header(meta, path)
    network.load_state_dict(tensors)
    state = load_file(str(path / "state.safetensors"))
    info = json.loads((path / "state.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(state, info["optimizer"]))
    lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **info["lr_scheduler"]})
    generator.set_state(state["rng.generator"])
    torch.set_rng_state(state["rng.torch"])
    return int(info["step"])
