"""ComfyUI custom nodes for T-LoRA: declared here, loaded through the repository's ``__init__.py`` when the
repository is cloned into ComfyUI/custom_nodes (see docs/comfyui.md). The nodes only declare inputs and outputs:
the work is in ``tlora.comfyui``."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
