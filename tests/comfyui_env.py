"""Real ComfyUI for the tests: found at $COMFYUI_PATH or ../shared/ComfyUI (beside the repository), run on CPU.

``comfy()`` imports it once and returns the ``nodes`` module; where no ComfyUI exists the tests that need it
skip with the reason, unless $TLORA_REQUIRE_COMFYUI is set (``.ci/run`` sets it): then they fail.

ComfyUI's core imports ``torchvision`` for models no test builds (Cosmos). The package registry's torchvision
wheels are CUDA builds that cannot load beside the CPU torch, so — only when the real one cannot be
imported — an empty ``torchvision`` package (``torchvision.transforms`` included) is put on ``sys.path``
for this process. diffusers and transformers are imported before it: they probe for torchvision.
"""
import importlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE_PACKAGE = REPO / "comfyui_tlora"
_state = {}


def comfyui_path():
    env = os.environ.get("COMFYUI_PATH")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "ComfyUI"]:
        if (cand / "comfy" / "model_patcher.py").is_file():
            return cand
    return None


def _torchvision_or_stub():
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        sys.modules.pop("torchvision", None)
    stub = Path(tempfile.mkdtemp(prefix="tlora-tv-")) / "torchvision"
    (stub / "transforms").mkdir(parents=True)
    (stub / "__init__.py").write_text("# import-time stand-in: the real torchvision cannot load beside CPU torch\n")
    (stub / "transforms" / "__init__.py").write_text("")
    sys.path.append(str(stub.parent))


def comfyui():
    """ComfyUI's ``nodes`` module, with ``comfy`` importable and running on CPU."""
    if "nodes" in _state:
        return _state["nodes"]
    path = comfyui_path()
    if path is None:
        reason = "ComfyUI not found: set COMFYUI_PATH or put a ComfyUI checkout at ../shared/ComfyUI"
        if os.environ.get("TLORA_REQUIRE_COMFYUI"):
            pytest.fail(reason + " (TLORA_REQUIRE_COMFYUI is set: CI must run these tests)")
        pytest.skip(reason)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    _torchvision_or_stub()
    sys.path.insert(0, str(path))
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)
    finally:
        sys.argv = argv
    import nodes
    _state["nodes"] = nodes
    return nodes


def load_node_package():
    """Our node package, loaded by ComfyUI's own custom-node loader; returns its NODE_CLASS_MAPPINGS."""
    nodes = comfyui()
    if "package" not in _state:
        import asyncio
        assert asyncio.run(nodes.load_custom_node(str(NODE_PACKAGE)))
        _state["package"] = True
    return {k: nodes.NODE_CLASS_MAPPINGS[k] for k in ("Load T-LoRA", "T-LoRA schedule")}


def loras_folder(path):
    """Register ``path`` as a ComfyUI ``loras`` folder (ComfyUI's own folder_paths)."""
    comfyui()
    folder_paths = importlib.import_module("folder_paths")
    folder_paths.add_model_folder_path("loras", str(path), is_default=True)
    return folder_paths
