"""The five pages of ``tlora ui`` (Gradio Blocks), wiring only: every value comes from :mod:`tlora.ui.actions`.

Image (the uploads as training sees them, the prompt) → Recipe (model and its family, preset, main settings, every
other setting from the settings schema, the r(t) plot, the memory estimate) → Train (start / stop / resume /
overwrite, an optional LoRA twin, progress with ETA, loss / lr / active-rank charts, validation grids, IS / DINO-IS /
TS per checkpoint with the best marked, the workspace's runs) → Generate (one image, or checkpoints × prompts grids;
mask on / off, strength; saved with their settings) → Export.

A bad value is shown beside its field (Gradio's validator, before the action runs); anything else an action refuses
is an error toast in one line. Nothing is started or written in either case.
"""
from __future__ import annotations

import functools
import json
from typing import Dict

import gradio as gr

from ..errors import UsageError
from ..runs import Workspace, check_upload
from . import actions as act


def say(fn):
    """A handler whose refusal is Gradio's error toast in one line, never a traceback."""
    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except (UsageError, ValueError, OSError) as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return wrapped


def image_page(ws: Workspace, kept):
    """Page 1; ``kept``: a gr.State of the workspace's copies of the uploads."""
    with gr.Tab("1 · Image"):
        with gr.Row():
            files = gr.File(file_count="multiple", file_types=["image"], label="your image (one is enough; a few work)")
            shown = gr.Gallery(label="as training sees them", columns=4, height=300, interactive=False)
        seen = gr.Markdown()
        with gr.Row():
            placeholder = gr.Textbox("sks", label="placeholder token")
            class_name = gr.Textbox("shape", label="class word")
            template = gr.Textbox("a photo of {placeholder} {class_name}", label="caption template")
        prompt = gr.Markdown(act.prompt_text(template.value, placeholder.value, class_name.value))

        def check(paths):
            for p in paths or []:
                try:
                    check_upload(p)
                except UsageError as e:
                    return [gr.validate(False, str(e))]
            return [gr.validate(True, "")]
        # every change (an upload, a file removed, cleared) keeps exactly the files shown
        files.change(say(lambda paths: [str(ws.save_upload(p)) for p in paths or []]), files, kept, validator=check)
        for box in (placeholder, class_name, template):
            box.change(act.prompt_text, [template, placeholder, class_name], prompt)
    return files, (shown, seen), (placeholder, class_name, template)


def recipe_page():
    with gr.Tab("2 · Recipe"):
        preset = gr.Dropdown(list(act.PRESETS), value=list(act.PRESETS)[0], label="preset")
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Textbox("toyworld", label="model (short name, folder or hub id)")
                family = gr.Markdown(act.family_text("toyworld"))
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
                plot = gr.Plot(show_label=False)              # the figure carries its title
                plot_note = gr.Markdown()
            with gr.Column():
                mem = gr.Markdown()
                estimate = gr.Button("estimate memory")
        with gr.Accordion("advanced: every other setting (from the settings schema)", open=False):
            advanced = {k: gr.Textbox(json.dumps(s.default), label=k, info=s.help) for k, s in act.advanced_fields()}
        model.change(act.family_text, model, family)

        def redraw(r, rmin, alpha):
            try:
                return act.schedule_figure(r, rmin, alpha), ""
            except (ValueError, TypeError) as e:      # the plot as it was, and why there is no new one
                return gr.update(), f"no schedule: {str(e).splitlines()[0]}"
        for box in (rank, min_rank, exponent):
            box.change(redraw, [rank, min_rank, exponent], [plot, plot_note])

        def apply(name):
            p = act.PRESETS[name]
            t = p["tlora"]
            return p["model"], p["max_steps"], p["learning_rate"], p["batch_size"], t["rank"], t["min_rank"], \
                t["variant"], json.dumps(t.get("target_module", []))
        preset.change(say(apply), preset, [model, steps, lr, batch, rank, min_rank, variant,
                                           advanced["tlora.target_module"]])
    main = dict(model=model, max_steps=steps, learning_rate=lr, batch_size=batch, resolution=resolution,
                num_validation_images=val_images, validation_steps=val_steps)
    tl = dict(rank=rank, min_rank=min_rank, exponent=exponent, variant=variant)

    def estimated(*values):
        v = dict(zip([*main, *tl, *advanced], values))
        return act.memory_text({k: v[k] for k in main}, {k: v[k] for k in tl}, {k: v[k] for k in advanced})
    estimate.click(say(estimated), [*main.values(), *tl.values(), *advanced.values()], mem)
    return main, tl, advanced, plot


def train_page(ws: Workspace, files, kept, form):
    main, tl, advanced, subject = form
    with gr.Tab("3 · Train"):
        with gr.Row():
            name = gr.Textbox("my-run", label="run name (a folder of the workspace)")
            overwrite = gr.Checkbox(False, label="overwrite: train this run again from step 0 with its saved recipe "
                                                 "(asked explicitly)")
            twin = gr.Checkbox(False, label="then a LoRA twin: the same recipe as plain LoRA (<name>-lora)")
        with gr.Row():
            start, stop, resume = gr.Button("start", variant="primary"), gr.Button("stop"), gr.Button("resume")
        status = gr.Markdown()
        with gr.Row():
            charts = [gr.LinePlot(x="step", y=c, color="run", label=c.replace("_", " ")) for c in act.CHARTS]
        with gr.Row():
            grid = gr.Image(label="latest validation grid (masked, labelled)", interactive=False)
            twin_grid = gr.Image(label="its LoRA twin's latest grid", interactive=False)
        scores = gr.Dataframe(headers=["step", "IS", "DINO-IS", "TS", "best"], interactive=False,
                              label="evaluation per checkpoint (set eval_clip_model / eval_dino_model under advanced)")
        runs = gr.Dataframe(headers=["run", "status", "step", "final weights"], label="runs of this workspace",
                            interactive=False)
    keys = ["name", "overwrite", "twin", "images", *main, *(f"tlora.{k}" for k in tl), *advanced,
            "placeholder", "class_name", "prompt_template"]
    marked = [name, overwrite, twin, files, *main.values(), *tl.values(), *advanced.values(), *subject]  # as keys
    inputs = [*marked, kept]

    def split(values):
        v = dict(zip([*keys, "uploads"], values))
        m = {k: v[k] for k in [*main, "placeholder", "class_name", "prompt_template"]}
        return v, m, {k: v[f"tlora.{k}"] for k in tl}, {k: v[k] for k in advanced}

    def begin(*values):
        """Start the run; or refuse (nothing started) in one line naming each bad field and its page."""
        v, m, t, a = split(values)
        if v["overwrite"] and act.NAME_OK(v["name"] or "") and ws.run_dir(v["name"]).exists():
            return f"started **{v['name']}** again (process {ws.start(v['name'], {}, None, 'overwrite')})"
        problems = act.form_problems(ws, v["name"], v["uploads"], m, t, a, v["twin"])
        if problems:
            raise UsageError("not started: fix what is marked beside "
                             + ", ".join(f"{k} ({act.page_of(k)})" for k in problems))
        pid = ws.start(v["name"], act.collect(m, t, a), v["uploads"], "new", bool(v["twin"]))
        return f"started **{v['name']}** (process {pid})"

    def mark(*values):
        """Each bad field's own message beside it (Gradio's validator; it runs after a refused start)."""
        v, m, t, a = split(values)
        problems = act.form_problems(ws, v["name"], v["uploads"], m, t, a, v["twin"])
        return [gr.validate(k not in problems, problems.get(k, "")) for k in keys] + [gr.validate(True, "")]
    start.click(say(begin), inputs, status).failure(lambda *values: None, inputs, None, validator=mark)
    for key, box in zip(keys, marked):
        if key not in ("overwrite", "twin", "images"):       # each field checked as it changes (marks cleared too)
            box.change(lambda v: None, box, None, validator=lambda v, k=key: [
                (lambda problem: gr.validate(not problem, problem))(act.field_problem(k, v))], queue=False)
    stop.click(say(lambda run: f"stopping **{run}**: it saves a checkpoint (process {ws.stop(run)})"), name, status)
    resume.click(say(lambda run: f"resumed **{run}** (process {ws.start(run, {}, None, 'resume')})"), name, status)

    def pick(evt: gr.SelectData):
        """A row of the runs table picks its run."""
        return evt.row_value[0] if evt.row_value else gr.skip()
    runs.select(pick, None, name)
    _refresh(ws, name, [status, *charts, grid, twin_grid, scores, runs])
    return name


def _refresh(ws: Workspace, name, outputs):
    """Every 2 s: the train page's outputs, or nothing sent when nothing changed (no redraw in the browser)."""
    seen = gr.State(None)

    def refresh(run, last):
        shown = (*act.progress(ws, run), act.evaluation_rows(ws, run), act.run_table(ws))
        mark = json.dumps([shown[0], [len(f) for f in shown[1:1 + len(act.CHARTS)]], *shown[-4:]], default=str)
        return (*([gr.skip()] * len(shown)), last) if mark == last else (*shown, mark)
    gr.Timer(2.0).tick(say(refresh), [name, seen], [*outputs, seen])


def generate_page(ws: Workspace, name):
    with gr.Tab("4 · Generate") as tab:
        with gr.Row():
            weights = gr.Dropdown(["final"], value="final", label="weights", allow_custom_value=False)
            seed = gr.Number(0, label="seed", precision=0)
            steps = gr.Number(25, label="steps", precision=0)
            guidance = gr.Number(3.0, label="guidance")
            strength = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="strength")
            mask = gr.Checkbox(True, label="rank mask at every step")
        prompt = gr.Textbox("a photo of sks shape on a red background, at the bottom right", label="prompt")
        go = gr.Button("generate", variant="primary")
        with gr.Row():
            image = gr.Image(label="generated", type="filepath", format="png", interactive=False)
            image_file = gr.File(label="download (PNG with its settings)")
        gr.Markdown("### compare: checkpoints × prompts")
        with gr.Row():
            prompts = gr.Textbox("a photo of sks shape\na photo of sks shape on a red background", lines=3,
                                 label="prompts (one per line)")
            columns = gr.CheckboxGroup(["final"], value=["final"], label="weights (columns)")
            masks = gr.CheckboxGroup(["mask on", "mask off"], value=["mask on"], label="mask")
        compare = gr.Button("compare")
        with gr.Row():
            grid = gr.Image(label="comparison grid", type="filepath", format="png", interactive=False)
            grid_file = gr.File(label="download (PNG with its settings)")

    def choices(run):
        found = list(act.weight_choices(ws, run)) or ["final"]
        return gr.update(choices=found, value="final" if "final" in found else found[-1]), \
            gr.update(choices=found, value=[c for c in ("final", "LoRA twin") if c in found] or found[-1:])
    tab.select(choices, name, [weights, columns])

    def one(run, w, p, s, n, g, st, m):
        path = str(act.generate(ws, run, p, s, n, g, m, st, w))
        return path, path

    def grid_of(run, p, cols, ms, s, n, g, st):
        path = str(act.compare(ws, run, p, cols, s, n, g, tuple(x == "mask on" for x in ms), st))
        return path, path
    go.click(say(one), [name, weights, prompt, seed, steps, guidance, strength, mask], [image, image_file])
    compare.click(say(grid_of), [name, prompts, columns, masks, seed, steps, guidance, strength], [grid, grid_file])


def export_page(ws: Workspace, name):
    with gr.Tab("5 · Export"):
        fmt = gr.Dropdown(list(act.EXPORTS), value="tlora", label="format (tlora: for ComfyUI's Load T-LoRA node)")
        go = gr.Button("export", variant="primary")
        file = gr.File(label="download")
        go.click(say(lambda run, f: str(act.export(ws, run, f))), [name, fmt], file)


def build(ws: Workspace) -> Dict:
    """The pages inside an open ``gr.Blocks``; the uploads' preview follows the model and resolution."""
    kept = gr.State([])
    files, (shown, seen), subject = image_page(ws, kept)
    main, tl, advanced, plot = recipe_page()
    name = train_page(ws, files, kept, (main, tl, advanced, subject))
    generate_page(ws, name)
    export_page(ws, name)
    look = [kept, main["model"], main["resolution"]]
    for trigger in (kept.change, main["model"].blur, main["resolution"].change):
        trigger(say(act.preview), look, [shown, seen])
    return dict(plot=plot, tl=tl, name=name)
