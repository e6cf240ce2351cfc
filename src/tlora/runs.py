"""A workspace of runs, as ``tlora ui`` sees it: uploads, training processes and what their folders say.

A run started here is a ``tlora train --config`` process of its own (its own session: closing the browser or
stopping the UI server never stops it) writing the same run folder a command-line run writes. Everything the UI
shows is read back from the folders — the lock's pid (running), the final weights (finished), checkpoints
(stopped, resumable), the tensorboard events (loss, lr, mean active rank), ``samples/`` — so a reopened page, or a
restarted server, finds every run as it is.

    workspace/
      uploads/<random>.png        images as received, re-encoded (an upload's own name is never a path)
      data/<run>/<image>.png      the run's training image and its caption
      runs/<run>/config.json      the run's TrainConfig (what `tlora train --config` reads)
      runs/<run>/train.log        the process's output
      runs/<run>/...              what tlora train writes: checkpoints, samples/, logs/, tlora.safetensors, README.md
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .errors import UsageError
from .fileio import atomic_write, write_json

MAX_UPLOAD_BYTES = 50 * 2**20         # an image file larger than this is refused before it is decoded
MAX_UPLOAD_PIXELS = 40_000_000        # 40 MP: more is no photograph one trains on here (and a decompression bomb)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(name: str) -> str:
    """A run's name: letters, digits, ``-`` and ``_``, at most 64 (it becomes a folder name)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"run name {name!r}: use 1–64 letters, digits, '-' or '_' (it becomes a folder name)")
    return name


@dataclass
class RunState:
    """What a run's folder says now."""
    name: str
    status: str                   # new | running | stopped | finished | failed
    step: int = 0                 # the last checkpoint's or the final step
    max_steps: Optional[int] = None
    pid: Optional[int] = None
    final: Optional[Path] = None
    samples: List[Path] = field(default_factory=list)
    log_tail: str = ""


class Workspace:
    """The folder the UI owns; nothing is read or written outside it but the (read-only) models."""

    def __init__(self, root):
        self.root = Path(root).resolve()
        for sub in ("uploads", "data", "runs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- uploads ------------------------------------------------------------------------------------------------
    def save_upload(self, src) -> Path:
        """Check an uploaded file (size, then an image PIL can read, then its pixel count) and keep it as
        ``uploads/<random>.png``; UsageError in one line otherwise, nothing written."""
        from PIL import Image
        src = Path(src)
        if not src.is_file():
            raise UsageError("the upload is not a file")
        if src.stat().st_size > MAX_UPLOAD_BYTES:
            raise UsageError(f"the image is {src.stat().st_size / 2**20:.0f} MB; at most {MAX_UPLOAD_BYTES >> 20} MB")
        try:
            with Image.open(src) as im:
                if im.width * im.height > MAX_UPLOAD_PIXELS:
                    raise UsageError(f"the image is {im.width}×{im.height} px; at most {MAX_UPLOAD_PIXELS // 10**6} MP")
                im.load()
                rgb = im.convert("RGB")
        except Image.DecompressionBombError as e:           # PIL refuses to open it at all
            raise UsageError(f"the image has too many pixels ({str(e).split('.')[0]}); at most "
                             f"{MAX_UPLOAD_PIXELS // 10**6} MP") from None
        except UsageError:
            raise
        except (OSError, ValueError):
            raise UsageError("the upload is not an image PIL can read (PNG, JPEG, WebP, …)") from None
        dest = self.root / "uploads" / f"{uuid.uuid4().hex}.png"
        atomic_write(dest, lambda tmp: rgb.save(tmp, format="PNG"), suffix=".png")
        return dest

    # -- runs -----------------------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / check_name(name)

    def names(self) -> List[str]:
        runs = self.root / "runs"
        return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and NAME.fullmatch(p.name))

    def states(self) -> List[RunState]:
        return [state(self.run_dir(n)) for n in self.names()]

    def busy(self) -> Optional[str]:
        """The run training now (one training per machine at a time), or None."""
        return next((s.name for s in self.states() if s.status == "running"), None)

    def start(self, name: str, settings: Dict, image: Optional[Path], mode: str = "new") -> int:
        """Start ``tlora train`` for run ``name`` in its own session; returns its pid. ``settings``: TrainConfig
        fields (``tlora``: TLoRAConfig fields); ``image``: an upload of this workspace (new runs); ``mode``:
        new | resume | overwrite. Everything is checked first: a refusal writes nothing."""
        from .trainconfig import TrainConfig
        if mode not in ("new", "resume", "overwrite"):
            raise UsageError(f"mode {mode!r}: new, resume or overwrite")
        out, busy = self.run_dir(name), self.busy()
        if busy is not None:
            raise UsageError(f"run {busy} is training: one training at a time; stop it or wait for it")
        if mode == "new" and out.exists():
            raise UsageError(f"run {name} exists: resume it, overwrite it (asked explicitly) or choose another name")
        if mode != "new" and not (out / "config.json").is_file():
            raise UsageError(f"run {name} has not been started here: nothing to {mode}")
        cfg = json.loads((out / "config.json").read_text()) if mode != "new" else \
            self._new_config(name, settings, image)
        TrainConfig.from_dict(cfg, "the run's settings")           # every value checked before anything is written
        if mode == "new":
            data = Path(cfg["data_dir"])
            data.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, data / cfg["one_image"])
            write_json(cfg, out / "config.json")
        flag = {"new": [], "resume": ["--resume", "latest"], "overwrite": ["--overwrite"]}[mode]
        log = open(out / "train.log", "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "tlora", "train", "--config", str(out / "config.json"), *flag],
                                    cwd=out, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()
        return proc.pid

    def _new_config(self, name: str, settings: Dict, image: Optional[Path]) -> Dict:
        if image is None:
            raise UsageError("no image: upload the image to train on first")
        image = Path(image).resolve()
        if image.parent != self.root / "uploads" or not image.is_file():
            raise UsageError("the image is not an upload of this workspace")
        reserved = {"output_dir", "data_dir", "one_image", "resume", "overwrite"} & set(settings)
        if reserved:
            raise UsageError(f"{sorted(reserved)[0]} is set by the workspace, not by a setting")
        return {**settings, "output_dir": str(self.run_dir(name)), "data_dir": str(self.root / "data" / name),
                "one_image": "image.png"}

    def stop(self, name: str) -> int:
        """SIGINT to the run's process: it finishes the step, saves a checkpoint and exits (resumable)."""
        s = state(self.run_dir(name))
        if s.status != "running":
            raise UsageError(f"run {name} is not training ({s.status})")
        os.kill(s.pid, signal.SIGINT)
        return s.pid


def state(out: Path) -> RunState:
    """Read a run folder: its lock (a live pid: running), final weights, checkpoints, samples and log."""
    from .checkpoint import scan
    from .train import RunLock
    name = out.name
    cfg = {}
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        pass
    pid = RunLock.holder(out)
    log = out / "train.log"
    tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
    samples = sorted((out / "samples").glob("step-*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)) \
        if (out / "samples").is_dir() else []
    steps = [f.step for f in scan(out)] if out.is_dir() else []
    final = out / "tlora.safetensors"
    s = RunState(name, "new", max(steps, default=0), cfg.get("max_steps"), None, None, samples, tail)
    if pid is not None:
        s.status, s.pid = "running", pid
        s.step = _logged_step(tail, s.step)
    elif final.is_file():
        s.status, s.final, s.step = "finished", final, cfg.get("max_steps", s.step)
    elif steps:
        s.status = "stopped"
    elif tail.strip():
        s.status = "failed"
    return s


def _logged_step(tail: str, default: int) -> int:
    """The last ``step N/M`` the run printed (its progress lines), else ``default``."""
    found = re.findall(r"step (\d+)/\d+", tail)
    return int(found[-1]) if found else default


_READERS: Dict[str, object] = {}     # logs folder → its EventAccumulator, which reads on from where it stopped


def metrics(out: Path) -> Dict[str, List[tuple]]:
    """loss, lr and mean active rank by step, from the run's tensorboard events (tensorboard's own reader, kept
    per run so each call reads only the events written since the last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logs = out / "logs"
    if not logs.is_dir():
        return {}
    acc = _READERS.get(str(logs))
    if acc is None:
        acc = _READERS.setdefault(str(logs), EventAccumulator(str(logs), size_guidance={"scalars": 0}))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}
