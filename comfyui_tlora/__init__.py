"""ComfyUI custom nodes for T-LoRA (link or copy this folder into ComfyUI/custom_nodes; `pip install tlora`
into ComfyUI's Python). The nodes only declare inputs and outputs: the work is in ``tlora.comfyui``."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
