"""ComfyUI custom-node entry of this repository. Clone the repository into ComfyUI/custom_nodes/ (or install it
with ComfyUI-Manager or ``comfy node install``) and install ``requirements.txt`` into ComfyUI's Python: ComfyUI
loads this file, which exports the T-LoRA nodes declared in ``comfyui_tlora/``. tlora itself runs from this
clone's ``src/`` (an installed tlora of another version would not match the node declarations). Imported anywhere
else (a test runner collecting the repository), it exports no nodes."""
import os
import sys

try:
    import folder_paths  # noqa: F401  (ComfyUI's own module: there only inside a ComfyUI process)
except ImportError:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    _SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
    if "tlora" not in sys.modules and _SRC not in sys.path:
        sys.path.insert(0, _SRC)
    from .comfyui_tlora import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
