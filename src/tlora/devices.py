"""Which device a command runs on: a name torch understands, and hardware this machine has."""
from __future__ import annotations

from typing import Optional

from .errors import UsageError


def check_device(name: Optional[str], what: str = "--device") -> Optional[str]:
    """``name`` when torch can parse it and this machine has it (``cpu``, ``cuda``, ``cuda:1``, ``mps``);
    None stays None (the library's own choice). UsageError in one line otherwise."""
    if name is None:
        return None
    import torch     # here, not at the top: a config is checked before torch is imported
    if not isinstance(name, str):
        raise UsageError(f"{what} must be a device name such as cpu or cuda, got {name!r}")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{what} {name!r} is not a device torch knows; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{what} {name}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{what} {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{what} {name}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{what} {name!r}: tlora runs on cpu, cuda or mps")
    return name
