"""The browser UI's cost: a run started from the UI against the same run started from the command line, and the
CPU the UI server uses idle and while a browser page polls a training run.

    python -m benchmarks.ui [--steps 300] [--device cpu|cuda] [--out benchmarks/ui.md]

1. CLI: ``tlora train --model toyworld --image star.png --steps N`` (rank 8, batch 4, no validation), alone;
2. UI: the same recipe started through the UI's workspace (``tlora.runs``, what the Start button calls) while the
   ``tlora ui`` server runs and a headless Chromium page (Debian's, through Playwright) shows the Train page,
   whose timer asks for the run's state every 2 s;
3. the server alone for 20 s, no page open.

Steps per second come from the run's own tensorboard events (wall time of the first and last logged step), so
start-up is left out; the server's CPU time is read from /proc (user + system).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def steps_per_second(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("loss")
    return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settings(steps: int, device: str) -> dict:
    return {"model": "toyworld", "placeholder": "sks", "class_name": "shape", "max_steps": steps, "batch_size": 4,
            "checkpointing_steps": steps, "num_validation_images": 0, "learning_rate": 3e-3, "device": device,
            "tlora": {"rank": 8, "min_rank": 2}}


def cli_run(root: Path, image: Path, steps: int, device: str) -> float:
    cfg = {**settings(steps, device), "data_dir": str(image.parent), "one_image": image.name,
           "output_dir": str(root / "cli")}
    (root / "cli.json").write_text(json.dumps(cfg))
    subprocess.run([sys.executable, "-m", "tlora", "train", "--config", str(root / "cli.json")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return steps_per_second(root / "cli")


def ui_run(root: Path, image: Path, steps: int, device: str, port: int) -> tuple:
    from playwright.sync_api import sync_playwright
    from tlora.runs import Workspace, state
    server = subprocess.Popen([sys.executable, "-m", "tlora", "ui", "--workspace", str(root / "ws"), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _until(lambda: _listening(port), 90)
        time.sleep(2)
        idle0 = cpu_seconds(server.pid)
        time.sleep(20)
        idle = (cpu_seconds(server.pid) - idle0) / 20
        ws = Workspace(root / "ws")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="3 · Train").click()
            busy0, t0 = cpu_seconds(server.pid), time.time()
            ws.start("bench", settings(steps, device), ws.save_upload(image))
            _until(lambda: state(ws.run_dir("bench")).status == "finished", 3600)
            polling = (cpu_seconds(server.pid) - busy0) / (time.time() - t0)
            browser.close()
        return steps_per_second(ws.run_dir("bench")), idle, polling
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _until(predicate, seconds: float) -> None:
    end = time.time() + seconds
    while not predicate():
        if time.time() > end:
            raise TimeoutError(f"not within {seconds} s")
        time.sleep(0.5)


def main(argv=None) -> int:
    from tlora.errors import OneLineParser
    ap = OneLineParser(prog="python -m benchmarks.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).with_name("ui.md")))
    a = ap.parse_args(argv)
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        Image.new("RGB", (64, 64), (230, 200, 40)).save(root / "star.png")
        cli = cli_run(root, root / "star.png", a.steps, a.device)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ui, idle, polling = ui_run(root, root / "star.png", a.steps, a.device, port)
    lines = ["# The browser UI's cost", "", f"Command: `python -m benchmarks.ui --steps {a.steps} --device {a.device}`"
             f" ({os.cpu_count()} CPUs; toy world, rank 8, batch 4, {a.steps} steps)", "",
             "| run started from | steps / s |", "|---|---|", f"| the command line (`tlora train`) | {cli:.2f} |",
             f"| the UI (server running, a browser page polling every 2 s) | {ui:.2f} |", "",
             "| the `tlora ui` server | CPU (share of one core) |", "|---|---|",
             f"| idle, no page open (20 s) | {idle:.1%} |", f"| a page open on Train, polling a training run | "
             f"{polling:.1%} |", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
