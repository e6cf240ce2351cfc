"""tlora: T-LoRA, timestep-dependent LoRA for diffusion models (Soboleva et al., arXiv 2507.05964).

    net = tlora.inject(unet, tlora.TLoRAConfig(rank=64, min_rank=1))
    with tlora.timestep_mask(net, timesteps):          # training: per-sample masks, forward + backward
        loss = ...; loss.backward()
"""
from .config import TLoRAConfig
from .layers import TLoRAAdapter
from .masking import AttachHandle, attach, timestep_mask
from .network import TLoRANetwork, inject
from .schedule import RankSchedule, active_rank, active_ranks, rank_mask
from .formats import load
from .weights import save

__version__ = "0.1.0"

__all__ = [
    "TLoRAConfig", "TLoRAAdapter", "TLoRANetwork", "RankSchedule",
    "active_rank", "active_ranks", "rank_mask", "inject", "timestep_mask", "attach", "AttachHandle",
    "save", "load",
]
