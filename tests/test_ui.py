"""``tlora ui``: the whole flow in a real browser (Debian's chromium driven by Playwright), the workspace's runs
as detached ``tlora train`` processes, and bad input in every field: a clear message, nothing started or written."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import free_port
from tlora.errors import UsageError
from tlora.runs import Workspace, state

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TOY = {"model": "toyworld", "placeholder": "sks", "class_name": "shape", "max_steps": 80, "checkpointing_steps": 40,
       "num_validation_images": 1, "validation_steps": 40, "learning_rate": 3e-3,
       "tlora": {"rank": 8, "min_rank": 2}}


def _wait(predicate, seconds=120.0, every=0.2):
    end = time.time() + seconds
    while time.time() < end:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"not within {seconds} s")


@pytest.fixture
def upload(tmp_path):
    Image.new("RGB", (80, 64), (230, 200, 40)).save(tmp_path / "star.png")
    return tmp_path / "star.png"


# -- the workspace: runs outlive the server and are found again ---------------------------------------------------
def test_a_run_outlives_the_server_that_started_it_and_a_new_server_finds_it(tmp_path, upload):
    root = tmp_path / "ws"
    code = ("import sys, time, json; from tlora.runs import Workspace; ws = Workspace(sys.argv[1]); "
            "up = ws.save_upload(sys.argv[2]); print(ws.start('r1', json.loads(sys.argv[3]), up), flush=True); "
            "time.sleep(600)")
    import json
    short = {**TOY, "max_steps": 40, "checkpointing_steps": 20, "validation_steps": 20}
    server = subprocess.Popen([sys.executable, "-c", code, str(root), str(upload), json.dumps(short)],
                              stdout=subprocess.PIPE, text=True)
    pid = int(server.stdout.readline())
    server.kill()                       # the UI server dies (SIGKILL: nothing of it runs on)
    server.wait()
    server.stdout.close()
    ws = Workspace(root)                # a new server: the run is found by reading its folder
    assert _wait(lambda: state(ws.run_dir("r1")).status == "running", 60)
    assert state(ws.run_dir("r1")).pid == pid
    s = _wait(lambda: (lambda s: s if s.status == "finished" else None)(state(ws.run_dir("r1"))), 240)
    assert s.step == 40 and s.final.is_file() and [p.name for p in s.samples] == ["step-20.png", "step-40.png"]
    assert [st.name for st in ws.states()] == ["r1"]


def test_a_run_whose_process_loads_its_model_reads_as_starting_and_a_zombie_is_not_alive(tmp_path, upload):
    from tlora.train import pid_alive
    ws = Workspace(tmp_path / "ws")
    out = ws.run_dir("r")
    out.mkdir()
    (out / "train.log").write_text("tlora train: note: a note printed while the model loads\n")
    loading = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    (out / ".ui-pid").write_text(str(loading.pid))
    try:
        s = state(out)
        assert (s.status, s.pid) == ("starting", loading.pid) and ws.busy() == "r"
        with pytest.raises(UsageError, match="run r is loading its model: stop it once it trains"):
            ws.stop("r")
        with pytest.raises(UsageError, match="run r is training: one training at a time"):
            ws.start("other", TOY, ws.save_upload(upload))
    finally:
        loading.stdin.close()
        _wait(lambda: not pid_alive(loading.pid), 30)      # exited, not reaped yet (a zombie): not alive
    assert Path(f"/proc/{loading.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert state(out).status == "failed" and ws.busy() is None      # it exited and left no checkpoint
    loading.wait()
    assert not pid_alive(loading.pid) and pid_alive(os.getpid())


def test_stop_keeps_a_checkpoint_and_resume_finishes_and_queues_its_twin_again(tmp_path, upload):
    ws = Workspace(tmp_path / "ws")
    ws.start("r", {**TOY, "max_steps": 60, "checkpointing_steps": 1000, "num_validation_images": 0},
             ws.save_upload(upload), twin=True)
    _wait(lambda: state(ws.run_dir("r")).status == "running" and state(ws.run_dir("r")).step >= 5, 90)
    from tlora.ui.actions import progress
    assert re.fullmatch(r"r: running, step \d+ of 60 — about \d+ s left; LoRA twin r-lora: waiting, step 0 of 60",
                        progress(ws, "r")[0])                                  # the ETA, and the twin behind it
    with pytest.raises(UsageError, match="one training at a time"):             # starting twice
        ws.start("other", TOY, ws.save_upload(upload))
    assert not ws.run_dir("other").exists()
    ws.stop("r")
    s = _wait(lambda: (lambda s: s if s.status == "stopped" else None)(state(ws.run_dir("r"))), 90)
    assert (ws.run_dir("r") / f"checkpoint-{s.step}").is_dir() and "SIGINT" in s.log_tail
    _wait(lambda: state(ws.run_dir("r-lora")).status == "new", 30)           # the queue ended: the twin waits
    assert not (ws.run_dir("r-lora") / "train.log").exists() and ws.busy() is None
    ws.start("r", {}, None, "resume")                                           # … and is queued again
    s = _wait(lambda: (lambda s: s if s.status == "finished" else None)(state(ws.run_dir("r-lora"))), 240)
    assert s.step == 60 and state(ws.run_dir("r")).status == "finished" and state(ws.run_dir("r")).step == 60


# -- bad input: one clear message, nothing written ------------------------------------------------------------------
def _tree(p: Path):
    return sorted(str(q.relative_to(p)) for q in p.rglob("*"))


@pytest.mark.parametrize("kind", ["not an image", "20000x20000 png", "dotdot name", "negative steps",
                                  "absurd rank", "bad run name", "reserved key", "foreign image path",
                                  "class images outside the workspace", "twin of a resumed run", "symlinked run",
                                  "symlinked uploads", "too many images", "corrupted run config"])
def test_bad_input_is_a_clear_message_and_writes_nothing(tmp_path, upload, kind):
    ws = Workspace(tmp_path / "ws")
    good = ws.save_upload(upload)
    before = _tree(ws.root)
    settings, name, image, says = dict(TOY), "r", good, None
    if kind == "not an image":
        (tmp_path / "x.png").write_text("#!/bin/sh\necho not an image\n")
        with pytest.raises(UsageError, match="not an image"):
            ws.save_upload(tmp_path / "x.png")
    elif kind == "20000x20000 png":
        Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")        # a few kB on disk, 400 MP decoded
        with pytest.raises(UsageError, match="too many pixels .*400000000.*; at most 40 MP"):
            ws.save_upload(tmp_path / "huge.png")
        Image.new("1", (9000, 9000)).save(tmp_path / "big.png")           # under PIL's own limit: ours
        with pytest.raises(UsageError, match="9000×9000 px; at most 40 MP"):
            ws.save_upload(tmp_path / "big.png")
    elif kind == "dotdot name":                    # an upload's own name never becomes a path
        evil = tmp_path / "a" / ".." / "..evil.png"
        (tmp_path / "a").mkdir()
        shutil.copy(upload, tmp_path / "..evil.png")
        kept = ws.save_upload(evil)
        assert kept.parent == ws.root / "uploads" and re.fullmatch(r"[0-9a-f]{32}\.png", kept.name)
        kept.unlink()
        assert _tree(ws.root) == before
        return
    elif kind == "negative steps":
        settings["max_steps"], says = -1, "max_steps"
    elif kind == "absurd rank":
        settings["tlora"], says = {"rank": 10**9, "min_rank": 1}, "rank"
    elif kind == "bad run name":
        name, says = "../escape", "run name"
    elif kind == "reserved key":
        settings["output_dir"], says = "/etc", "output_dir"
    elif kind == "class images outside the workspace":
        settings["class_data_dir"], says = str(tmp_path), "class_data_dir must be a folder inside the workspace"
        (ws.root / "class-link").symlink_to(tmp_path)        # a link inside leading outside is outside
        before = _tree(ws.root)
        with pytest.raises(UsageError, match=re.escape(says)):
            ws.start(name, {**settings, "class_data_dir": str(ws.root / "class-link")}, image)
    elif kind in ("symlinked run", "symlinked uploads"):          # a link inside the workspace leading out of it
        outside = tmp_path / "outside"
        outside.mkdir()
        if kind == "symlinked run":
            (ws.root / "runs" / "r").symlink_to(outside)
            call = lambda: ws.start("r", settings, image)         # noqa: E731
        else:
            shutil.rmtree(ws.root / "uploads")
            (ws.root / "uploads").symlink_to(outside)
            call = lambda: ws.save_upload(upload)                 # noqa: E731
        before = _tree(ws.root)
        with pytest.raises(UsageError, match="is a symlink: the workspace reads and writes only inside itself"):
            call()
        assert list(outside.iterdir()) == [] and _tree(ws.root) == before
        return
    elif kind == "corrupted run config":
        (ws.root / "runs" / "r").mkdir()
        (ws.root / "runs" / "r" / "config.json").write_text('{"model": "toyworld", ')
        before = _tree(ws.root)
        with pytest.raises(UsageError, match="run r's config .*config.json is not valid JSON"):
            ws.start("r", {}, None, "resume")
        assert _tree(ws.root) == before
        return
    elif kind == "too many images":
        image, says = [good] * 101, "101 images: a run here trains on at most 100"
    elif kind == "twin of a resumed run":
        with pytest.raises(UsageError, match="a LoRA twin is started with a new run"):
            ws.start("r", {}, None, "resume", twin=True)
        return
    else:
        image, says = upload, "not an upload of this workspace"
    if says:
        with pytest.raises(UsageError, match=re.escape(says)):
            ws.start(name, settings, image)
    assert _tree(ws.root) == before


def test_a_non_local_host_needs_auth(capsys):
    from tlora.cli import main
    assert main(["ui", "--host", "0.0.0.0", "--workspace", "/nonexistent/ws"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tlora ui: error: --host 0.0.0.0 makes the UI reachable from other machines: give --auth USER:PASSWORD (or "
        "keep the default 127.0.0.1)"]
    assert not Path("/nonexistent/ws").exists()


def test_a_port_another_server_has_is_one_line_exit_2(tmp_path, capsys):
    import socket
    from tlora.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--workspace", str(tmp_path / "ws"), "--port", str(port)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tlora ui: error: --port {port} on 127.0.0.1 cannot be used (Address already in use): another server has "
        "it, or it needs privileges; choose another --port"]
    assert not (tmp_path / "ws").exists()                       # nothing written


# -- the whole flow in a real browser ---------------------------------------------------------------------------------
def _browser():
    """Playwright's sync API and Debian's chromium, or the test skips (fails where $TLORA_REQUIRE_BROWSER is set:
    ``.ci/run`` installs chromium and sets it)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).is_file():
        reason = "no real browser: install Debian's chromium (apt) and playwright (pip)"
        if os.environ.get("TLORA_REQUIRE_BROWSER"):
            pytest.fail(reason + " (TLORA_REQUIRE_BROWSER is set: CI must run this test)")
        pytest.skip(reason)
    return sync_playwright


def _serve(root: Path, port: int):
    server = subprocess.Popen([sys.executable, "-m", "tlora", "ui", "--workspace", str(root), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    import urllib.request

    def up():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return True
        except OSError:
            assert server.poll() is None, server.stdout.read()[-2000:]
            return False
    _wait(up, 90)
    return server


def _shot(page, name):
    folder = os.environ.get("TLORA_UI_SCREENSHOTS")      # docs/ui-*.png are made by setting it
    if folder:
        page.wait_for_timeout(1500)
        page.screenshot(path=str(Path(folder) / f"ui-{name}.png"), full_page=True)


def test_the_whole_flow_in_a_real_browser(tmp_path, upload):
    sync_playwright = _browser()
    from playwright.sync_api import expect
    root, port = tmp_path / "ws", free_port()
    server = _serve(root, port)
    url = f"http://127.0.0.1:{port}/"
    status = lambda page, what: expect(page.get_by_text(re.compile(rf"star: {what}"))).to_be_visible(  # noqa
        timeout=240_000)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            (tmp_path / "notes.png").write_text("not an image")                        # 1. a non-image …
            page.locator("input[type=file]").first.set_input_files(str(tmp_path / "notes.png"))
            expect(page.get_by_text("the upload is not an image PIL can read")).to_be_visible(timeout=30_000)
            assert list((root / "uploads").iterdir()) == []                            # … marked, not kept
            page.get_by_role("button", name="Clear").first.click()                      # removed (×)
            page.locator("input[type=file]").first.set_input_files(str(upload))       # the image
            expect(page.get_by_text("1 image at 32×32 px, as training sees them")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("training prompt: a photo of sks shape")).to_be_visible(timeout=30_000)
            _shot(page, "1-image")
            page.get_by_role("tab", name="2 · Recipe").click()                          # 2. the recipe
            expect(page.get_by_text("UNet2DConditionModel, 32 px")).to_be_visible(timeout=30_000)   # its family
            box = page.get_by_label("max_steps", exact=True)                            # a bad value …
            box.fill("-5")
            box.press("Enter")
            page.get_by_role("tab", name="3 · Train").click()
            page.get_by_role("button", name="start").click()                            # … refused, in one line
            expect(page.get_by_text("not started: fix what is marked beside max_steps (page 2)")).to_be_visible(
                timeout=30_000)
            page.get_by_role("tab", name="2 · Recipe").click()                          # … and beside the field
            expect(page.get_by_text("max_steps must be an integer >= 1 and <= 10000000, got -5")).to_be_visible(
                timeout=30_000)
            assert sorted(p.name for p in (root / "runs").iterdir()) == []              # nothing started
            for label, value in (("Rmin", "2"), ("rank R", "8"), ("max_steps", "300"), ("validate every", "100")):
                box = page.get_by_label(label, exact=True)
                box.fill(value)
                box.press("Enter")
            expect(page.get_by_text("max_steps must be an integer")).to_have_count(0, timeout=30_000)  # cleared
            page.get_by_role("button", name="estimate memory").click()
            expect(page.get_by_text("expected peak")).to_be_visible(timeout=60_000)
            expect(page.get_by_text(re.compile(r"32 px, batch 4, rank 8\); this machine has .*: fits"))).to_be_visible()
            _shot(page, "2-recipe")
            page.get_by_role("tab", name="3 · Train").click()                           # 3. train
            box = page.get_by_label("run name (a folder of the workspace)")
            box.fill("star")
            box.press("Enter")
            page.get_by_role("button", name="start").click()
            status(page, "(starting|running)")
            page.close()                                     # the browser goes away mid-run …
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)                                   # … and a new page finds the same run
            page.get_by_role("tab", name="3 · Train").click()
            status(page, "(running|finished)")
            page.get_by_role("button", name="stop").click()
            status(page, r"stopped, step \d+ of 300")
            loss = page.locator("g.mark-line path").first                              # vega's line of the loss
            expect(loss).to_have_attribute("d", re.compile(r"^M[^M]*L"), timeout=30_000)   # drawn, 2+ points
            stopped_at = int(re.search(r"star: stopped, step (\d+)", page.content()).group(1))
            drawn = loss.get_attribute("d")
            page.get_by_role("button", name="resume").click()
            status(page, "finished, step 300 of 300")
            expect(page.locator("img[src*='step-300']")).to_be_visible(timeout=30_000)
            page.wait_for_function("([el, d]) => el.getAttribute('d') !== d", arg=[loss.element_handle(), drawn],
                                   timeout=30_000)                                  # the chart went on updating
            assert 0 < stopped_at < 300 and loss.get_attribute("d").count("L") > drawn.count("L")
            _shot(page, "3-train")
            page.get_by_role("tab", name="4 · Generate").click()                        # 4. generate
            box = page.get_by_label("steps", exact=True)
            box.fill("5")
            box.press("Enter")
            page.get_by_role("button", name="generate").click()
            saved = page.locator("a[href*='image-']").last                              # the PNG, with settings
            expect(saved).to_be_visible(timeout=120_000)
            with page.expect_download() as download:
                saved.click()
            download.value.save_as(tmp_path / "generated.png")
            page.get_by_role("button", name="compare").click()                          # checkpoints × prompts
            expect(page.locator("a[href*='grid-']").last).to_be_visible(timeout=120_000)
            _shot(page, "4-generate")
            page.get_by_role("tab", name="5 · Export").click()                          # 5. export
            page.get_by_role("button", name="export").click()
            link = page.locator("a[href*='star.safetensors']").last
            expect(link).to_be_visible(timeout=60_000)
            _shot(page, "5-export")
            with page.expect_download() as download:
                link.click()
            got = tmp_path / "downloaded.safetensors"
            download.value.save_as(got)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        server.stdout.close()
    final = root / "runs" / "star" / "tlora.safetensors"
    a, b = load_file(str(got)), load_file(str(final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import tlora
    from tlora.fileio import model_path
    from tlora.generate import load_denoiser
    net = tlora.load(got, load_denoiser(model_path("toyworld")))
    assert len(net.adapters) > 0
    import json
    with Image.open(tmp_path / "generated.png") as im:
        assert im.size == (256, 256) and json.loads(im.text["tlora"]) == {
            "run": "star", "weights": "final", "prompt": "a photo of sks shape on a red background, at the bottom "
            "right", "seed": 0, "steps": 5, "guidance": 3.0, "mask": True, "strength": 1.0}
    grids = list((root / "generated" / "star").glob("grid-*.png"))
    with Image.open(grids[0]) as im:                     # 2 prompts × the final weights, labelled
        assert len(grids) == 1 and json.loads(im.text["tlora"])["weights"] == ["final"]
        assert im.width == 140 + 128 and 256 + 12 <= im.height <= 256 + 60      # label band, then 2 × 128 px


# -- the app's actions without a browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Run ``done`` (20 steps, evaluated at 10 and 20 with tiny CLIP / DINOv2 models) and its LoRA twin, finished."""
    from tlora.testing import save_clip, save_dinov2
    root = tmp_path_factory.mktemp("ui-actions")
    save_clip(root / "clip")
    save_dinov2(root / "dino")
    Image.new("RGB", (64, 64), (230, 200, 40)).save(root / "star.png")
    ws = Workspace(root / "ws")
    ws.start("done", {**TOY, "max_steps": 20, "checkpointing_steps": 10, "validation_steps": 10,
                      "eval_clip_model": str(root / "clip"), "eval_dino_model": str(root / "dino"),
                      "best_metric": "IS+TS"}, [ws.save_upload(root / "star.png")], twin=True)
    twin = state(ws.run_dir("done-lora"))                   # behind its run, on the queue process: busy meanwhile
    assert twin.status == "waiting" and ws.busy() == "done", twin
    with pytest.raises(UsageError, match="run done-lora waits for the run before it"):
        ws.stop("done-lora")
    _wait(lambda: state(ws.run_dir("done-lora")).status in ("finished", "failed"), 300)
    assert state(ws.run_dir("done")).status == "finished", state(ws.run_dir("done")).log_tail
    assert state(ws.run_dir("done-lora")).status == "finished", state(ws.run_dir("done-lora")).log_tail
    return ws


def test_every_export_reads_back_and_the_workflow_loads_the_file_with_load_t_lora(finished):
    import json
    from tlora.formats import detect_format
    from tlora.ui import actions as ui
    from tlora.weights import read
    final = load_file(str(finished.run_dir("done") / "tlora.safetensors"))
    native = ui.export(finished, "done", "tlora")
    got = load_file(str(native))
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in got)
    for fmt, kind in (("kohya", "kohya"), ("diffusers", "diffusers"), ("lycoris", "lycoris"), ("official", "official")):
        tensors, meta = read(ui.export(finished, "done", fmt))
        assert detect_format(tensors.keys(), meta) == kind, fmt
    wf = json.loads(ui.export(finished, "done", "comfyui workflow").read_text())
    loader = next(n for n in wf.values() if n["class_type"] == "Load T-LoRA")
    assert loader["inputs"]["lora_name"] == native.name and loader["inputs"]["mask"] is True
    assert wf["6"]["inputs"]["model"] == ["2", 0]                       # the sampler runs the T-LoRA'd model
    with pytest.raises(UsageError, match="export format"):
        ui.export(finished, "done", "pickle")


def _png(path):
    import json
    import numpy as np
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["tlora"]), im.text["parameters"]


def test_generate_is_seeded_masked_with_strength_and_saved_with_its_settings(finished):
    import numpy as np
    from tlora.ui import actions as ui
    args = ("done", "a photo of sks shape", 0, 3, 3.0)
    on, settings, line = _png(ui.generate(finished, *args, True))
    again, _, _ = _png(ui.generate(finished, *args, True))
    off, _, _ = _png(ui.generate(finished, *args, False))
    assert on.shape == (256, 256, 3)                                    # 32 px, enlarged 8× to be seen
    assert np.array_equal(on, again)                                    # the seed decides
    assert not np.array_equal(on, off)                                  # the mask is applied
    zero_on, _, _ = _png(ui.generate(finished, *args, True, 0.0))
    zero_off, _, _ = _png(ui.generate(finished, *args, False, 0.0))
    assert np.array_equal(zero_on, zero_off) and not np.array_equal(zero_on, on)   # strength 0: the base model
    assert settings == {"run": "done", "weights": "final", "prompt": "a photo of sks shape", "seed": 0, "steps": 3,
                        "guidance": 3.0, "mask": True, "strength": 1.0}
    assert line.startswith("run: done, weights: final, prompt: a photo of sks shape, seed: 0, steps: 3")
    step10, s10, _ = _png(ui.generate(finished, *args, True, 1.0, "step 10"))
    assert s10["weights"] == "step 10" and not np.array_equal(step10, on)
    saved = sorted((finished.root / "generated" / "done").glob("image-*.png"))
    assert len(saved) == 6
    for bad, kw, says in ((("done", "  ", 0, 3, 3.0), {}, "prompt is empty"),
                          (args, {"weights": "step 7"}, "no step 7"), (("done", "p", 0, 0, 3.0), {}, "steps must be"),
                          (args, {"strength": 99.0}, "strength must"),
                          (("done", "p", -1, 3, 3.0), {}, r"seed must be a whole number in \[0, 4294967295\], got -1"),
                          (("done", "p", 0, 2.5, 3.0), {}, "steps must be a whole number"),
                          (("done", "p", 0, 3, float("nan")), {}, "guidance must be a number in")):
        with pytest.raises(UsageError, match=says):
            ui.generate(finished, *bad, **kw)
    assert len(sorted((finished.root / "generated" / "done").glob("*.png"))) == 6          # nothing written


def test_the_comparison_grid_is_checkpoints_by_prompts_with_mask_on_and_off(finished):
    import numpy as np
    from tlora.ui import actions as ui
    assert list(ui.weight_choices(finished, "done")) == ["step 10", "step 20", "best", "final", "LoRA twin"]
    grid, settings, _ = _png(ui.compare(finished, "done", "a photo of sks shape\n\na sks shape, red", ["step 10",
                                        "final", "LoRA twin"], 0, 3, 3.0, (True, False), 1.0))
    assert settings["prompts"] == ["a photo of sks shape", "a sks shape, red"] and settings["masks"] == [True, False]
    H, W, _ = grid.shape
    left, top = W - 6 * 128, H - 2 * 128                                # label bands, then 2 rows × 6 columns
    assert left >= 140 and top > 0
    tile = lambda r, c: grid[top + r * 128: top + (r + 1) * 128: 4, left + c * 128: left + (c + 1) * 128: 4]  # noqa
    one, _, _ = _png(ui.generate(finished, "done", "a sks shape, red", 0, 3, 3.0, False, 1.0, "final"))
    assert np.array_equal(tile(1, 3), one[::8, ::8])                    # row 2, "final, mask off" = that image
    twin, _, _ = _png(ui.generate(finished, "done", "a photo of sks shape", 0, 3, 3.0, True, 1.0, "LoRA twin"))
    assert np.array_equal(tile(0, 4), twin[::8, ::8])
    assert np.array_equal(tile(0, 4), tile(0, 5))          # plain LoRA (Rmin = R): its mask changes nothing
    assert not np.array_equal(tile(0, 2), tile(0, 3))      # T-LoRA's does
    for prompts, labels, masks, says in (("", ["final"], (True,), "no prompts"), ("p", [], (True,), "none chosen"),
                                         ("p", ["step 99"], (True,), "step 99: choose among"),
                                         ("p", ["final"], (), "mask on, mask off"),
                                         ("\n".join(["p"] * 40), ["final"], (True, False), "at most 64")):
        with pytest.raises(UsageError, match=says):
            ui.compare(finished, "done", prompts, labels, 0, 3, 3.0, masks, 1.0)


def test_generated_images_and_exports_never_follow_a_symlink_out_of_the_workspace(finished, tmp_path):
    from tlora.ui import actions as ui
    outside = tmp_path / "outside"
    outside.mkdir()
    for sub in ("generated", "exports"):
        (finished.root / sub).mkdir(exist_ok=True)
        (finished.root / sub / "done-lora").symlink_to(outside)
    try:
        for call in (lambda: ui.generate(finished, "done-lora", "a photo of sks shape", 0, 2, 3.0),
                     lambda: ui.compare(finished, "done-lora", "p", ["final"], 0, 2, 3.0),
                     lambda: ui.export(finished, "done-lora", "tlora")):
            with pytest.raises(UsageError, match="is a symlink"):
                call()
        assert list(outside.iterdir()) == []
    finally:
        for sub in ("generated", "exports"):
            (finished.root / sub / "done-lora").unlink()


def test_the_lora_twin_is_the_same_recipe_as_plain_lora_trained_after_its_run(finished):
    import json
    from tlora.ui import actions as ui
    from tlora.weights import read_header
    run, twin = (json.loads((finished.run_dir(n) / "config.json").read_text()) for n in ("done", "done-lora"))
    assert twin["tlora"] == {**run["tlora"], "variant": "vanilla", "min_rank": 8, "rank": 8}
    assert {k: v for k, v in twin.items() if k not in ("tlora", "output_dir")} == \
        {k: v for k, v in run.items() if k not in ("tlora", "output_dir")}
    header = read_header(finished.run_dir("done-lora") / "tlora.safetensors")["config"]
    assert (header["variant"], header["rank"], header["min_rank"]) == ("vanilla", 8, 8)
    line, loss, lr, rank, grid, twin_grid = ui.progress(finished, "done")
    assert line == "done: finished, step 20 of 20; LoRA twin done-lora: finished, step 20 of 20"
    assert sorted(set(loss["run"])) == ["done", "done-lora"] and len(loss) == 40
    assert set(rank[rank["run"] == "done-lora"]["mean_active_rank"]) == {8.0}     # every rank at every step
    assert rank[rank["run"] == "done"]["mean_active_rank"].min() < 8
    assert grid.endswith("runs/done/samples/step-20.png") and twin_grid.endswith("runs/done-lora/samples/step-20.png")


def test_evaluation_per_checkpoint_marks_the_best(finished):
    import json
    from tlora.runs import metrics
    from tlora.ui import actions as ui
    rows = ui.evaluation_rows(finished, "done")
    m = metrics(finished.run_dir("done"))
    assert [r[0] for r in rows] == [10, 20]
    for r in rows:
        for k, v in zip(("IS", "DINO_IS", "TS"), r[1:4]):
            assert v == round(dict(m[f"eval/{k}"])[r[0]], 4)
    best = json.loads((finished.run_dir("done") / "best.json").read_text())
    assert [r[4] for r in rows] == ["★ best" if r[0] == best["step"] else "" for r in rows]
    assert best["value"] == pytest.approx(max(dict(m["eval/IS"])[s] + dict(m["eval/TS"])[s] for s in (10, 20)))
    assert ui.evaluation_rows(finished, "done-lora") == [] or len(ui.evaluation_rows(finished, "done-lora")) == 2
    assert ui.evaluation_rows(finished, "../x") == []


def test_overwrite_is_asked_explicitly_and_trains_again(finished, tmp_path):
    from tlora.ui import actions as ui
    ws = finished
    with pytest.raises(UsageError, match="exists: resume it, overwrite it"):
        ws.start("done", dict(TOY), ws.save_upload(next((ws.root / "uploads").iterdir())))
    first = (ws.run_dir("done") / "tlora.safetensors").stat().st_mtime_ns
    settings = ui.collect({"model": "toyworld", "max_steps": 20.0, "placeholder": "sks", "class_name": "shape"},
                          {"rank": 8.0, "min_rank": 2.0}, {"seed": "1"})
    assert settings["max_steps"] == 20 and settings["tlora"] == {"rank": 8, "min_rank": 2} and settings["seed"] == 1
    ws.start("done", {}, None, "overwrite")
    _wait(lambda: state(ws.run_dir("done")).status == "running" or
          (ws.run_dir("done") / "tlora.safetensors").stat().st_mtime_ns != first, 60)
    _wait(lambda: state(ws.run_dir("done")).status == "finished" and
          (ws.run_dir("done") / "tlora.safetensors").stat().st_mtime_ns != first, 240)
    with pytest.raises(UsageError, match="seed"):
        ui.collect({"model": "toyworld"}, {}, {"seed": "-3"})


def test_each_bad_field_is_named_and_nothing_is_written(tmp_path, upload):
    from tlora.ui import actions as ui
    ws = Workspace(tmp_path / "ws")
    up = [str(ws.save_upload(upload))]
    before = _tree(ws.root)
    main = {"model": "toyworld", "max_steps": 20.0, "placeholder": "sks", "class_name": "shape"}
    assert ui.form_problems(ws, "r", up, main, {"rank": 8.0, "min_rank": 2.0}, {}) == {}
    got = ui.form_problems(ws, "../r", [], {**main, "max_steps": -1.0, "learning_rate": 5.0},
                           {"rank": 8.0, "variant": "diagonal"}, {"seed": "-3", "tlora.init": "\"x\""})
    assert set(got) == {"name", "images", "max_steps", "learning_rate", "tlora.variant", "seed", "tlora.init"}
    assert got["max_steps"].startswith("max_steps must be an integer >= 1") and "'../r'" in got["name"]
    assert ui.form_problems(ws, "r", up, main, {"rank": 4.0, "min_rank": 8.0}, {}) == {
        "tlora.min_rank": "tlora.min_rank in the run's settings must be <= rank (4), got 8"}
    assert set(ui.form_problems(ws, "r" * 62, up, main, {"rank": 8.0, "min_rank": 2.0}, {}, twin=True)) == {"name"}
    assert ui.form_problems(ws, "r", up, {**main, "prompt_template": "{x} shape"}, {"rank": 8.0, "min_rank": 2.0},
                            {}) == {"prompt_template": "prompt_template '{x} shape' uses {x}: only {placeholder} and "
                                                       "{class_name} are filled in"}       # what tlora train refuses
    assert set(ui.form_problems(ws, "r", up, main, {"rank": 8.0, "min_rank": 2.0},
                                {"eval_clip_model": '"/m"', "best_metric": '"DINO_IS"'})) == {"best_metric"}
    assert set(ui.form_problems(ws, "r", up * 101, main, {"rank": 8.0, "min_rank": 2.0}, {})) == {"images"}
    assert ui.prompt_text("a photo of {placeholder} {class_name}", "sks", "") == "training prompt: a photo of sks"
    assert ui.prompt_text("{0}", "sks", "dog").startswith("no training prompt: prompt_template '{0}' uses {0}")
    with pytest.raises(ui.FormError, match="^max_steps must be"):
        ui.collect({**main, "max_steps": -1.0}, {}, {})
    assert _tree(ws.root) == before


def test_the_memory_estimate_is_the_forms_recipe_as_tlora_train_dry_run_gives_it(tmp_path, capsys):
    import json
    from tlora.cli import main as cli
    from tlora.ui import actions as ui
    form = ({"model": "sdxl-base", "batch_size": 32.0, "resolution": 1024.0}, {"rank": 64.0, "min_rank": 32.0})
    for advanced in ({"device": '"cpu"'}, {"device": '"cpu"', "gradient_checkpointing": "true",
                                           "base_precision": '"int8"', "optimizer": '"adamw8bit"'}):
        text = ui.memory_text(*form, advanced)
        settings = {**ui.collect(*form, advanced), "data_dir": str(tmp_path), "output_dir": str(tmp_path / "o")}
        (tmp_path / "c.json").write_text(json.dumps(settings))
        assert cli(["train", "--config", str(tmp_path / "c.json"), "--dry-run"]) == 0
        peak = re.search(r"expected peak: ([\d.]+) GiB", capsys.readouterr().out).group(1)
        have, where = ui.device_memory("cpu")
        assert where == "RAM" and text.startswith(f"**{peak} GiB** expected peak (sdxl, 1024 px, batch 32, rank "
                                                  f"64); this machine has {have:.1f} GiB (RAM): **")
        if float(peak) <= have * 0.9:
            assert text.endswith("**fits**")
        else:                               # what to change: only what is not so already
            todo = [] if "gradient_checkpointing" in advanced else \
                ["gradient_checkpointing true", "base_precision int8"]
            assert text.endswith(f"**does not fit: try {', '.join(todo + ['a smaller batch', 'a smaller rank'])}**")


def test_the_schedule_plot_draws_r_of_t_with_room_above_it():
    import numpy as np
    from tlora.schedule import RankSchedule
    from tlora.ui.actions import schedule_figure
    ax = schedule_figure(8, 2, 1.0).axes[0]
    line = ax.get_lines()[0]
    t = np.asarray(line.get_xdata())
    assert list(line.get_ydata()) == list(RankSchedule(8, 2, 1.0, 1000).ranks(list(t)))
    assert t[0] == 0 and t[-1] == 1000 and ax.get_ylim()[1] > 8
    assert ax.get_legend().get_texts()[0].get_text() == "R=8, Rmin=2, α=1"
    assert ax.get_title() == "r(t): active ranks by timestep"
    with pytest.raises(ValueError):
        schedule_figure(2, 8, 1.0)


def test_a_reopened_page_opens_on_the_run_training_else_the_latest(finished, tmp_path):
    import os
    from tlora.ui import actions as ui
    assert ui.current_run(Workspace(tmp_path / "empty")) == "my-run"
    os.utime(finished.run_dir("done-lora"), ns=(1, 1))
    os.utime(finished.run_dir("done"), ns=(2, 2))
    assert ui.current_run(finished) == "done"
    os.utime(finished.run_dir("done-lora"), ns=(3, 3))
    assert ui.current_run(finished) == "done-lora"


def test_several_images_train_one_run_and_each_is_shown_as_training_sees_it(tmp_path):
    import numpy as np
    from tlora.data import square
    from tlora.ui import actions as ui
    ws = Workspace(tmp_path / "ws")
    for i, size in enumerate(((80, 64), (50, 90))):
        a = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    ups = [ws.save_upload(tmp_path / f"{i}.png") for i in range(2)]
    shown, line = ui.preview(ups, "toyworld", 0)
    assert line == "2 images at 32×32 px, as training sees them" and [im.size for im in shown] == [(256, 256)] * 2
    for im, up in zip(shown, ups):
        with Image.open(up) as src:
            assert np.array_equal(np.asarray(im)[::8, ::8], np.asarray(square(src.convert("RGB"), 32)))
    assert ui.preview(ups, "toyworld", 48)[1] == "2 images at 48×48 px, as training sees them"
    assert ui.family_text("toyworld") == "family: **sd15** (UNet2DConditionModel, 32 px)"
    assert ui.family_text("sdxl-base").startswith("family: **sdxl** (UNet2DConditionModel, 1024 px)")
    assert ui.family_text("someone/some-model") == \
        "family: read from the hub when you estimate memory or start (`someone/some-model`)"
    assert "not a folder, a short name or a hub id" in ui.family_text("no such thing")
    ws.start("two", {**TOY, "max_steps": 2, "checkpointing_steps": 2, "num_validation_images": 0}, ups)
    s = _wait(lambda: (lambda s: s if s.status in ("finished", "failed") else None)(state(ws.run_dir("two"))), 120)
    assert s.status == "finished", s.log_tail
    data = ws.root / "data" / "two"
    assert sorted(p.name for p in data.iterdir()) == ["image-1.png", "image-2.png"]
    for up, copy in zip(ups, sorted(data.iterdir())):
        assert up.read_bytes() == copy.read_bytes()
