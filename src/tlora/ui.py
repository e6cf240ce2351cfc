"""``tlora ui``: one-image T-LoRA in the browser (Gradio), a thin client of the library and the CLI.

Pages: Image (the upload, as it will be trained, and its prompt) → Recipe (model, preset, the main settings, every
other setting from the settings schema, the r(t) plot, the memory estimate) → Train (start / stop / resume /
overwrite, progress, loss / lr / active-rank charts, validation grids, the runs of the workspace) → Generate
(masked sampling through ``tlora.attach``) → Export (native, kohya, diffusers, LyCORIS, official files and a
ComfyUI workflow). Training runs as a ``tlora train`` process of its own (:mod:`tlora.runs`), so the browser and
the server can go away and come back without touching it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import UsageError
from .runs import NAME, Workspace, metrics, state

NAME_OK = NAME.fullmatch

# (label, TrainConfig fields): the paper's SDXL recipe, a Flux vanilla recipe, and the demo's toy-world recipe
PRESETS = {
    "toy world (CPU, minutes)": {"model": "toyworld", "max_steps": 100, "learning_rate": 3e-3, "batch_size": 4,
                                 "tlora": {"rank": 64, "min_rank": 16, "variant": "ortho",
                                           "target_module": ["Transformer2DModel", "ResnetBlock2D"]}},
    "paper: SDXL ortho (GPU)": {"model": "stabilityai/stable-diffusion-xl-base-1.0", "max_steps": 800,
                                "learning_rate": 1e-4, "batch_size": 1,
                                "tlora": {"rank": 64, "min_rank": 32, "variant": "ortho"}},
    "Flux.1 vanilla (GPU)": {"model": "black-forest-labs/FLUX.1-dev", "max_steps": 1000, "learning_rate": 1e-4,
                             "batch_size": 1, "tlora": {"rank": 16, "min_rank": 8, "variant": "vanilla"}},
}
MAIN = ("model", "placeholder", "class_name", "prompt_template", "max_steps", "learning_rate", "batch_size",
        "resolution", "num_validation_images", "validation_steps")
MAIN_TLORA = ("rank", "min_rank", "exponent", "variant")
EXPORTS = ("tlora", "kohya", "diffusers", "lycoris", "official", "comfyui workflow")


def advanced_fields() -> List[Tuple[str, object]]:
    """(key, Spec) of every setting not on the main form: TrainConfig's, then ``tlora.``-prefixed TLoRAConfig's —
    the settings schema, not a second list."""
    from .config import TLoRAConfig
    from .settings import specs
    from .trainconfig import TrainConfig
    skip = set(MAIN) | {"tlora", "output_dir", "data_dir", "one_image", "resume", "overwrite", "official_flags"}
    return [(k, s) for k, s in specs(TrainConfig).items() if k not in skip] + \
        [(f"tlora.{k}", s) for k, s in specs(TLoRAConfig).items() if k not in MAIN_TLORA]


def collect(main: Dict, tl: Dict, advanced: Dict[str, str]) -> Dict:
    """The run's TrainConfig fields from the form: the main values, then each advanced text that differs from its
    default (parsed as ``--set`` parses it); UsageError naming the field for a bad one."""
    from .settings import SettingError
    specs = dict(advanced_fields())
    settings = {k: v for k, v in main.items() if v not in (None, "")}
    settings["tlora"] = {k: v for k, v in tl.items() if v not in (None, "")}
    for key, text in advanced.items():
        spec = specs[key]
        if text is None or text.strip() == "" or text.strip() == json.dumps(spec.default):
            continue
        try:
            value = spec.check(spec.parse_text(text.strip()))
        except SettingError as e:
            raise UsageError(f"{key}: {e}") from None
        target = settings["tlora"] if key.startswith("tlora.") else settings
        target[key.split(".", 1)[-1]] = list(value) if isinstance(value, tuple) else value
    if settings.get("resolution") == 0:
        settings.pop("resolution")                            # 0 on the form: the model's own
    for k in ("max_steps", "batch_size", "resolution", "num_validation_images", "validation_steps"):
        if isinstance(settings.get(k), float) and settings[k].is_integer():
            settings[k] = int(settings[k])                    # gr.Number gives floats
    for k in ("rank", "min_rank"):
        if isinstance(settings["tlora"].get(k), float) and settings["tlora"][k].is_integer():
            settings["tlora"][k] = int(settings["tlora"][k])
    return settings


def schedule_figure(rank: int, min_rank: int, exponent: float):
    """r(t) for t in [0, 1000] (matplotlib figure; labelled axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .schedule import RankSchedule
    s = RankSchedule(int(rank), int(min_rank), float(exponent), 1000)
    ts = list(range(0, 1001, 5))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.step(ts, s.ranks(ts), where="post", label=f"R={s.max_rank}, Rmin={s.min_rank}, α={s.exponent:g}")
    ax.set_xlabel("timestep t (0 = clean, 1000 = noise)")
    ax.set_ylabel("active ranks")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def local_resolution(model: str) -> Optional[int]:
    """A local diffusers folder's own image size (denoiser sample size × the VAE's scale, as diffusers computes
    it), read from its configs alone; None for a hub id or an unknown layout."""
    from .fileio import model_path
    root = Path(model_path(model))
    try:
        den = next(json.loads((root / d / "config.json").read_text()) for d in ("unet", "transformer")
                   if (root / d / "config.json").is_file())
        vae = json.loads((root / "vae" / "config.json").read_text())
        return int(den["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (StopIteration, OSError, ValueError, KeyError, TypeError):
        return None


def memory_text(model: str, rank: int, min_rank: int, variant: str, resolution, batch: int) -> str:
    """The expected training peak (``tlora memory``) and whether it fits this machine, with what to change."""
    from . import memory
    from .config import TLoRAConfig
    from .quantize import BasePrecision
    from .fileio import model_path
    tl = TLoRAConfig(rank=int(rank), min_rank=int(min_rank), variant=variant, target_module=())
    res = int(resolution) if resolution else local_resolution(model)
    e = memory.estimate(memory.read_denoiser_config(model_path(model)), tl, res, int(batch), False, "no",
                        BasePrecision("no").resolved(), "adamw")
    have = _device_memory()
    need = e.total / 2**30
    verdict = "fits" if need <= have * 0.9 else ("does not fit: try gradient_checkpointing, base_precision int8, "
                                                "a smaller batch or rank")
    return (f"**{need:.2f} GiB** expected peak ({e.family}, {e.resolution} px, batch {batch}, rank {rank}); this "
            f"machine has {have:.1f} GiB: **{verdict}**")


def _device_memory() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def comfyui_workflow(lora_name: str, prompt: str, checkpoint: str = "sd_xl_base_1.0.safetensors") -> Dict:
    """A ComfyUI API-format workflow: Load Checkpoint → Load T-LoRA (``lora_name`` in models/loras) → KSampler."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "Load T-LoRA", "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength": 1.0,
                                                      "mask": True}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 25, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tlora"}},
    }


def export(ws: Workspace, name: str, fmt: str) -> Path:
    """The run's final weights as ``fmt`` (a file under ``exports/``), or the ComfyUI workflow JSON for them."""
    from .fileio import write_json
    from .formats import read_state, write_state
    s = state(ws.run_dir(name))
    if s.final is None:
        raise UsageError(f"run {name} has no final weights yet ({s.status})")
    out = ws.root / "exports" / name
    if fmt == "comfyui workflow":
        cfg = json.loads((ws.run_dir(name) / "config.json").read_text())
        prompt = f"a photo of {cfg.get('placeholder', 'sks')} {cfg.get('class_name', '')}".strip()
        path = out / f"{name}-workflow-api.json"
        write_json(comfyui_workflow(f"{name}.safetensors", prompt), path)
        return path
    if fmt not in EXPORTS:
        raise UsageError(f"export format {fmt!r}: one of {', '.join(EXPORTS)}")
    model = None
    if fmt == "lycoris":
        from .generate import load_denoiser
        model = load_denoiser(_model_of(ws, name))
    tensors, header = read_state(s.final, model)
    path = out / (f"{name}.safetensors" if fmt == "tlora" else f"{name}-{fmt}.safetensors")
    write_state(fmt, tensors, header, path)
    return path


def _model_of(ws: Workspace, name: str) -> str:
    from .fileio import model_path
    return model_path(json.loads((ws.run_dir(name) / "config.json").read_text())["model"])


_PIPES: Dict[str, object] = {}


def generate(ws: Workspace, name: str, prompt: str, seed: int, steps: int, guidance: float, mask: bool = True):
    """One image of run ``name``'s final weights through ``tlora.attach`` (the pipeline is kept between calls)."""
    import torch
    from .generate import load_pipeline, native_resolution
    from .masking import attach
    s = state(ws.run_dir(name))
    if s.final is None:
        raise UsageError(f"run {name} has no final weights yet ({s.status})")
    if not prompt or not prompt.strip():
        raise UsageError("the prompt is empty")
    model = _model_of(ws, name)
    pipe = _PIPES.get(model) or _PIPES.setdefault(model, load_pipeline(model))
    res = native_resolution(pipe)
    with attach(pipe, s.final, mask=bool(mask)):
        image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), height=res, width=res,
                     generator=torch.Generator().manual_seed(int(seed))).images[0]
    k = max(1, -(-256 // max(image.size)))          # a 32 px toy image, enlarged to be seen (nearest: sharp)
    from PIL import Image
    return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST) if k > 1 else image


def run_table(ws: Workspace) -> List[List]:
    return [[s.name, s.status, f"{s.step}/{s.max_steps or '?'}", str(s.final or "")] for s in ws.states()]


CHARTS = ("loss", "lr", "mean_active_rank")


def progress(ws: Workspace, name: str):
    """(status line, a chart frame for each of :data:`CHARTS`, the latest validation grid or None) of run
    ``name``; the status line is ``<name>: <status>, step N of M``."""
    import pandas as pd
    empty = [pd.DataFrame({"step": [], c: []}) for c in CHARTS]
    if not name or not NAME_OK(name):
        return ("no run selected", *empty, None)
    s = state(ws.run_dir(name))
    m = metrics(ws.run_dir(name)) if ws.run_dir(name).is_dir() else {}
    frames = [pd.DataFrame(m.get(c, []), columns=["step", c]) for c in CHARTS]
    line = f"{name}: {s.status}, step {s.step} of {s.max_steps or '?'}"
    if s.status == "failed":
        line += f" — {s.log_tail.strip().splitlines()[-1] if s.log_tail.strip() else ''}"
    return (line, *frames, (str(s.samples[-1]) if s.samples else None))


# -- the pages ------------------------------------------------------------------------------------------------------
def _say(fn):
    """A handler whose bad input is shown next to the form (gr.Error's message), never a traceback."""
    import functools
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except (UsageError, ValueError, OSError) as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return wrapped


def _plot_or_note(gr):
    """The r(t) plot, or (while R, Rmin or α do not make a schedule) the plot as it was and a note beside it."""
    def update(rank, min_rank, exponent):
        try:
            return schedule_figure(rank, min_rank, exponent), ""
        except (ValueError, TypeError) as e:
            return gr.update(), f"no schedule: {str(e).splitlines()[0]}"
    return update


def _image_page(gr, ws: Workspace, upload_state):
    with gr.Tab("1 · Image"):
        with gr.Row():
            raw = gr.Image(type="filepath", label="your image (one is enough)", sources=["upload"])
            shown = gr.Image(label="as it will be trained (center crop, the model's resolution)", interactive=False)
        with gr.Row():
            placeholder = gr.Textbox("sks", label="placeholder token")
            class_name = gr.Textbox("shape", label="class word")
            template = gr.Textbox("a photo of {placeholder} {class_name}", label="caption template")
        prompt = gr.Markdown()

        def take(path):
            if path is None:
                return None, None
            kept = ws.save_upload(path)
            from PIL import Image
            with Image.open(kept) as im:
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                return str(kept), im.crop((left, top, left + side, top + side)).resize((256, 256))
        raw.upload(_say(take), raw, [upload_state, shown])
        show = lambda t, p, c: f"training prompt: `{t.format(placeholder=p, class_name=c)}`" if "{" in t or t else ""  # noqa
        for box in (placeholder, class_name, template):
            box.change(_say(show), [template, placeholder, class_name], prompt)
    return placeholder, class_name, template


def _recipe_page(gr):
    with gr.Tab("2 · Recipe"):
        preset = gr.Dropdown(list(PRESETS), value=list(PRESETS)[0], label="preset")
        with gr.Row():
            model = gr.Textbox("toyworld", label="model (short name, folder or hub id)")
            steps = gr.Number(100, label="max_steps", precision=0)
            lr = gr.Number(3e-3, label="learning_rate")
            batch = gr.Number(4, label="batch_size", precision=0)
            resolution = gr.Number(0, label="resolution (0: the model's own)", precision=0)
        with gr.Row():
            rank = gr.Number(64, label="rank R", precision=0)
            min_rank = gr.Number(16, label="Rmin", precision=0)
            exponent = gr.Number(1.0, label="α (exponent)")
            variant = gr.Dropdown(["ortho", "vanilla"], value="ortho", label="variant")
            val_images = gr.Number(1, label="validation images", precision=0)
            val_steps = gr.Number(50, label="validate every", precision=0)
        with gr.Row():
            with gr.Column():
                plot = gr.Plot(label="r(t): active ranks by timestep")
                plot_note = gr.Markdown()
            with gr.Column():
                mem = gr.Markdown()
                estimate = gr.Button("estimate memory")
        with gr.Accordion("advanced: every other setting (from the settings schema)", open=False):
            advanced = {k: gr.Textbox(json.dumps(s.default), label=k, info=s.help) for k, s in advanced_fields()}
        for box in (rank, min_rank, exponent):
            box.change(_plot_or_note(gr), [rank, min_rank, exponent], [plot, plot_note])

        def apply(name):
            p = PRESETS[name]
            t = p["tlora"]
            return p["model"], p["max_steps"], p["learning_rate"], p["batch_size"], t["rank"], t["min_rank"], \
                t["variant"], json.dumps(t.get("target_module", []))
        preset.change(_say(apply), preset, [model, steps, lr, batch, rank, min_rank, variant,
                                            advanced["tlora.target_module"]])
        estimate.click(_say(memory_text), [model, rank, min_rank, variant, resolution, batch], mem)
    return dict(model=model, max_steps=steps, learning_rate=lr, batch_size=batch, resolution=resolution,
                num_validation_images=val_images, validation_steps=val_steps), \
        dict(rank=rank, min_rank=min_rank, exponent=exponent, variant=variant), advanced, plot


def _train_page(gr, ws: Workspace, upload_state, form):
    main, tl, advanced, subject = form
    with gr.Tab("3 · Train"):
        with gr.Row():
            name = gr.Textbox("my-run", label="run name (a folder of the workspace)")
            overwrite = gr.Checkbox(False, label="overwrite this run's earlier training (asked explicitly)")
        with gr.Row():
            start, stop, resume = gr.Button("start", variant="primary"), gr.Button("stop"), gr.Button("resume")
        status = gr.Markdown()
        with gr.Row():
            charts = [gr.LinePlot(x="step", y=c, label=c.replace("_", " ")) for c in CHARTS]
        grid = gr.Image(label="latest validation grid (masked, labelled)", interactive=False)
        runs = gr.Dataframe(headers=["run", "status", "step", "final weights"], label="runs of this workspace",
                            interactive=False)
        keys = list(main) + list(tl) + list(advanced) + ["placeholder", "class_name", "prompt_template"]
        inputs = list(main.values()) + list(tl.values()) + list(advanced.values()) + list(subject)

        def begin(run, over, upload, *values):
            v = dict(zip(keys, values))
            m = {k: v[k] for k in list(main) + ["placeholder", "class_name", "prompt_template"]}
            settings = collect(m, {k: v[k] for k in tl}, {k: v[k] for k in advanced})
            mode = "overwrite" if over and ws.run_dir(run).exists() else "new"
            pid = ws.start(run, settings, Path(upload) if upload else None, mode)
            return f"started **{run}** (process {pid})"
        start.click(_say(begin), [name, overwrite, upload_state] + inputs, status)
        stop.click(_say(lambda run: f"stopping **{run}**: it saves a checkpoint (process {ws.stop(run)})"),
                   name, status)
        resume.click(_say(lambda run: f"resumed **{run}** (process {ws.start(run, {}, None, 'resume')})"),
                     name, status)
        seen = gr.State(None)

        def refresh(run, last):
            """Every 2 s: the page's outputs, or nothing sent when nothing changed (no redraw in the browser)."""
            shown = (*progress(ws, run), run_table(ws))
            mark = (shown[0], tuple(len(f) for f in shown[1:1 + len(CHARTS)]), shown[-2], str(shown[-1]))
            return (*([gr.skip()] * len(shown)), last) if mark == last else (*shown, mark)
        gr.Timer(2.0).tick(_say(refresh), [name, seen], [status, *charts, grid, runs, seen])
    return name


def _generate_page(gr, ws: Workspace, name):
    with gr.Tab("4 · Generate"):
        with gr.Row():
            prompt = gr.Textbox("a photo of sks shape on a red background, at the bottom right", label="prompt")
            seed = gr.Number(0, label="seed", precision=0)
            steps = gr.Number(25, label="steps", precision=0)
            guidance = gr.Number(3.0, label="guidance")
            mask = gr.Checkbox(True, label="rank mask at every step")
        go = gr.Button("generate", variant="primary")
        image = gr.Image(label="generated", format="png", interactive=False)
        go.click(_say(lambda *a: generate(ws, *a)), [name, prompt, seed, steps, guidance, mask], image)


def _export_page(gr, ws: Workspace, name):
    with gr.Tab("5 · Export"):
        fmt = gr.Dropdown(list(EXPORTS), value="tlora", label="format (tlora: for ComfyUI's Load T-LoRA node)")
        go = gr.Button("export", variant="primary")
        file = gr.File(label="download")
        go.click(_say(lambda run, f: str(export(ws, run, f))), [name, fmt], file)


def build_app(workspace) -> "object":
    """The Gradio Blocks app over ``workspace`` (a folder; created when missing)."""
    import gradio as gr
    ws = Workspace(workspace)
    with gr.Blocks(title="tlora: one-image T-LoRA") as app:
        gr.Markdown("# tlora — T-LoRA from one image\nImage → recipe → train → generate → export. Training runs as "
                    f"its own process; workspace: `{ws.root}`")
        upload = gr.State(None)
        subject = _image_page(gr, ws, upload)
        main, tl, advanced, plot = _recipe_page(gr)
        name = _train_page(gr, ws, upload, (main, tl, advanced, subject))
        _generate_page(gr, ws, name)
        _export_page(gr, ws, name)
        app.load(_say(schedule_figure), [tl["rank"], tl["min_rank"], tl["exponent"]], plot)
    app.workspace = ws
    return app


def check_host(host: str, auth: Optional[str]) -> Optional[tuple]:
    """(user, password) from ``--auth user:password``; a host other than loopback needs one."""
    local = host in ("127.0.0.1", "localhost", "::1")
    if auth is None:
        if not local:
            raise UsageError(f"--host {host} makes the UI reachable from other machines: give --auth USER:PASSWORD "
                             "(or keep the default 127.0.0.1)")
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UsageError("--auth must be USER:PASSWORD")
    return user, password


def serve(workspace, host: str = "127.0.0.1", port: int = 7860, auth: Optional[str] = None) -> None:
    """Serve the app until interrupted; the workspace's runs keep training when it stops."""
    credentials = check_host(host, auth)
    app = build_app(workspace)
    app.launch(server_name=host, server_port=port, auth=credentials, inbrowser=False, share=False,
               allowed_paths=[str(app.workspace.root)])
