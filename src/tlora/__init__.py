"""tlora: T-LoRA, timestep-dependent LoRA for diffusion models (Soboleva et al., arXiv 2507.05964).

    net = tlora.inject(unet, tlora.TLoRAConfig(rank=64, min_rank=1))
    with tlora.timestep_mask(net, timesteps):          # training: per-sample masks, forward + backward
        loss = ...; loss.backward()

The names below are imported when first used (as diffusers and transformers do), so ``import tlora`` and the
command line's argument and config checks do not wait for torch.
"""
from importlib import import_module, metadata
from typing import TYPE_CHECKING

try:                      # the one place of the version is pyproject.toml
    __version__ = metadata.version("tlora")
except metadata.PackageNotFoundError:     # running from a source tree that is not installed (a ComfyUI clone)
    __version__ = "unknown"

if TYPE_CHECKING:        # what type checkers and the API reference see; at run time __getattr__ imports them
    # ruff: noqa: F401
    from .config import TLoRAConfig
    from .formats import load
    from .layers import TLoRAAdapter
    from .masking import AttachHandle, attach, timestep_mask
    from .network import TLoRANetwork, inject
    from .schedule import RankSchedule, active_rank, active_ranks, rank_mask
    from .weights import save

# public name → the module that owns it
_OWNERS = {
    "TLoRAConfig": "config", "TLoRAAdapter": "layers", "TLoRANetwork": "network", "inject": "network",
    "RankSchedule": "schedule", "active_rank": "schedule", "active_ranks": "schedule", "rank_mask": "schedule",
    "timestep_mask": "masking", "attach": "masking", "AttachHandle": "masking", "save": "weights", "load": "formats",
}
__all__ = list(_OWNERS)


def __getattr__(name: str):
    if name in _OWNERS:
        value = getattr(import_module(f".{_OWNERS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tlora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
