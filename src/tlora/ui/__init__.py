"""``tlora ui``: one-image T-LoRA in the browser (Gradio), a thin client of the library and the CLI.

Training runs as a ``tlora train`` process of its own (:mod:`tlora.runs`), so the browser and the server can go away
and come back without touching it. :mod:`tlora.ui.actions` is what the app does (plain functions, no Gradio);
:mod:`tlora.ui.pages` lays it out as five pages. Gradio is imported only by :func:`build_app` and :func:`serve`.
"""
from __future__ import annotations

from typing import Optional

from ..errors import UsageError


def build_app(workspace) -> "object":
    """The Gradio Blocks app over ``workspace`` (a folder; created when missing)."""
    import gradio as gr
    from ..runs import Workspace
    from . import pages
    from .actions import current_run, schedule_figure
    ws = Workspace(workspace)
    with gr.Blocks(title="tlora: one-image T-LoRA") as app:
        gr.Markdown("# tlora — T-LoRA from one image\nImage → recipe → train → generate → export. Training runs as "
                    f"its own process; workspace: `{ws.root}`")
        parts = pages.build(ws)
        tl = parts["tl"]
        app.load(pages.say(schedule_figure), [tl["rank"], tl["min_rank"], tl["exponent"]], parts["plot"])
        app.load(lambda: current_run(ws), None, parts["name"])          # a reopened page finds its run
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


def check_port(host: str, port: int) -> None:
    """``port`` on ``host`` can be listened on now (not taken by another server, not a privileged port)."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"--port {port} on {host} cannot be used ({e.strerror or e}): another server has it, "
                             "or it needs privileges; choose another --port") from None


def serve(workspace, host: str = "127.0.0.1", port: int = 7860, auth: Optional[str] = None) -> None:
    """Serve the app until interrupted; the workspace's runs keep training when it stops."""
    credentials = check_host(host, auth)
    check_port(host, port)
    app = build_app(workspace)
    app.launch(server_name=host, server_port=port, auth=credentials, inbrowser=False, share=False,
               allowed_paths=[str(app.workspace.root)])
