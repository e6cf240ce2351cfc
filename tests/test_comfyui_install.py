"""This repository installed into real ComfyUI the way ComfyUI-Manager and the Comfy registry do it: the
repository is the node folder in ``custom_nodes/`` (its ``__init__.py`` exports the nodes), ``requirements.txt``
is installed, ``pyproject.toml`` carries the registry's ``[tool.comfy]``. ComfyUI's server is started from a copy
of the snapshot (``main.py --cpu`` on a loopback port) and asked for ``/object_info``."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from comfyui_env import required_comfyui_path as _comfyui
from conftest import free_port, source_copy

ROOT = Path(__file__).resolve().parents[1]


def test_the_requirements_a_node_install_puts_into_comfyuis_python_are_met_here():
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    assert {r.name for r in reqs} == {"pydantic", "matplotlib"}
    assert all(r.specifier.contains(metadata.version(r.name), prereleases=True) for r in reqs)


def test_comfyuis_own_parser_reads_the_registry_fields_of_pyproject():
    sys.path.insert(0, str(_comfyui()))
    try:
        from comfy_config import config_parser
        cfg = config_parser.extract_node_configuration(str(ROOT))
    finally:
        sys.path.remove(str(_comfyui()))
    assert cfg.project.name == "tlora" and cfg.project.version == metadata.version("tlora")
    assert (cfg.tool_comfy.publisher_id, cfg.tool_comfy.display_name) == ("tlora", "T-LoRA (timestep-dependent LoRA)")


def test_comfyui_started_with_the_repository_in_custom_nodes_lists_the_t_lora_nodes(tmp_path):
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(_comfyui(), comfy, ignore=shutil.ignore_patterns("__pycache__"))
    source_copy(comfy / "custom_nodes" / "tlora")       # the repository as a clone of it would be
    stub = tmp_path / "stub" / "torchvision"      # ComfyUI imports torchvision; the registry's cannot load here
    (stub / "transforms").mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "transforms" / "__init__.py").write_text("")
    (tmp_path / "frontend").mkdir()               # the web frontend package is not needed to list nodes
    (tmp_path / "frontend" / "index.html").write_text("<html></html>")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(stub.parent)}
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--disable-auto-launch", "--front-end-root", str(tmp_path / "frontend")],
                              cwd=comfy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = None
        for _ in range(600):
            if server.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                time.sleep(0.2)
        assert info is not None, (server.poll(), server.stdout.read()[-3000:] if server.poll() is not None else "")
        assert {"Load T-LoRA", "T-LoRA schedule"} <= set(info)
        assert info["Load T-LoRA"]["python_module"] == "custom_nodes.tlora"
        assert info["Load T-LoRA"]["input"]["required"]["strength"][1]["default"] == 1.0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()
