"""``tlora train``: one-image personalisation with a T-LoRA, on accelerate.

Read :func:`_train` and :func:`_loop` top to bottom — six steps, each a top-level function or class below with its inputs in
the call: setup (check everything, load, inject; nothing written), cache latents and text embeddings once,
prepare the optimizer, the outputs, then the loop (:func:`train_step`: per-sample timesteps → per-sample
masks → loss → backward) with checkpoints and validation along the way, and :func:`finish`.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import card, official, weights
from .data import batch_indices, check_images, find_images, load_examples, to_rgb
from .errors import Interrupted, UsageError
from .families import SHARED, TRAINING, Family, TrainingSpec, denoiser_of, detect
from .fileio import check_output, first_line, save_png, show, write_json
from .formats import to_official
from .generate import contact_sheet, load_pipeline, native_resolution, sample_images, unknown_words
from .masking import attach, timestep_mask
from .network import TLoRANetwork, inject
from .quantize import compute_dtype_of
from .trainconfig import TrainConfig


# what a run writes at the top of its output folder (besides checkpoint-N/, samples/, logs/)
WRITES = ("tlora.safetensors", "tlora-best.safetensors", "best.json", "config.resolved.json", ".tlora.lock",
          card.CARD_NAME)


class TrainingError(RuntimeError):
    """The run had to stop (e.g. a non-finite loss); the message is one line."""


class StopSignals:
    """While the loop runs, SIGINT and SIGTERM are remembered rather than acted on at once: the step in progress
    finishes, a checkpoint of it is saved, then :class:`Interrupted` is raised. A second signal stops at once
    (KeyboardInterrupt). Outside the block the previous handlers are back. In the main thread only (signals
    cannot be caught elsewhere)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, acc: Accelerator) -> Optional[int]:
        """The signal any process got (all processes stop at the same step), or None."""
        if acc.num_processes == 1:
            return self.signum
        t = torch.tensor([self.signum or 0], device=acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item()) or None


def _check_finite(network: TLoRANetwork, step: int, last_checkpoint) -> None:
    """Stop before anything of a step whose update made an adapter tensor NaN or inf is saved."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in network.trainable_parameters()]).all()):
        where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint was written"
        raise TrainingError(f"adapter weights became non-finite at step {step}: stopped, nothing of it saved{where}")


def _digest(network) -> str:
    h = hashlib.sha256()
    for k, v in sorted(network.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(cfg: TrainConfig, on_grads: Optional[Callable] = None, on_step: Optional[Callable] = None) -> Path:
    """Train and return the path of the final weights file (``OUT/tlora.safetensors``).

    ``on_grads(step, network, timesteps)`` runs after the backward of a step, before the optimizer step
    (gradients in place); ``on_step(step, loss)`` after the step. Both are for logging and tests."""
    try:
        return _train(cfg, on_grads, on_step)
    finally:  # accelerate keeps one global state; a second run in this process may use another precision
        AcceleratorState._reset_state()


def _train(cfg: TrainConfig, on_grads: Optional[Callable], on_step: Optional[Callable]) -> Path:
    run = setup(cfg)                                                   # 1. everything checked, nothing written
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=(cfg.device == "cpu"))
    lock = RunLock(run.out) if acc.is_main_process else None          #    the output folder is this run's
    try:
        final = _loop(run, acc, on_grads, on_step)
    finally:
        if lock is not None:
            lock.release()
    # the loop's wrapped model and optimizer are gone with its frame; accelerate's references go now, while every
    # process is still here: a DDP model torn down after its process group (or a peer) is gone can hang
    acc.wait_for_everyone()
    acc.free_memory()
    acc.end_training()
    return final


def _loop(run: "Run", acc: Accelerator, on_grads: Optional[Callable], on_step: Optional[Callable]) -> Path:
    cfg = run.cfg
    data = cache_inputs(run, acc.device)                               # 2. latents and text, encoded once
    opt = prepare_training(run, acc)                                   # 3. denoiser, adapters, optimizer
    outputs = Outputs(run, acc, opt.prediction_type)                   # 4. logs, samples, checkpoints, best
    progress = Progress(run, opt.start, acc.is_main_process)
    with StopSignals() as stop:
        for step in range(opt.start, cfg.max_steps):                   # 5. the loop
            loss = _step(run, data, opt, acc, outputs, step, on_grads, on_step)
            progress.update(step + 1, loss)
            signum = stop.requested(acc)
            if signum is not None:
                raise Interrupted(signum, step + 1, outputs.interrupted(step + 1, opt))
    progress.close()
    return finish(run, acc, outputs)                                   # 6. final weights, last validation


class Progress:
    """What a run tells its user: a summary before the first step (model and family, resolution, steps, batch,
    rank / Rmin / variant, output folder), the time per step once a few steps have run, then a progress bar on a
    terminal, or one line every ``max_steps / 20`` steps when stderr is a log file or CI (never a bar's carriage
    returns there). Main process only."""
    ESTIMATE_AFTER = 3

    def __init__(self, run: "Run", start: int, main: bool):
        cfg, tl = run.cfg, run.network.config
        self.start, self.total, self.main, self.t0 = start, cfg.max_steps, main, time.time()
        self.tty = sys.stderr.isatty()
        self.every = max(1, self.total // 20)
        self.bar = None
        if not main:
            return
        print(f"tlora train: {cfg.model} ({run.family.name}), {run.resolution} px, steps {start} → {self.total}, "
              f"batch {cfg.batch_size}, rank {tl.rank} / Rmin {tl.min_rank} / {tl.variant}, "
              f"{len(run.network.adapters)} layers, output {show(run.out)}", file=sys.stderr, flush=True)
        if self.tty:
            self.bar = tqdm(total=self.total, initial=start, desc="train", file=sys.stderr)

    def update(self, done: int, loss: float) -> None:
        if not self.main:
            return
        per_step = (time.time() - self.t0) / max(done - self.start, 1)
        if done - self.start == self.ESTIMATE_AFTER and done < self.total:
            left = per_step * (self.total - done)
            print(f"tlora train: {per_step:.2f} s per step: about {duration_text(left)} for the {self.total - done} "
                  "steps left", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", s_step=f"{per_step:.2f}")
        elif done % self.every == 0 or done == self.total:
            print(f"step {done}/{self.total}  loss {loss:.4f}  {per_step:.2f} s/step", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def _step(run: "Run", data: "Cached", opt: "Optimization", acc: Accelerator, outputs: "Outputs", step: int,
          on_grads: Optional[Callable], on_step: Optional[Callable]) -> float:
    """One optimizer step, then what the step count asks for: the log, a checkpoint, a validation. Returns the
    step's loss."""
    cfg = run.cfg
    loss, mean_rank, t = train_step(run, data, opt, acc, step, outputs.last_checkpoint)
    if on_grads is not None:
        on_grads(step + 1, run.network, t)
    if cfg.max_grad_norm:
        acc.clip_grad_norm_(opt.params, cfg.max_grad_norm)
    opt.optimizer.step()
    opt.lr_scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    done = step + 1
    _check_finite(run.network, done, outputs.last_checkpoint)
    outputs.log(done, loss, opt.lr_scheduler.get_last_lr()[0], mean_rank)
    if on_step is not None:
        on_step(done, loss)
    if done % cfg.checkpointing_steps == 0 or done == cfg.max_steps:
        outputs.checkpoint(done, opt)
    if cfg.validation_steps and done % cfg.validation_steps == 0 and done != cfg.max_steps:
        outputs.validate(done)
    acc.wait_for_everyone()
    return loss


class RunLock:
    """``OUT/.tlora.lock`` holds the pid of the run writing into OUT: a second run into a busy folder is refused in
    one line; a lock whose process is gone (a killed run) is taken over."""

    def __init__(self, out: Path):
        self.created = not out.exists()            # a folder this run made and left empty is removed again
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / ".tlora.lock"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = self._owner()
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                raise UsageError(f"{out} is in use by another tlora run (pid {owner}); wait for it to finish "
                                 "or choose another output_dir") from None
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)          # stale: its process is gone
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    @staticmethod
    def check(out: Path) -> None:
        """Before any work: a ``.tlora.lock`` that is not a plain file (a folder, a symlink) is refused."""
        lock = out / ".tlora.lock"
        if os.path.lexists(lock) and (lock.is_symlink() or not lock.is_file()):
            raise UsageError(f"{show(lock)} is not a lock file a tlora run wrote (a folder or a symlink); remove it")

    def _owner(self) -> Optional[int]:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def holder(out: Path) -> Optional[int]:
        """The pid of the live run writing into ``out`` now, or None (no lock, or its process is gone)."""
        try:
            pid = int((out / ".tlora.lock").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def release(self) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def pid_alive(pid: int) -> bool:
    """A process with this pid runs (a zombie — exited, not yet reaped by its parent — does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):   # no /proc (macOS): kill(0) is the answer
        return True


# -- 1. setup ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run is made of, checked before anything is written: the config (with the targets resolved), the
    checkpoints of this run already in the output folder (and the one to resume from), the pipeline and its denoiser, the family, the images, the injected network and the evaluation models."""
    cfg: TrainConfig
    out: Path
    resume_from: Optional[Path]
    folder: ckpt.RunFolder                # what ``out`` held before the run: its own checkpoints, others' kept
    pipe: object
    den: torch.nn.Module
    family: Family
    resolution: int
    examples: list
    class_examples: list
    network: TLoRANetwork
    embedder: Optional[object]

    @property
    def quantized(self) -> bool:
        """The denoiser's weights are stored quantized (``base_precision``): loaded in its compute dtype."""
        return self.cfg.base().quantized

    @property
    def spec(self) -> TrainingSpec:
        return TRAINING[self.family.name]

    @property
    def text_modules(self) -> list:
        return [m for n, m in self.pipe.components.items() if n.startswith("text_encoder") and m is not None]

    def encoders_to(self, device) -> None:
        """The VAE and text encoders to ``device`` (they leave the accelerator after caching and come back to validate)."""
        self.pipe.vae.to(device)
        for m in self.text_modules:
            m.to(device)


def claim_output(cfg: TrainConfig, out: Path, family: str) -> Tuple[ckpt.RunFolder, Optional[Path]]:
    """What ``out`` holds, checked against this run (:meth:`checkpoint.RunFolder.claim`: nothing that is not
    this run's is ever deleted or replaced; a run of its own is never restarted silently), and the checkpoint to
    resume from (None: a fresh start)."""
    run_id = ckpt.identity(cfg.to_dict(), family)
    folder = ckpt.RunFolder.survey(out, run_id)
    folder.claim(cfg.resume, cfg.overwrite)
    if not cfg.resume:
        return folder, None
    path = folder.ours[-1] if cfg.resume == "latest" else Path(cfg.resume)
    start = ckpt.check_resumable(path, run_id, cfg.max_steps)
    folder.check_collisions(start, cfg.max_steps, cfg.checkpointing_steps)
    return folder, path


def setup(cfg: TrainConfig) -> Run:
    """Check the config, the images and the model, load the pipeline and inject the adapters; writes nothing."""
    cfg.validate()
    out = check_output(cfg.output_dir, "output_dir", folder=True, writes=WRITES,
                       inputs=(cfg.data_dir, cfg.class_data_dir, cfg.model, cfg.eval_clip_model, cfg.eval_dino_model))
    RunLock.check(out)
    check_images(find_images(cfg.data_dir, cfg.one_image))  # cheap checks before the model loads
    if cfg.class_data_dir:
        check_images(find_images(cfg.class_data_dir, what="class_data_dir"))
    base = cfg.base().check_runtime()                      # the backend is installed and runs here
    # float32 on the CPU, moved and cast in prepare_training; a quantized denoiser loads in its compute dtype
    pipe = load_pipeline(cfg.model, base=base, denoiser_dtype=weight_dtype(cfg) if base.quantized else None)
    den = denoiser_of(pipe)
    family = detect(den)
    if family.name not in TRAINING:
        raise UsageError(f"training {family.name} is not supported yet")
    resolution = cfg.resolution or native_resolution(pipe) or family.resolution   # the model's own size
    examples = load_examples(cfg.data_dir, resolution, cfg.prompt(), cfg.one_image)
    class_examples = (load_examples(cfg.class_data_dir, resolution, f"a photo of {cfg.class_name}".strip(),
                                    what="class_data_dir") if cfg.class_data_dir else [])
    _note_unknown_words(pipe, [e.caption for e in examples] + cfg.resolved_validation_prompts())
    tl = cfg.tlora.targets_or(family.target_module)
    try:
        network = inject(den, tl, generator=torch.Generator().manual_seed(cfg.seed))
    except ValueError as e:
        raise UsageError(str(e)) from None
    network.family = family.name
    cfg.tlora = tl
    folder, resume_from = claim_output(cfg, out, family.name)
    if cfg.official_flags:     # the official layout holds UNet attention projections only: refuse others now
        try:
            to_official(network.state_dict(), weights.header_of(network))
        except ValueError as e:
            raise UsageError(f"official flags: {e} ({family.name} is not an official T-LoRA model)") from None
    embedder = None
    if cfg.eval_clip_model:       # load the evaluation models now: a bad path stops the run before it writes
        from .evaluate import Embedder   # transformers' CLIP / DINO stack: only runs that evaluate need it
        try:
            embedder = Embedder(cfg.eval_clip_model, cfg.eval_dino_model)
        except UsageError as e:
            raise UsageError(f"eval_clip_model / eval_dino_model: {e}") from None
    return Run(cfg, out, resume_from, folder, pipe, den, family, resolution, examples, class_examples, network,
               embedder)


def _note_unknown_words(pipe, prompts: list) -> None:
    """One note for captions and prompts with words the model's tokenizer cannot represent."""
    for prompt in dict.fromkeys(prompts):
        words = unknown_words(pipe, prompt)
        if words:
            warnings.warn(f"the model's tokenizer does not know {', '.join(map(repr, words[:4]))} in {prompt!r}: it "
                          "reads them as its unknown token; write captions (a .txt beside the image, or "
                          "prompt_template) and prompts in words it knows", stacklevel=2)


# -- 2. cached inputs ----------------------------------------------------------------------------------------------
@dataclass
class Cached:
    """VAE latent distributions (mean, std) and text conditioning of the instance (and class) images."""
    mean: torch.Tensor
    std: torch.Tensor
    cond: dict
    class_mean: Optional[torch.Tensor] = None
    class_std: Optional[torch.Tensor] = None
    class_cond: Optional[dict] = None


@torch.no_grad()
def cache_inputs(run: Run, device) -> Cached:
    """Encode every image and caption once on ``device``; then the VAE and text encoders go back to the CPU."""
    run.encoders_to(device)

    def encode(exs):
        dist = run.pipe.vae.encode(torch.stack([e.pixels for e in exs]).to(device)).latent_dist
        return dist.mean.float(), dist.std.float(), run.spec.encode(run.pipe, [e.caption for e in exs], device)

    data = Cached(*encode(run.examples))
    if run.class_examples:
        data.class_mean, data.class_std, data.class_cond = encode(run.class_examples)
    run.encoders_to("cpu")
    return data


# -- 3. denoiser, adapters, optimizer --------------------------------------------------------------------------
@dataclass
class Optimization:
    """The prepared denoiser, optimizer and lr schedule, the noise generator, the training scheduler and the step
    to start from (after a resume)."""
    den: torch.nn.Module
    params: list
    optimizer: object
    lr_scheduler: object
    gen: torch.Generator
    scheduler: object
    prediction_type: str
    weight_dtype: torch.dtype
    start: int
    process_index: int


def _optimizer_class(name: str):
    if name != "adamw8bit":
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb   # optional backend, only for the 8-bit optimizer
    except ImportError:
        raise UsageError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """The frozen denoiser's compute dtype (``mixed_precision``); adapters stay float32."""
    return compute_dtype_of(cfg.mixed_precision)


def prepare_training(run: Run, acc: Accelerator) -> Optimization:
    """Freeze and move the denoiser (adapters stay float32), build the optimizer and lr schedule, resume."""
    cfg, den = run.cfg, run.den
    dtype = weight_dtype(cfg)
    scheduler = run.family.training.scheduler(run.pipe.scheduler)
    prediction_type = cfg.prediction_type or getattr(scheduler.config, "prediction_type", "epsilon")
    den.requires_grad_(False)
    den.to(acc.device)
    if dtype != torch.float32 and not run.quantized:   # a same-dtype .to(dtype) makes diffusers warn about float32
        den.to(dtype=dtype)                            # modules; adapters stay float32 (TLoRAAdapter._apply)
    for p in run.network.parameters():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        den.enable_gradient_checkpointing()
    den.train()
    params = run.network.trainable_parameters()
    optimizer = _optimizer_class(cfg.optimizer)(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                                eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    den, optimizer, lr_scheduler = acc.prepare(den, optimizer, lr_scheduler)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + acc.process_index)
    start = 0
    if run.resume_from is not None:
        try:
            start = ckpt.load_checkpoint(run.resume_from, run.network, optimizer, lr_scheduler, gen)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UsageError(f"cannot resume from {run.resume_from}: {first_line(e)}") from None
    return Optimization(den, params, optimizer, lr_scheduler, gen, scheduler, prediction_type, dtype, start,
                        acc.process_index)


# -- 4. outputs -------------------------------------------------------------------------------------------------------
class Outputs:
    """Everything a run writes, on the main process only: tensorboard logs, validation grids, checkpoints (the
    last one remembered for the NaN message), the best weights by the evaluation metric, the final files."""

    def __init__(self, run: Run, acc: Accelerator, prediction_type: str):
        self.run, self.acc, self.main = run, acc, acc.is_main_process
        cfg, out = run.cfg, run.out
        self.metadata = {"base_model": cfg.model, "family": run.family.name,
                         "training": {"config": cfg.to_dict(), "resolution": run.resolution,
                                      "prediction_type": prediction_type}}
        self.best: Optional[float] = None
        self.writer = None
        self.last_checkpoint = None
        if self.main and cfg.overwrite:
            run.folder.clear_own()                       # --overwrite: this run's earlier results, nothing else
        self.ours = list(run.folder.ours)                # keep-last-K prunes only these
        if self.main:
            out.mkdir(parents=True, exist_ok=True)       # samples/ appears with its first grid
            self.writer = SummaryWriter(str(out / "logs"))
            self.last_checkpoint = self.ours[-1] if self.ours else None
            if cfg.official_flags:
                official.write_hparams(cfg.official_flags, out)

    def log(self, step: int, loss: float, lr: float, mean_rank: float) -> None:
        if self.main:
            self.writer.add_scalar("loss", loss, step)
            self.writer.add_scalar("lr", lr, step)
            self.writer.add_scalar("mean_active_rank", mean_rank, step)

    def checkpoint(self, step: int, opt: Optimization) -> None:
        if self.main:
            net = self.run.network
            extra = (lambda folder: official.write_weights(net.state_dict(), weights.header_of(net), folder)) \
                if self.run.cfg.official_flags else None
            mine = self.run.out / f"checkpoint-{step}" in self.ours
            path = ckpt.save_checkpoint(self.run.out, step, net, opt.optimizer, opt.lr_scheduler, opt.gen,
                                        self.metadata, extra, replace=mine)
            self.ours = ckpt.prune([p for p in self.ours if p != path] + [path], self.run.cfg.checkpoints_total_limit)
            self.last_checkpoint = path

    def interrupted(self, step: int, opt: Optimization) -> Optional[Path]:
        """A stop signal at the end of ``step``: its checkpoint (saved now unless the step just saved one), the
        logs flushed; returns the checkpoint's path (on the main process)."""
        if self.main:
            if self.last_checkpoint != self.run.out / f"checkpoint-{step}":
                self.checkpoint(step, opt)
            self.writer.close()
        self.acc.wait_for_everyone()
        return self.run.out / f"checkpoint-{step}"

    def validate(self, step: int) -> None:
        """Sample the validation prompts through ``attach`` (the same masked path as ``tlora generate``)."""
        run, cfg = self.run, self.run.cfg
        if not self.main or cfg.num_validation_images == 0:
            return
        run.encoders_to(self.acc.device)
        run.den.eval()
        guidance = cfg.validation_guidance if cfg.validation_guidance is not None else run.family.guidance
        with torch.no_grad(), attach(run.pipe, run.network, multiplier=cfg.validation_multiplier):
            imgs = sample_images(run.pipe, cfg.resolved_validation_prompts(), cfg.num_validation_images, cfg.seed,
                                 cfg.validation_inference_steps, guidance, progress=False,
                                 height=run.resolution, width=run.resolution)
        run.den.train()
        run.encoders_to("cpu")
        sheet = contact_sheet([im for _, _, im in imgs], cols=cfg.num_validation_images,
                              rows=cfg.resolved_validation_prompts(),
                              columns=[f"step {step}, seed {cfg.seed + j}" for j in range(cfg.num_validation_images)])
        save_png(sheet, run.out / "samples" / f"step-{step}.png")
        self.writer.add_image("validation", np.asarray(sheet), step, dataformats="HWC")
        if run.embedder is not None:
            self.record_metrics(step, imgs)

    def record_metrics(self, step: int, imgs: list) -> None:
        """IS / DINO-IS / TS of the validation images against the training images; keep the best weights."""
        from .evaluate import scores   # with the Embedder: only runs that evaluate need it
        run, cfg, out = self.run, self.run.cfg, self.run.out
        refs = [to_rgb(Image.open(e.path)) for e in run.examples]
        rep = scores(run.embedder, [im for _, _, im in imgs], [p for p, _, _ in imgs], refs, cfg.placeholder)["overall"]
        for k in ("IS", "DINO_IS", "TS"):
            if rep[k] is not None:
                self.writer.add_scalar(f"eval/{k}", rep[k], step)
        value = rep["IS"] + rep["TS"] if cfg.best_metric == "IS+TS" else rep[cfg.best_metric]
        if self.best is None or value > self.best:
            self.best = value
            weights.save(run.network, out / "tlora-best.safetensors", metadata={**self.metadata, "training": {
                **self.metadata["training"], "step": step, "best_metric": cfg.best_metric, "scores": rep}})
            write_json({"step": step, "metric": cfg.best_metric, "value": value, "scores": rep,
                        "weights": "tlora-best.safetensors",
                        "checkpoint": f"checkpoint-{step}" if (out / f"checkpoint-{step}").is_dir() else None},
                       out / "best.json")


# -- 5. one optimizer step --------------------------------------------------------------------------------------------
def _batch(run: Run, data: Cached, opt: Optimization, device, step: int, micro: int):
    """(latents (n, …), conditioning) of one micro-batch: instance images, then class images (prior loss)."""
    cfg, accum, B = run.cfg, run.cfg.gradient_accumulation_steps, run.cfg.batch_size

    def latents_of(mean, std, idx):
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=opt.gen).to(device)
        return run.spec.latents(run.pipe.vae, z)

    def cond_of(c, idx):
        return {k: (v if k in SHARED else v[idx]).to(device, opt.weight_dtype) for k, v in c.items()}

    idx = batch_indices(step, micro, accum, B, len(run.examples), cfg.seed + opt.process_index)
    latents, c = latents_of(data.mean, data.std, idx), cond_of(data.cond, idx)
    if run.class_examples:
        cidx = batch_indices(step, micro, accum, B, len(run.class_examples), cfg.seed + 1)
        latents = torch.cat([latents, latents_of(data.class_mean, data.class_std, cidx)])
        cc = cond_of(data.class_cond, cidx)
        c = {k: (v if k in SHARED else torch.cat([v, cc[k]])) for k, v in c.items()}
    return latents, c


def _loss(run: Run, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    cfg, B = run.cfg, run.cfg.batch_size
    if run.class_examples:
        loss = F.mse_loss(pred[:B], tgt[:B]) + cfg.prior_loss_weight * F.mse_loss(pred[B:], tgt[B:])
    else:
        loss = F.mse_loss(pred, tgt)
    if cfg.ortho_reg_weight:
        loss = loss + cfg.ortho_reg_weight * run.network.orthogonality_loss().to(loss.device)
    return loss


def train_step(run: Run, data: Cached, opt: Optimization, acc: Accelerator, step: int, last_checkpoint
               ) -> Tuple[float, float, torch.Tensor]:
    """Forward and backward of every micro-batch of one step, each under its per-sample timestep masks (held
    through the backward). Returns (mean loss, mean active rank, the last micro-batch's timesteps)."""
    family, T, accum = run.family, run.network.config.num_train_timesteps, run.cfg.gradient_accumulation_steps
    total, ranks_sum = 0.0, 0.0
    for micro in range(accum):
        latents, c = _batch(run, data, opt, acc.device, step, micro)
        noise = torch.randn(latents.shape, generator=opt.gen).to(acc.device)
        t = family.training.sample_timesteps(opt.scheduler, latents.shape[0], opt.gen, T)   # per sample, training scale
        noisy, target = family.training.noisy_and_target(opt.scheduler, latents, noise, t.to(acc.device), T,
                                                         opt.prediction_type)
        sync = acc.no_sync(opt.den) if micro < accum - 1 else nullcontext()
        with sync, timestep_mask(run.network, t):                       # masks hold through the backward
            pred = run.spec.call(opt.den, noisy.to(opt.weight_dtype), (t / family.timestep_scale).to(acc.device), c)
            loss = _loss(run, pred.float(), run.spec.to_layout(target).float())
            if not torch.isfinite(loss):
                where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint was written"
                raise TrainingError(f"loss is {loss.item()} at step {step + 1}: stopped{where}")
            acc.backward(loss / accum)
        total += loss.item() / accum
        ranks = next(iter(run.network.schedules())).ranks(t.tolist())    # for the log only
        ranks_sum += sum(ranks) / len(ranks) / accum
    return total, ranks_sum, t


# -- 6. the end -------------------------------------------------------------------------------------------------------
def finish(run: Run, acc: Accelerator, outputs: Outputs) -> Path:
    """The final weights, the resolved config, each process's weights digest, a last validation and the model
    card (README.md)."""
    final = run.out / "tlora.safetensors"
    digests = acc.gather_for_metrics([_digest(run.network)], use_gather_object=True) \
        if acc.num_processes > 1 else [_digest(run.network)]
    if acc.is_main_process:
        weights.save(run.network, final, metadata=outputs.metadata)
        write_json({**run.cfg.to_dict(), "resolution": run.resolution}, run.out / "config.resolved.json")
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        write_json({"processes": acc.num_processes, "backend": backend, "digests": list(digests)},
                   run.out / "logs" / "ranks.json")
        outputs.validate(run.cfg.max_steps)
        outputs.writer.close()
        if card.write_card(weights.read_header(final), run.out, run.cfg) is None:
            warnings.warn(f"{show(run.out)} holds a {card.CARD_NAME} that is not tlora's; it is kept and no model "
                          "card was written (tlora push writes one into the upload)")
    acc.wait_for_everyone()
    return final
