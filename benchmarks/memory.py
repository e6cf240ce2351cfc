"""``tlora memory``'s estimate against measured training memory, and the estimate for real models.

    python -m benchmarks.memory [--device cpu|cuda] [--out benchmarks/memory.md]

1. Tiny pipelines (tlora.tiny: SD1.5, SDXL, SD3, Flux), saved and loaded through from_pretrained with the base
   unquantized and int8 (quanto, torchao; nf4 on a GPU): one real training step (forward, backward, AdamW step) at
   64², batch 2, with the same inputs the estimate assumes. Measured on the CPU as benchmarks/run.py counts train
   memory: the real storages of the frozen weights (quantized tensors' own int8 data and scales), adapter tensors,
   gradients and optimizer state after the step, plus every storage autograd saved in the forward, once
   (saved_tensors_hooks; CPU PyTorch has no allocator statistics; gradient checkpointing off, since what a
   checkpointed block keeps is invisible to those hooks). On CUDA: torch.cuda.max_memory_allocated over the step,
   checkpointing off and on. The error is (estimate − measured) / measured.
2. The estimate for the real configs shipped with tlora (Flux.1-dev, SD3-medium, SDXL) at rank 16 and 64, 1024²,
   batch 1, gradient checkpointing on, bf16, base bf16 / int8 / nf4: the README's table.
"""
from __future__ import annotations

import tempfile
import time
import weakref
from pathlib import Path

import torch

import tlora
from tlora import memory
from tlora.config import TLoRAConfig
from tlora.families import FAMILIES, TRAINING, denoiser_of, detect
from tlora.generate import load_pipeline
from tlora.quantize import BasePrecision
from tlora.testing import build_pipeline

from . import device_of

DEVICE = torch.device("cpu")
TINY = ("sd15", "sdxl", "sd3", "flux")


def _storage_bytes(t: torch.Tensor, seen: dict) -> None:
    """Every storage under ``t`` (a quantized tensor subclass's inner tensors included), once."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        for name in inner()[0]:
            _storage_bytes(getattr(t, name), seen)
        return
    st = t.untyped_storage()
    seen[st.data_ptr()] = st.nbytes()


def measure(model_dir: str, tl: TLoRAConfig, resolution: int, batch: int, base: BasePrecision,
            checkpointing: bool = False) -> memory.Estimate:
    """One real training step of the tiny pipeline in ``model_dir``; bytes by part, as :class:`memory.Estimate`."""
    den = denoiser_of(load_pipeline(model_dir, base=base, denoiser_dtype=torch.float32))
    family = detect(den).name
    net = tlora.inject(den, tl.targets_or(FAMILIES[family].target_module), generator=torch.Generator().manual_seed(0))
    den.requires_grad_(False)
    for p in net.parameters():
        p.requires_grad_(True)
    den.to(DEVICE).train()
    if checkpointing:
        den.enable_gradient_checkpointing()
    params = net.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, cond = memory.training_inputs(den, family, batch, resolution, torch.float32, DEVICE)
    adapters = {v.untyped_storage().data_ptr() for v in net.state_dict().values()}
    frozen: dict = {}
    for v in [*den.parameters(), *den.buffers()]:
        if type(v) not in (torch.Tensor, torch.nn.Parameter) or v.untyped_storage().data_ptr() not in adapters:
            _storage_bytes(v, frozen)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    skip = {s for s in frozen} | {v.untyped_storage().data_ptr() for v in net.state_dict().values()}
    held = []

    def pack(tensor):
        h = memory.Held(tensor)
        if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.untyped_storage().data_ptr() not in skip:
            held.append((weakref.ref(h), tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        return h
    with tlora.timestep_mask(net, t * detect(den).timestep_scale), \
            torch.autograd.graph.saved_tensors_hooks(pack, memory.Held.unpack):
        loss = TRAINING[family].call(den, x, t, cond).float().square().mean()
    saved = {key: n for ref, key, n in held if ref() is not None}   # what the graph keeps for the backward
    loss.backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    adapter = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    acts = sum(saved.values())
    if DEVICE.type == "cuda":     # everything the step allocated beyond what was there: activations and temporaries
        acts = torch.cuda.max_memory_allocated() - before - grads - state
    return memory.Estimate(family, resolution, sum(frozen.values()), adapter, grads, state, acts)


def tiny_table(root: Path, resolution: int = 64, batch: int = 2) -> tuple:
    """Markdown lines comparing estimate and measurement on the tiny pipelines; and the largest |error|."""
    bases = [BasePrecision(), BasePrecision("int8", "quanto"), BasePrecision("int8", "torchao")]
    if DEVICE.type == "cuda":
        bases.append(BasePrecision("nf4"))
    ckpts = (False, True) if DEVICE.type == "cuda" else (False,)
    lines = ["| tiny model | base | checkpointing | estimate KiB | measured KiB | error | weights est / meas KiB | "
             "activations est / meas KiB |", "|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    tl = TLoRAConfig(rank=8, min_rank=2, target_module=())
    for fam in TINY:
        path = root / fam
        if not path.exists():
            build_pipeline(fam).save_pretrained(path)
        config = memory.read_denoiser_config(str(path))
        for base in bases:
            for ck in ckpts:
                est = memory.estimate(config, tl, resolution, batch, ck, "no", base)
                got = measure(str(path), tl, resolution, batch, base, ck)
                err = (est.total - got.total) / got.total
                worst = max(worst, abs(err))
                lines.append(f"| {fam} | {base} | {'on' if ck else 'off'} | {est.total / 1024:.0f} | "
                             f"{got.total / 1024:.0f} | {err:+.1%} | {est.weights / 1024:.0f} / "
                             f"{got.weights / 1024:.0f} | {est.activations / 1024:.0f} / {got.activations / 1024:.0f} |")
    return lines, worst


REAL = (("flux1-dev", "Flux.1-dev"), ("sdxl-base", "SDXL base 1.0"), ("sd3-medium", "SD3-medium"))


def real_table() -> list:
    """The README's table: estimated peak GiB of real models, 1024², batch 1, checkpointing on, bf16."""
    lines = ["| model | rank | base bf16 | base int8 | base nf4 |", "|---|---|---|---|---|"]
    for name, title in REAL:
        config = memory.read_denoiser_config(name)
        for rank in (16, 64):
            cells = []
            for base in (BasePrecision(), BasePrecision("int8"), BasePrecision("nf4")):
                e = memory.estimate(config, TLoRAConfig(rank=rank, min_rank=rank // 2, target_module=()), 1024, 1,
                                    True, "bf16", base)
                cells.append(f"{e.total / 2 ** 30:.1f}")
            lines.append(f"| {title} | {rank} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    from tlora.errors import OneLineParser
    from tlora.quantize import import_backends
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA, measured with max_memory_allocated)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("memory.md")))
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = device_of(ap, a.device)
    import_backends()
    import warnings
    warnings.filterwarnings("ignore")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tiny, worst = tiny_table(Path(tmp))
    real = real_table()
    lines = ["# Memory: estimate vs measurement", "",
             f"Command: `python -m benchmarks.memory{'' if a.device == 'cpu' else ' --device ' + a.device}` "
             f"({time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s on {DEVICE.type}).", "",
             "## Tiny pipelines: one training step at 64², batch 2, rank 8, float32", "", *tiny, "",
             f"Largest |error|: {worst:.1%}.", "",
             "## Real configs (estimate only): 1024², batch 1, gradient checkpointing on, bf16, AdamW, GiB", "",
             *real, ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
