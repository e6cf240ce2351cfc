"""Real ComfyUI for the tests: found at $COMFYUI_PATH or ../shared/ComfyUI (beside the repository), run on CPU.

``comfy()`` imports it once and returns the ``nodes`` module; where no ComfyUI exists the tests that need it
skip with the reason, unless $TLORA_REQUIRE_COMFYUI is set (``.ci/run`` sets it): then they fail.

ComfyUI's core imports ``torchvision`` for models no test builds (Cosmos). The package registry's torchvision
wheels are CUDA builds that cannot load beside the CPU torch, so — only when the real one cannot be
imported — an empty ``torchvision`` package (``torchvision.transforms`` included) is put on ``sys.path``
while ComfyUI's modules are imported, and taken away after (from ``sys.path`` and ``sys.modules``), so
that no later import in this process or its workers finds it. diffusers and transformers are imported
before it: they probe for torchvision.
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


def required_comfyui_path() -> Path:
    """:func:`comfyui_path`, or the test skips with the reason (fails when $TLORA_REQUIRE_COMFYUI is set)."""
    path = comfyui_path()
    if path is None:
        reason = "ComfyUI not found: set COMFYUI_PATH or put a ComfyUI checkout at ../shared/ComfyUI"
        if os.environ.get("TLORA_REQUIRE_COMFYUI"):
            pytest.fail(reason + " (TLORA_REQUIRE_COMFYUI is set: CI must run these tests)")
        pytest.skip(reason)
    return path


def _torchvision_stub():
    """The folder of an empty torchvision package put on sys.path, or None when the real one imports."""
    try:
        import torchvision  # noqa: F401
        return None
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            sys.modules.pop(name)
    stub = Path(tempfile.mkdtemp(prefix="tlora-tv-")) / "torchvision"
    (stub / "transforms").mkdir(parents=True)
    (stub / "__init__.py").write_text("# import-time stand-in: the real torchvision cannot load beside CPU torch\n")
    (stub / "transforms" / "__init__.py").write_text("")
    sys.path.append(str(stub.parent))
    return str(stub.parent)


def _remove_stub(folder):
    if folder is None:
        return
    sys.path.remove(folder)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        sys.modules.pop(name)


def comfyui():
    """ComfyUI's ``nodes`` module, with ``comfy`` importable and running on CPU."""
    if "nodes" in _state:
        return _state["nodes"]
    path = required_comfyui_path()
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    stub = _torchvision_stub()
    sys.path.insert(0, str(path))
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)
        sys.argv = argv
        import folder_paths
        scratch = Path(tempfile.mkdtemp(prefix="tlora-comfyui-"))    # ComfyUI's input/output/temp: never the checkout
        folder_paths.set_input_directory(str(scratch / "input"))
        folder_paths.set_output_directory(str(scratch / "output"))
        folder_paths.set_temp_directory(str(scratch / "temp"))
        import comfy.sd  # noqa: F401
        import execution  # noqa: F401
        import nodes
        import asyncio
        extra = path / "comfy_extras" / "nodes_custom_sampler.py"      # BasicScheduler, loaded at ComfyUI's start
        assert asyncio.run(nodes.load_custom_node(str(extra), module_parent="comfy_extras"))
    finally:
        sys.argv = argv
        _remove_stub(stub)
    _state["nodes"] = nodes
    return nodes


def load_node_package():
    """Our node package, loaded by ComfyUI's own custom-node loader; returns our NODE_CLASS_MAPPINGS."""
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


class _Client:
    """Where ComfyUI's server would push progress to a browser; no test reads it."""
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def run_prompt(prompt, out_dir):
    """Validate and execute an API-format prompt with ComfyUI's own executor, images written under ``out_dir``.
    Returns (success, {event: data}, the executor's history result)."""
    import asyncio
    comfyui()
    folder_paths = importlib.import_module("folder_paths")
    folder_paths.set_output_directory(str(out_dir))
    folder_paths.set_temp_directory(str(out_dir / "temp"))
    execution = importlib.import_module("execution")
    valid = asyncio.run(execution.validate_prompt("tlora-test", prompt, None))
    assert valid[0], f"ComfyUI rejected the prompt: {valid[1]} {valid[3]}"
    args = importlib.import_module("comfy.cli_args").args          # the cache settings main.py passes
    executor = execution.PromptExecutor(_Client(), cache_type=execution.CacheType.NONE,
                                        cache_args={"lru": args.cache_lru, "ram": args.cache_ram})
    executor.execute(prompt, "tlora-test", {}, valid[2])
    return executor.success, dict(executor.status_messages), executor.history_result


def register_test_node(name, cls):
    """Make a test-only node class available to ComfyUI's executor (as a custom node package would)."""
    nodes = comfyui()
    nodes.NODE_CLASS_MAPPINGS[name] = cls
