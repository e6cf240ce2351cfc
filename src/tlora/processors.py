"""transformers' image processors on a machine without torchvision.

transformers 5 names ``CLIPImageProcessor`` (and the SigLIP ones) the torchvision backend; without torchvision
it falls back to the PIL class ``<Name>Pil`` on first use and logs a warning, at every ``tlora`` start, because
the diffusers pipelines import those names. :func:`use_pil_image_processors` binds the names to the PIL classes
the fallback would load anyway, before anything imports them: the same classes, no warning, and no warning
filter that could hide another one.
"""
from __future__ import annotations

import sys

PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor", "Siglip2ImageProcessor")   # what diffusers imports


def use_pil_image_processors() -> None:
    """Without torchvision, ``transformers.<Name>`` is ``<Name>Pil`` for the processors diffusers imports."""
    import transformers   # heavy: only when a command that loads models runs
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        return
    for name in PROCESSORS:
        pil = getattr(transformers, f"{name}Pil", None)
        if pil is not None:     # loading it can put a new module object in sys.modules: bind there
            setattr(sys.modules["transformers"], name, pil)
