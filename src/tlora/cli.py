"""``tlora`` command line: every subcommand's arguments and handler (generate, convert, inspect, train,
evaluate, memory, settings, demo). Only the chosen subcommand's arguments are built, and handlers import their
modules when they run: a typo in a config or a flag is refused before torch, diffusers or transformers load.

Bad input is one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from PIL import Image
from safetensors import SafetensorError

from .config import TLoRAConfig
from .errors import OneLineParser as _Parser
from .errors import Interrupted, UsageError, WeightsFileError
from .fileio import atomic_write, check_output, first_line, remove_own, show
from .hub import HubError
from .settings import add_flag, build, settings_table
from .trainconfig import OFFICIAL_FLAGS, TrainConfig, load_config


def _generate_args(p: argparse.ArgumentParser) -> None:
    from .generate import GenerateSettings
    p.add_argument("--model", help="diffusers pipeline: local folder or hub id (with --weights and --out, unless --config_path)")
    p.add_argument("--weights", help="tlora .safetensors file (schedule read from its header)")
    p.add_argument("--prompt", action="append", default=[], help="prompt; repeat for more")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--prompt-set", choices=["live", "object"],
                   help="the 25 DreamBooth evaluation prompts, '{0}' = '--placeholder --class'")
    p.add_argument("--placeholder", help="identifier token: '{0}' in a prompt is 'placeholder class' (default: the "
                   "weights' training placeholder, else sks)")
    p.add_argument("--class", dest="class_name", help="class word of '{0}' (default: the weights' training class)")
    p.add_argument("--negative-prompt")
    for flag, name in (("--num-images", "num_images"), ("--steps", "steps"), ("--guidance", "guidance"),
                       ("--seed", "seed"), ("--multiplier", "multiplier"), ("--height", "height"),
                       ("--width", "width"), ("--dtype", "dtype"), ("--device", "device"),
                       ("--base-precision", "base_precision"), ("--quantization-backend", "quantization_backend")):
        # None: not given (the official form refuses our flags); the schema's default applies in GenerateSettings
        add_flag(p, flag, GenerateSettings, name, default=None, dest=name)
    p.add_argument("--no-mask", action="store_true", help="adapters at full rank at every step (for comparison)")
    p.add_argument("--out", help="output folder: PNGs, grid.png, generate.json")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier generate output in --out")
    off = p.add_argument_group(
        "the official inference.py", "tlora generate --config_path RUN/logs/hparams.yml --checkpoint_idx 800 "
        "--prompts 'a {0} riding a bike#a {0} swimming': images go to <checkpoint>/samples/ns<steps>_gs<guidance>/"
        "version_<v>/<prompt>/<i>.png ({0} = placeholder class); --seed, --device and --dtype apply too")
    off.add_argument("--config_path", help="the run's logs/hparams.yml (official or tlora train with official flags)")
    off.add_argument("--checkpoint_idx", help="N of checkpoint-N (default: the run folder itself)")
    off.add_argument("--prompts", help="prompts separated by #, {0} = placeholder class")
    for flag, typ, default in OFFICIAL_INFERENCE_FLAGS:
        off.add_argument(f"--{flag}", type=typ, default=None, help=f"default {default}")
    off.add_argument("--replace_inference_output", action="store_true", help="regenerate prompts already done")


OFFICIAL_INFERENCE_FLAGS = (("num_images_per_prompt", int, 5), ("batch_size", int, 1), ("num_inference_steps", int, 25),
                            ("guidance_scale", float, 5.0), ("version", int, 0))
_OURS_ONLY = ("model", "weights", "out", "prompt", "prompts_file", "prompt_set", "negative_prompt", "num_images",
              "steps", "guidance", "height", "width", "no_mask", "quantization_backend", "overwrite", "base_precision",
              "multiplier")
GENERATE_FLAGS = ("num_images", "steps", "guidance", "seed", "multiplier", "height", "width", "dtype", "device",
                  "base_precision", "quantization_backend")


def _cmd_generate(a: argparse.Namespace) -> int:
    official = [f for f, _, _ in OFFICIAL_INFERENCE_FLAGS] + ["checkpoint_idx", "prompts", "replace_inference_output"]
    if a.config_path is not None:
        ours = [f for f in _OURS_ONLY if getattr(a, f) not in (None, [], False)]
        if ours:
            raise UsageError(f"--config_path runs the official inference; --{ours[0].replace('_', '-')} belongs to "
                             "the other form (--model --weights --out)")
        return _official_generate(a)
    given = [f for f in official if getattr(a, f) not in (None, False)]
    if given:
        raise UsageError(f"--{given[0]} is an official inference flag: it needs --config_path RUN/logs/hparams.yml")
    missing = [f for f in ("model", "weights", "out") if getattr(a, f) is None]
    if missing:
        raise UsageError(f"the following arguments are required: --{', --'.join(missing)} (or --config_path for an "
                         "official run)")
    from .evaluate import prompt_set
    from .generate import GenerateSettings, read_prompts_file, run_generate   # diffusers: loaded when it runs
    placeholder, class_name = _subject(a)
    subject = f"{placeholder} {class_name}".strip()
    prompts = [p.replace("{0}", subject) for p in                   # '{0}' as in training and the official code
               list(a.prompt) + (read_prompts_file(a.prompts_file) if a.prompts_file else [])]
    if a.prompt_set:
        prompts += prompt_set(a.prompt_set, placeholder, class_name)

    given = {k: getattr(a, k) for k in GENERATE_FLAGS if getattr(a, k) is not None}
    s = GenerateSettings(model=a.model, weights=a.weights, prompts=prompts, out=a.out,
                         negative_prompt=a.negative_prompt, mask=not a.no_mask, overwrite=a.overwrite,
                         placeholder=placeholder, **given)
    out = run_generate(s)
    print(f"wrote {out}/grid.png and {out}/generate.json")
    return 0


def _subject(a: argparse.Namespace) -> tuple:
    """(placeholder, class) of '{0}': the flags, else what the weights were trained with, else ('sks', '')."""
    trained = {}
    try:                # the header only: no tensor is read twice (generate loads them)
        from .weights import parse_header, read_metadata
        trained = parse_header(read_metadata(a.weights), a.weights).get("training", {}).get("config", {}) or {}
    except (ValueError, OSError, AttributeError, TypeError):
        pass          # a missing or unreadable file is reported by generate itself, in its one line
    placeholder = a.placeholder if a.placeholder is not None else trained.get("placeholder") or "sks"
    class_name = a.class_name if a.class_name is not None else trained.get("class_name") or ""
    return str(placeholder), str(class_name)


def _official_generate(a: argparse.Namespace) -> int:
    from .generate import DTYPES
    from .official import InferenceSettings, run_inference   # diffusers: loaded when it runs
    if a.prompts is None:
        raise UsageError("--prompts is required with --config_path (prompts separated by #, {0} = placeholder class)")
    flags = {f: getattr(a, f) for f, _, _ in OFFICIAL_INFERENCE_FLAGS if getattr(a, f) is not None}
    s = InferenceSettings(config_path=a.config_path, prompts=a.prompts, checkpoint_idx=a.checkpoint_idx,
                          replace_inference_output=a.replace_inference_output, seed=a.seed or 0,
                          device=a.device or "cpu", dtype=DTYPES[a.dtype or "fp32"], **flags)
    print(f"wrote {run_inference(s)}")
    return 0


def _convert_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("input", help="tlora, LyCORIS (algo tlora) or official T-LoRA .safetensors")
    c.add_argument("output")
    c.add_argument("--to", required=True, choices=["tlora", "lycoris", "official", "diffusers", "kohya"],
                   help="official: pytorch_lora_weights.safetensors of the official repository (UNet attention)")
    c.add_argument("--model", help="base pipeline (folder or hub id); needed to read LyCORIS files")
    add_flag(c, "--min-rank", TLoRAConfig, "min_rank", default=None, help_extra="; for files that do not store it")
    add_flag(c, "--exponent", TLoRAConfig, "exponent", default=None, help_extra="; for files that do not store it "
             "(tlora_alpha / alpha_rank_scale)")
    c.add_argument("--hparams", help="the official run's logs/hparams.yml (lora_rank, min_rank, alpha_rank_scale)")
    c.add_argument("--at-timestep", type=float, help="plain LoRA exports: the adapter truncated to r(t)")


def _cmd_convert(a: argparse.Namespace) -> int:
    from .formats import read_state, write_state
    from .generate import load_denoiser   # diffusers: loaded when it runs
    from .weights import WeightsFileError, network_from_state
    if not Path(a.input).is_file():
        raise UsageError(f"input file not found: {a.input}")
    if a.at_timestep is not None and not (0 <= a.at_timestep <= 1000):
        raise UsageError(f"--at-timestep must be in [0, T], got {a.at_timestep}")
    check_output(a.output, "output", folder=False, inputs=(a.input, a.hparams, a.model))
    model = load_denoiser(a.model) if a.model else None
    try:
        tensors, header = read_state(a.input, model, min_rank=a.min_rank, exponent=a.exponent, hparams=a.hparams)
        if model is not None:   # prove the file fits the model before writing anything
            network_from_state(model, tensors, header, a.input).remove()
            header["denoiser_config"] = header.get("denoiser_config") or dict(model.config)
        write_state(a.to, tensors, header, a.output, a.at_timestep)
    except (ValueError, WeightsFileError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {a.output} ({a.to}, {len(header['modules'])} modules)")
    return 0


def _inspect_args(i: argparse.ArgumentParser) -> None:
    i.add_argument("file")
    i.add_argument("--plot", help="write active rank vs timestep to this PNG")


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .formats import summary
    from .schedule import RankSchedule
    if a.plot:
        check_output(a.plot, "--plot", folder=False, inputs=(a.file,))
    try:
        info = summary(a.file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rows = [("file", info["file"]), ("format", info["format"]), ("variant", info.get("variant")),
            ("modules", info.get("modules"))] + [(k, info[k]) for k in ("family", "base_model", "num_train_timesteps",
                                                                         "ranks", "export") if info.get(k) is not None]
    for k, v in rows:
        print(f"{k + ':':<21}{v}")
    if info.get("schedule_known") is False:
        print("schedule: not stored in this file (min_rank 1, exponent 1 shown; pass --min-rank/--exponent to convert)")
    ts = (0, 250, 500, 750, 999)
    scheds = [RankSchedule(r, mr, float(ex), info.get("num_train_timesteps", 1000)) for r, mr, ex in info["schedules"]]
    if scheds:
        print("active rank by timestep:")
        print("  t".ljust(24) + "".join(f"{t:>6}" for t in ts))
        for s in scheds:
            print(f"  R={s.max_rank} Rmin={s.min_rank} α={s.exponent:g}".ljust(24) + "".join(f"{r:>6}" for r in s.ranks(ts)))
    if info["metadata"]:
        print("metadata:")
        for k, v in info["metadata"].items():
            print(f"  {k}: {v}")
    if a.plot:
        if not scheds:
            raise UsageError("--plot needs a file with a timestep schedule")
        _plot(scheds, a.plot)
        print(f"wrote {a.plot}")
    return 0


def _plot(scheds, path: str) -> None:
    try:
        import matplotlib   # optional (the plot extra)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (the plot extra)") from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s in scheds:
        ts = list(range(0, s.num_train_timesteps + 1, max(1, s.num_train_timesteps // 500)))
        ax.step(ts, s.ranks(ts), where="post", label=f"R={s.max_rank}, Rmin={s.min_rank}, α={s.exponent:g}")
    ax.set_xlabel("timestep t (0 = clean, T = noise)")
    ax.set_ylabel("active ranks")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), suffix=".png")
    finally:
        plt.close(fig)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="tlora JSON or SimpleTuner config.json (with lycoris_config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (nested: tlora.rank=16); repeatable")
    p.add_argument("--resume", help="latest | path to a checkpoint-N folder: continue a run (max_steps may grow)")
    p.add_argument("--overwrite", action="store_true",
                   help="train again from step 0 over a run of this config in output_dir (its checkpoints and "
                        "final weights go; nothing of another run is ever touched)")
    p.add_argument("--device", help="cpu to force the CPU")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, print the expected peak memory (tlora memory) and exit; writes nothing")
    quick = p.add_argument_group("a run without a config file (or on top of one)",
                                 "tlora train --model toyworld --image my.png --placeholder sks --class shape")
    quick.add_argument("--image", help="train on this one image (data_dir = its folder, one_image = its name)")
    for flag, name in QUICK_FLAGS.items():
        add_flag(quick, flag, TrainConfig, name, default=None, dest="quick_" + name)
    off = p.add_argument_group("official T-LoRA flags (ControlGenAI/T-LoRA train.py)")
    for flag, where in OFFICIAL_FLAGS.items():     # each flag typed and ranged by the field it sets (the schema)
        if where is None:
            off.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
        else:
            add_flag(off, f"--{flag}", *where, default=None, help_hidden=True)


QUICK_FLAGS = {"--model": "model", "--placeholder": "placeholder", "--class": "class_name", "--steps": "max_steps",
               "--out": "output_dir"}


def _check_train(a: argparse.Namespace) -> None:
    """The run's config from every source (file, official flags, quick flags, --set), checked: ``a.cfg``."""
    official = {k: getattr(a, k) for k in OFFICIAL_FLAGS if getattr(a, k) is not None}
    if official and a.config:
        raise UsageError("give either --config or the official flags, not both")
    quick = {name: getattr(a, "quick_" + name) for name in QUICK_FLAGS.values() if getattr(a, "quick_" + name) is not None}
    if a.image is not None:
        quick.update(data_dir=str(Path(a.image).parent), one_image=Path(a.image).name)
    if quick and official:
        raise UsageError("--model, --image, --placeholder, --class, --steps and --out are tlora's own flags; with the "
                         "official flags use theirs")
    sets = [f"{k}={json.dumps(v)}" for k, v in quick.items()] + list(a.set) + \
        ([f"resume={json.dumps(a.resume)}"] if a.resume else []) + \
        ([f"device={json.dumps(a.device)}"] if a.device else []) + (["overwrite=true"] if a.overwrite else [])
    a.cfg = load_config(a.config, sets, official or None, from_flags=bool(quick))


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import TrainingError, train   # accelerate, diffusers, tensorboard: only `tlora train` needs them
    cfg = a.cfg
    if a.dry_run:
        return _print_estimate(cfg.model, cfg.tlora, cfg.resolution, cfg.batch_size, cfg.gradient_checkpointing,
                               cfg.mixed_precision, cfg.base_precision, cfg.quantization_backend, cfg.optimizer)
    try:
        final = train(cfg)
    except TrainingError as e:
        print(f"tlora train: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {final}")
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from .evaluate import DEFAULT_CLIP, DEFAULT_DINO, PROMPT_SETS
    p.add_argument("--images", required=True, help="folder of images, or a tlora generate output / generate.json")
    p.add_argument("--reference", required=True, help="reference image or folder (the concept's photos)")
    p.add_argument("--prompts", nargs="+", help="prompt(s) of a plain folder: one for all images or one per image")
    p.add_argument("--placeholder", default="sks", help="token removed from prompts for TS")
    p.add_argument("--class", dest="class_name", default="", help="class word (fills {0} with --prompt-set)")
    p.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), help="print the DreamBooth prompt set and exit")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP model folder or hub id (default {DEFAULT_CLIP})")
    p.add_argument("--dino", default=DEFAULT_DINO, help=f"DINO/DINOv2 model, or 'none' (default {DEFAULT_DINO})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="report.json")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_folder, format_table, prompt_set   # transformers' CLIP / DINO: when it runs
    if a.prompt_set:
        print("\n".join(prompt_set(a.prompt_set, a.placeholder, a.class_name)))
        return 0
    report = evaluate_folder(a.images, a.reference, a.out, a.prompts, a.placeholder, a.clip, a.dino,
                             a.batch_size, a.device)
    print(format_table(report))
    print(f"wrote {a.out}")
    return 0


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a denoiser config.json, a diffusers model folder or hub id (only "
                   "its config is read), or a shipped config: flux1-dev, sd3-medium, sdxl-base")
    add_flag(p, "--rank", TLoRAConfig, "rank", default=16)
    add_flag(p, "--min-rank", TLoRAConfig, "min_rank", default=None, help_extra="; no effect on memory; here "
             "rank / 2 when not given")
    add_flag(p, "--variant", TLoRAConfig, "variant")
    add_flag(p, "--resolution", TrainConfig, "resolution", help_extra="; here: the family's native")
    add_flag(p, "--batch", TrainConfig, "batch_size")
    p.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                   help="estimate without gradient checkpointing (default: on)")
    add_flag(p, "--mixed-precision", TrainConfig, "mixed_precision", default="bf16")
    for flag, name in (("--base-precision", "base_precision"), ("--quantization-backend", "quantization_backend"),
                       ("--optimizer", "optimizer")):
        add_flag(p, flag, TrainConfig, name)


def _cmd_memory(a: argparse.Namespace) -> int:
    min_rank = max(a.rank // 2, 1) if a.min_rank is None else a.min_rank
    tl = build(TLoRAConfig, dict(rank=a.rank, min_rank=min_rank, variant=a.variant, target_module=()), None,
               {"rank": "--rank", "min_rank": "--min-rank"})
    return _print_estimate(a.model, tl, a.resolution, a.batch, a.checkpointing, a.mixed_precision, a.base_precision,
                           a.quantization_backend, a.optimizer)


def _print_estimate(model, tl, resolution, batch, checkpointing, mixed_precision, base_precision, backend,
                    optimizer) -> int:
    from . import memory   # diffusers: loaded when it runs
    from .quantize import BasePrecision
    base = BasePrecision(base_precision, backend).resolved()
    if resolution is not None and resolution % 16:
        raise UsageError(f"resolution must be a multiple of 16 for a memory estimate, got {resolution}")
    e = memory.estimate(memory.read_denoiser_config(model), tl, resolution, batch, checkpointing, mixed_precision,
                        base, optimizer)
    label = (f"{model} ({e.family}), rank {tl.rank} {tl.variant}, {e.resolution}², batch {batch}, "
             f"checkpointing {'on' if checkpointing else 'off'}, {mixed_precision}, base {base}, {optimizer}")
    print("\n".join(memory.table([(label, e)])))
    print(f"expected peak: {e.total / 2 ** 30:.2f} GiB (tensors only; the CUDA context and allocator slack come on top)")
    return 0


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's output folder (tlora.safetensors in it)")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model repository, user-or-org/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default="Upload T-LoRA (tlora push)", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list what would be sent, with sizes and hashes; send "
                   "nothing (no token needed)")


def _cmd_push(a: argparse.Namespace) -> int:
    from . import hub
    hub.check_repo_id(a.repo_id)
    plan = hub.upload_plan(a.run_dir)
    if not a.dry_run:
        hub.token()                 # no token: one line before anything is hashed
    ops = hub.operations(plan)
    for op, (_, src) in zip(ops, plan):
        origin = "made for the upload" if isinstance(src, bytes) else show(src)
        print(f"{op.path_in_repo:<34} {op.upload_info.size:>12,} B  sha256 {op.upload_info.sha256.hex()[:12]}  "
              f"{origin}")
    if a.dry_run:
        print(f"dry run: {len(ops)} files would go to https://huggingface.co/{a.repo_id}; nothing was sent")
        return 0
    print(f"pushed {len(ops)} files: {hub.push(plan, a.repo_id, a.private, a.message)}")
    return 0


def _ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default="tlora-workspace", help="folder of the UI's uploads and runs (created; "
                   "default tlora-workspace)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "any other needs --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", help="USER:PASSWORD asked by the browser (Gradio's auth)")


def _cmd_ui(a: argparse.Namespace) -> int:
    if not 1 <= a.port <= 65535:
        raise UsageError(f"--port {a.port} must be in [1, 65535]")
    from . import ui
    ui.check_host(a.host, a.auth)                    # refused before Gradio (and torch) load
    check_output(a.workspace, "--workspace", folder=True)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("tlora ui needs Gradio: pip install -e \".[ui]\" (from the repository)") from None
    ui.serve(a.workspace, a.host, a.port, a.auth)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--steps", type=int, help="training steps per adapter (default 100, the demo's recipe)")
    p.add_argument("--rank", type=int, default=64, help="rank of both adapters (default 64; T-LoRA's Rmin is rank / 4)")
    add_flag(p, "--seed", TrainConfig, "seed", help_extra="; training and sampling (0 gives the numbers in the docs)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out (only the demo's "
                   "own files and folders go)")


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import OWN, RUNS, STEPS, run_demo   # trains two adapters: accelerate and the toy-world model
    for flag, value in (("--steps", a.steps), ("--rank", a.rank)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value} must be at least 1")
    out = check_output(a.out, "--out", folder=True)
    earlier = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if earlier and not a.overwrite:
        raise UsageError(f"--out {show(a.out)} is not empty (it holds {earlier[0]}); give another folder, or "
                         "--overwrite to replace an earlier demo there")
    if a.overwrite:
        remove_own(out, OWN)
    sheet = run_demo(out, a.steps or STEPS, a.rank, a.seed)
    print("weights:  " + ", ".join(str(Path(a.out) / r / "run" / "tlora.safetensors") for r in RUNS))
    print(f"compare:  {sheet}  (row 1: what each prompt asks; row 2: LoRA; row 3: T-LoRA; column 1: training image)")
    return 0


# name → (help, description, arguments, handler, check before the heavy imports)
COMMANDS = {
    "generate": ("sample a stock pipeline with a T-LoRA attached and masked per step", None, _generate_args,
                 _cmd_generate, None),
    "convert": ("convert between tlora, LyCORIS, official T-LoRA, diffusers and kohya files", None, _convert_args,
                _cmd_convert, None),
    "inspect": ("print a weights file's format, modules, ranks, schedule and metadata", None, _inspect_args,
                _cmd_inspect, None),
    "train": ("train a T-LoRA (tlora JSON, SimpleTuner config.json, or official flags)",
              "Train a T-LoRA. Give --config FILE (tlora or SimpleTuner JSON) with optional --set key=value, or the "
              "official repository's flags.", _train_args, _cmd_train, _check_train),
    "evaluate": ("IS, DINO-IS and TS of generated images (the paper's metrics)", None, _evaluate_args, _cmd_evaluate,
                 None),
    "memory": ("expected training memory from a model's config (meta device, no weights)",
               "Expected peak memory of one training step: frozen weights (at the base precision), adapter, "
               "gradients, optimizer state and saved activations, from the denoiser's config on the meta device; "
               "nothing is downloaded but the config, nothing allocated.", _memory_args, _cmd_memory, None),
    "settings": ("every training setting: type, range, default, SimpleTuner / LyCORIS / official names (markdown)",
                 None, lambda p: None, lambda a: print(settings_table()), None),
    "push": ("upload a finished run's weights, model card and samples to the Hugging Face Hub", None, _push_args,
             _cmd_push, None),
    "demo": ("LoRA vs T-LoRA on the embedded toy-world model (CPU, no downloads)", None, _demo_args, _cmd_demo, None),
    "ui": ("the browser UI: image → recipe → train → generate → export (Gradio, 127.0.0.1:7860)", None, _ui_args,
           _cmd_ui, None),
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``tlora`` parser. ``only``: build that subcommand's arguments alone (the others keep their name and
    help), so parsing one command imports only what its flags need; None: every subcommand."""
    parser = _Parser(prog="tlora", description="T-LoRA: timestep-dependent LoRA for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, description, add_args, func, check) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        if only is None or only == name:
            add_args(p)
        p.set_defaults(func=func, **({"check": check} if check else {}))
    return parser


# OSErrors that say the input is wrong (a path given that does not exist, cannot be read, is the wrong kind of
# thing): exit 2 like every other bad input; the rest (a full disk, an I/O error) are the machine's: exit 1
INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                errno.ENAMETOOLONG, errno.EROFS, errno.EEXIST, errno.ENOTEMPTY}


def _one_line(command: str, kind: str, message: str) -> str:
    """The one line every failure of every command ends in: control characters (a newline in a path) escaped, so
    nothing can split it."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return f"tlora {command}: {kind}: {text}"


def _resume_command(argv: List[str]) -> str:
    """The command line that continues an interrupted run: the same arguments with ``--resume latest``."""
    out, skip = ["tlora"], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith(("--resume=", "--overwrite")):
            out.append(arg)
    return shlex.join(out + ["--resume", "latest"])


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    for stream in (sys.stdout, sys.stderr):    # PYTHONIOENCODING=ascii: an α in a message is escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help (0) or a bad argument (2, its one line already printed): a code
        return e.code if isinstance(e.code, int) else 0
    say = lambda kind, msg: print(_one_line(args.command, kind, msg), file=sys.stderr)   # noqa: E731
    def note(message, category, filename, lineno, file=None, line=None):    # a warning is one readable line
        print(_one_line(args.command, "note", str(message)), file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)   # an absurd image is bad input
            warnings.filterwarnings("default", category=UserWarning, module=r"tlora(\.|$)")  # ours: always a note
            warnings.showwarning = note
            if hasattr(args, "check"):   # a command's own input (a config file) is checked before the heavy imports
                args.check(args)
            _heavy_imports()
            return int(args.func(args) or 0)
    except (UsageError, WeightsFileError) as e:     # bad input, whichever command's reader found it
        say("error", str(e))
        return 2
    except HubError as e:            # the Hub refused or could not be reached: not the input's fault
        say("failed", str(e))
        return 1
    except Interrupted as e:
        say("stopped", f"{e}; continue with: {_resume_command(argv)}")
        return 128 + e.signum
    except KeyboardInterrupt:
        say("stopped", "interrupted")
        return 130
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        say("error", f"an image is too large to read safely: {first_line(e)}")
        return 2
    except OSError as e:
        where = f": {show(e.filename)}" if e.filename else ""
        if e.errno in INPUT_ERRNOS:
            say("error", f"{e.strerror or e}{where}")
            return 2
        say("failed", f"{e.strerror or e}{where}")   # the machine, not the input: a full disk, an I/O error
        return 1
    except SafetensorError as e:    # safetensors' own error (not an OSError): a damaged file, or a write that failed
        say("error", f"safetensors: {first_line(e)}")
        return 2
    except MemoryError:
        say("failed", "out of memory (a size too large for this machine)")
        return 1
    except RuntimeError as e:        # torch's allocators: "can't allocate memory", "CUDA out of memory"
        if not any(m in str(e) for m in ("allocate", "out of memory")) or os.environ.get("TLORA_DEBUG"):
            return _internal(say, e)
        say("failed", f"out of memory: {first_line(e)}")
        return 1
    except Exception as e:           # a bug of ours: one line, the traceback only with TLORA_DEBUG=1
        return _internal(say, e)


def _heavy_imports() -> None:
    """After the arguments and a command's config are checked (a typo never waits for them), before the work:
    the quantization backends (their import notices muted), diffusers and transformers without loading bars."""
    from .processors import use_pil_image_processors
    from .quantize import import_backends
    import_backends()
    use_pil_image_processors()   # imports diffusers or transformers: their quantization backends' import notices
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()   # our own bars show progress; loading bars are noise
    transformers.utils.logging.disable_progress_bar()


def _internal(say, e: Exception) -> int:
    if os.environ.get("TLORA_DEBUG"):
        raise e
    say("failed", f"{type(e).__name__}: {first_line(e)} (an internal error: set TLORA_DEBUG=1 for the traceback "
                  "and please report it)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
