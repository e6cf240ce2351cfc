"""A workspace of runs, as ``tlora ui`` sees it: uploads, training processes and what their folders say.

A run started here is a ``tlora train --config`` process of its own (its own session: closing the browser or
stopping the UI server never stops it) writing the same run folder a command-line run writes. Everything the UI
shows is read back from the folders — the lock's pid (running), the final weights (finished), checkpoints
(stopped, resumable), the tensorboard events (loss, lr, mean active rank), ``samples/`` — so a reopened page, or a
restarted server, finds every run as it is. A run may have a LoRA twin (``<run>-lora``: the same recipe as plain
LoRA), trained after it by one queue process (``python -m tlora.runs``).

    workspace/
      uploads/<random>.png        images as received, re-encoded (an upload's own name is never a path)
      data/<run>/image-N.png      the run's training images (its twin trains on the same folder)
      runs/<run>/config.json      the run's TrainConfig (what `tlora train --config` reads)
      runs/<run>/train.log        the process's output
      runs/<run>/...              what tlora train writes: checkpoints, samples/, logs/, tlora.safetensors, README.md
      generated/<run>/*.png       images and grids made on the Generate page, their settings in the PNG
      exports/<run>/...           the Export page's files
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
from .fileio import atomic_write, read_mapping, show, write_json

MAX_UPLOAD_BYTES = 50 * 2**20         # an image file larger than this is refused before it is decoded
MAX_UPLOAD_PIXELS = 40_000_000        # 40 MP: more is no photograph one trains on here (and a decompression bomb)
MAX_RUN_IMAGES = 100                  # T-LoRA trains on one image, or a few; a run of more is a mistake here
PID_FILE = ".ui-pid"                  # the process the workspace started for a run (see _spawn)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(name: str) -> str:
    """A run's name: letters, digits, ``-`` and ``_``, at most 64 (it becomes a folder name)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"run name {name!r}: use 1–64 letters, digits, '-' or '_' (it becomes a folder name)")
    return name


def check_upload(src):
    """An uploaded file as an RGB image, checked in this order: a file, its size, an image PIL can read, its pixel
    count; UsageError in one line otherwise."""
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
            return im.convert("RGB")
    except Image.DecompressionBombError as e:           # PIL refuses to open it at all
        raise UsageError(f"the image has too many pixels ({str(e).split('.')[0]}); at most "
                         f"{MAX_UPLOAD_PIXELS // 10**6} MP") from None
    except UsageError:
        raise
    except (OSError, ValueError):
        raise UsageError("the upload is not an image PIL can read (PNG, JPEG, WebP, …)") from None


@dataclass
class RunState:
    """What a run's folder says now."""
    name: str
    status: str                   # new | waiting (behind its run) | starting | running | stopped | finished | failed
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
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("uploads", "data", "runs"):
            self.folder(sub)

    def folder(self, *parts: str, make: bool = True) -> Path:
        """``root/parts…`` (made when missing unless ``make`` is False); a symlink on the way is refused — one
        would lead the workspace's writes outside it."""
        p = self.root
        for part in parts:
            p = p / part
            if p.is_symlink():
                raise UsageError(f"{show(p)} is a symlink: the workspace reads and writes only inside itself; "
                                 "remove the link")
            if make:
                p.mkdir(exist_ok=True)
        return p

    # -- uploads ------------------------------------------------------------------------------------------------
    def save_upload(self, src) -> Path:
        """Keep an uploaded image (checked by :func:`check_upload`) as ``uploads/<random>.png``; UsageError in one
        line otherwise, nothing written."""
        rgb = check_upload(src)
        dest = self.folder("uploads") / f"{uuid.uuid4().hex}.png"
        atomic_write(dest, lambda tmp: rgb.save(tmp, format="PNG"), suffix=".png")
        return dest

    # -- runs -----------------------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.folder("runs", check_name(name), make=False)

    def names(self) -> List[str]:
        runs = self.root / "runs"
        return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and NAME.fullmatch(p.name))

    def states(self) -> List[RunState]:
        return [state(self.run_dir(n)) for n in self.names()]

    def busy(self) -> Optional[str]:
        """The run training now (one training per machine at a time), or None."""
        return next((s.name for s in self.states() if s.status in ("waiting", "starting", "running")), None)

    def start(self, name: str, settings: Dict, images=None, mode: str = "new", twin: bool = False) -> int:
        """Start ``tlora train`` for run ``name`` in its own session; returns its pid. ``settings``: TrainConfig
        fields (``tlora``: TLoRAConfig fields); ``images``: uploads of this workspace (a new run trains on all of
        them); ``mode``: new | resume | overwrite; ``twin`` (new runs): also train ``<name>-lora``, plain LoRA with
        the same recipe and images (every rank at every step), after this run finishes. Everything is checked
        first (:meth:`plan`): a refusal writes nothing."""
        queue = self.plan(name, settings, images, mode, twin)
        if mode == "new":
            self._write_data(queue[0][1], images)
        for out, cfg, _ in queue:
            if not (out / "config.json").is_file():
                write_json(cfg, out / "config.json")
        if len(queue) == 1:
            return _spawn(_train_command(queue[0][0], queue[0][2]), queue[0][0]).pid
        pid = _spawn([sys.executable, "-m", "tlora.runs", json.dumps([[str(d), f] for d, _, f in queue])],
                     queue[0][0]).pid
        for out, _, _ in queue[1:]:         # the runs behind it wait on the queue process (the workspace stays busy)
            atomic_write(out / PID_FILE, lambda tmp: Path(tmp).write_text(str(pid)))
        return pid

    def plan(self, name: str, settings: Dict, images=None, mode: str = "new", twin: bool = False) -> List:
        """What :meth:`start` would train, checked and nothing written: ``[(run folder, config, flags)]`` (the run,
        then its twin); UsageError (SettingError naming the setting) otherwise."""
        from .checkpoint import list_checkpoints
        from .trainconfig import TrainConfig
        if mode not in ("new", "resume", "overwrite"):
            raise UsageError(f"mode {mode!r}: new, resume or overwrite")
        if twin and mode != "new":
            raise UsageError("a LoRA twin is started with a new run")
        out, busy = self.run_dir(name), self.busy()
        if busy is not None:
            raise UsageError(f"run {busy} is training: one training at a time; stop it or wait for it")
        if mode == "new" and out.exists():
            raise UsageError(f"run {name} exists: resume it, overwrite it (asked explicitly) or choose another name")
        if mode != "new" and not (out / "config.json").is_file():
            raise UsageError(f"run {name} has not been started here: nothing to {mode}")
        if mode == "new":
            self.check_uploads(images)
        cfg = read_mapping(out / "config.json", f"run {name}'s config", UsageError) if mode != "new" else \
            self._new_config(name, settings)
        checked = TrainConfig.from_dict(cfg, "the run's settings")
        checked.validate()                   # the rules between fields, templates, device: what `tlora train` checks
        flags = {"new": [], "resume": ["--resume", "latest"] if list_checkpoints(out) else [],
                 "overwrite": ["--overwrite"]}
        queue = [(out, cfg, flags[mode])]
        waiting = self.folder("runs", twin_name(name), make=False) if NAME.fullmatch(twin_name(name)) else None
        if mode == "resume" and waiting is not None and state(waiting).status == "new" and \
                (waiting / "config.json").is_file():
            queue.append((waiting, read_mapping(waiting / "config.json", "its LoRA twin's config", UsageError), []))
        if twin:
            other = self.run_dir(twin_name(name))
            if other.exists():
                raise UsageError(f"run {other.name} exists: choose another name for the run and its LoRA twin")
            queue.append((other, lora_twin(cfg, checked.tlora.rank, str(other)), []))
            TrainConfig.from_dict(queue[1][1], "the LoRA twin's settings").validate()
        return queue

    def check_uploads(self, images) -> List[Path]:
        """The uploads a new run trains on (paths of this workspace's ``uploads/``), checked."""
        if isinstance(images, (str, Path)):
            images = [images]
        if not images:
            raise UsageError("no image: upload the image to train on first")
        if len(images) > MAX_RUN_IMAGES:
            raise UsageError(f"{len(images)} images: a run here trains on at most {MAX_RUN_IMAGES} (one is enough)")
        found = [Path(i).resolve() for i in images]
        for image in found:
            if image.parent != self.root / "uploads" or not image.is_file():
                raise UsageError("the image is not an upload of this workspace")
        return found

    def _write_data(self, cfg: Dict, images) -> None:
        """The new run's images as ``data/<run>/image-N.png`` (copies an earlier run of that name left are removed
        first: the run trains on these images only)."""
        data = self.folder("data", Path(cfg["data_dir"]).name)
        for old in data.glob("image-*.png"):
            old.unlink()
        for i, image in enumerate(self.check_uploads(images)):
            shutil.copyfile(image, data / f"image-{i + 1}.png")

    def _new_config(self, name: str, settings: Dict) -> Dict:
        reserved = {"output_dir", "data_dir", "one_image", "resume", "overwrite"} & set(settings)
        if reserved:
            raise UsageError(f"{sorted(reserved)[0]} is set by the workspace, not by a setting")
        cls = settings.get("class_data_dir")
        if cls and not Path(cls).resolve().is_relative_to(self.root):     # the server reads nothing outside
            from .settings import SettingError
            raise SettingError("class_data_dir", f"a folder inside the workspace ({self.root})", cls)
        return {**settings, "output_dir": str(self.run_dir(name)),
                "data_dir": str(self.folder("data", name, make=False))}

    def stop(self, name: str) -> int:
        """SIGINT to the run's process: it finishes the step, saves a checkpoint and exits (resumable)."""
        s = state(self.run_dir(name))
        if s.status == "starting":
            raise UsageError(f"run {name} is loading its model: stop it once it trains")
        if s.status == "waiting":
            raise UsageError(f"run {name} waits for the run before it: stop that one (this one then waits; "
                             "resume that run to queue it again)")
        if s.status != "running":
            raise UsageError(f"run {name} is not training ({s.status})")
        os.kill(s.pid, signal.SIGINT)
        return s.pid


def twin_name(name: str) -> str:
    return f"{name}-lora"


def lora_twin(cfg: Dict, rank: int, output_dir: str) -> Dict:
    """``cfg`` as plain LoRA: a vanilla adapter whose Rmin is its rank (every rank at every step)."""
    return {**cfg, "output_dir": output_dir, "tlora": {**cfg.get("tlora", {}), "variant": "vanilla",
                                                       "min_rank": rank, "rank": rank}}


def _train_command(out: Path, flags: List[str]) -> List[str]:
    return [sys.executable, "-m", "tlora", "train", "--config", str(out / "config.json"), *flags]


def _spawn(command: List[str], out: Path, session: bool = True) -> subprocess.Popen:
    """``command`` (in a session of its own: the UI going away never reaches it), its output in ``train.log``, its
    pid in ``.ui-pid`` (so the run reads as starting while its model loads, before the run takes its lock)."""
    log = open(out / "train.log", "ab")
    try:
        proc = subprocess.Popen(command, cwd=out, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=session)
    finally:
        log.close()
    atomic_write(out / PID_FILE, lambda tmp: Path(tmp).write_text(str(proc.pid)))
    return proc


def run_queue(queue: List[List]) -> int:
    """Train each ``[run folder, flags]`` in turn (a run and its LoRA twin); the next starts only when one has
    finished (a stopped or failed run ends the queue: its twin can be started on its own)."""
    for out, flags in queue:
        out = Path(out)
        _spawn(_train_command(out, flags), out, session=False).wait()
        if not (out / "tlora.safetensors").is_file():
            return 1
    return 0


def state(out: Path) -> RunState:
    """Read a run folder: its lock (a live pid: running), final weights, checkpoints, samples and log."""
    from .checkpoint import CKPT_RE, list_checkpoints
    from .train import RunLock
    name = out.name
    cfg = {}
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        pass
    pid = RunLock.holder(out)
    tail = _tail(out / "train.log")
    samples = sorted((out / "samples").glob("step-*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)) \
        if (out / "samples").is_dir() else []
    steps = [int(CKPT_RE.match(p.name).group(1)) for p in list_checkpoints(out)]   # names only: no file is read
    final = out / "tlora.safetensors"
    s = RunState(name, "new", max(steps, default=0), cfg.get("max_steps"), None, None, samples, tail)
    if pid is not None:
        s.status, s.pid = "running", pid
        s.step = _logged_step(tail, s.step)
    elif _started(out) is not None:      # its process loads the model, or (no log yet) it waits in a queue
        s.status, s.pid = "starting" if (out / "train.log").is_file() else "waiting", _started(out)
    elif final.is_file():
        s.status, s.final, s.step = "finished", final, cfg.get("max_steps", s.step)
    elif steps:
        s.status = "stopped"
    elif tail.strip():
        s.status = "failed"
    return s


def _started(out: Path) -> Optional[int]:
    """The live process the workspace started for this run (which has not taken the run's lock yet), or None."""
    from .train import pid_alive
    try:
        pid = int((out / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _tail(log: Path, size: int = 4000) -> str:
    """The last ``size`` bytes of a log (the rest is never read: a log may be large)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


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


if __name__ == "__main__":          # the queue of a run and its twin: python -m tlora.runs '[[folder, flags], …]'
    sys.exit(run_queue(json.loads(sys.argv[1])))
