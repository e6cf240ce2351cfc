"""T-LoRA vs its peers, side by side in one process and one run (CPU, or CUDA with --device cuda).

    python -m benchmarks.run [--quick] [--no-full-sdxl] [--device cpu|cuda] [--out benchmarks/results.md]

1. train step (forward + backward + AdamW) on a small SDXL-like UNet, rank 64, batch 1 and 4: base model
   (no adapter, backward to the input), peft LoRA, LyCORIS tlora, tlora vanilla and ortho (per-sample masks);
2. sampling: a full stock StableDiffusionPipeline call, 25 steps, mid-size UNet (a few hundred MB):
   base, peft LoRA unmerged, peft LoRA fused, tlora attached unmerged (fold=None) and with the fast path
   (fold="auto": the active ranks folded into the weights where the cost rule says so);
3. setup: rank-64 ortho T-LoRA with base-weight SVD init injected into a full-size SDXL UNet (random weights
   from its config): tlora vs LyCORIS.

Times are medians over repeats after warm-up (CUDA: CUDA events). "Train memory" is what a step keeps alive
beyond the frozen model: on CPU, trainable parameters, their gradients and AdamW state, plus every storage
autograd saves for the backward, counted once (saved_tensors_hooks; CPU PyTorch has no allocator statistics);
on CUDA, torch.cuda.max_memory_allocated during the step minus what was allocated before it.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import device_of

R = 64
DEVICE = torch.device("cpu")        # set by --device


def timed(fn) -> float:
    """Seconds of one call of ``fn``: CUDA events on CUDA (the GPU's time), the wall clock on CPU."""
    if DEVICE.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def small_sdxl_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=(1, 2),
        cross_attention_dim=256, attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=32)


SDXL_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def setup_adapter(kind: str, unet, batch: int):
    """Returns (trainable params, context manager factory for one step)."""
    import tlora
    t = torch.tensor([999, 700, 300, 0][:batch]) if batch > 1 else torch.tensor([500])
    if kind == "base":
        return [], lambda: nullcontext()
    if kind.startswith("peft"):
        from peft import LoraConfig
        r = int(kind.split("-")[1]) if "-" in kind else R
        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
        return [p for p in unet.parameters() if p.requires_grad], lambda: nullcontext()
    if kind == "lycoris":
        from lycoris import LycorisNetwork, create_lycoris
        from lycoris.modules import tlora as lyc
        LycorisNetwork.apply_preset({"target_module": ["Attention"]})
        net = create_lycoris(unet, 1.0, linear_dim=R, linear_alpha=R, algo="tlora")
        net.apply_to()
        mask = tlora.rank_mask(t, R)                   # per-sample (B, R), as SimpleTuner passes it

        class Ctx:
            def __enter__(self):
                lyc.set_timestep_mask(mask)

            def __exit__(self, *a):
                lyc.clear_timestep_mask()
        return list(net.parameters()), Ctx
    variant = kind.split("-")[1]
    net = tlora.inject(unet, tlora.TLoRAConfig(rank=R, variant=variant, target_module=("Attention",)))
    return net.trainable_parameters(), lambda: tlora.timestep_mask(net, t)


def train_step_bench(kind: str, batch: int, repeats: int):
    unet = small_sdxl_unet().to(DEVICE)
    unet.requires_grad_(False)
    unet.train()
    params, ctx = setup_adapter(kind, unet, batch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=g).to(DEVICE).requires_grad_(kind == "base")
    c = torch.randn(batch, 16, 256, generator=g).to(DEVICE)
    t = (torch.tensor([999, 700, 300, 0][:batch]) if batch > 1 else torch.tensor([500])).to(DEVICE)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        with ctx():
            loss = unet(x, t, c).sample.square().mean()
            loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        elif x.grad is not None:
            x.grad = None
    try:
        secs = median_time(step, repeats)
    except Exception as e:  # LyCORIS fails on per-sample masks for B > 1: record it
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"}
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return {"time": secs, "mem": (torch.cuda.max_memory_allocated() - before) / 2**20}
    # activations: every storage autograd keeps for the backward, once, except the model's own weights
    weights = {t.untyped_storage().data_ptr() for t in [*unet.parameters(), *unet.buffers(), *params]}
    seen = {}

    def pack(tensor):
        st = tensor.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx():
        loss = unet(x, t, c).sample.square().mean()
    del loss
    state = sum(p.numel() * p.element_size() for p in params) * 4   # weights, grads, exp_avg, exp_avg_sq
    return {"time": secs, "mem": (sum(seen.values()) + state) / 2**20}


def mid_pipeline():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tlora.testing import clip_text, clip_tokenizer, vae
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(192, 384, 768),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=512,
        attention_head_dim=8, norm_num_groups=32).eval()
    from diffusers import EulerDiscreteScheduler
    tok = clip_tokenizer()
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_text(len(tok), 512), tokenizer=tok, unet=unet,
                                   scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                    beta_end=0.012, timestep_spacing="leading",
                                                                    steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_bench(repeats: int, steps: int = 25, size: int = 32, only=None):
    """Round-robin over the variants (one call each per round) so drift on a shared machine hits all alike.
    ``size``: image height and width in pixels (latents size/8); ``only``: the variant names to run."""
    import tlora
    from peft import LoraConfig
    pipe = mid_pipeline().to(DEVICE)
    unet = pipe.unet
    mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20

    def run():
        with torch.no_grad():
            pipe(prompt="a sks dog", num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                 generator=torch.Generator(DEVICE).manual_seed(0), output_type="latent")
    unet.add_adapter(LoraConfig(r=R, lora_alpha=R, init_lora_weights="gaussian", target_modules=PEFT_TARGETS),
                     adapter_name="peft")
    unet.disable_adapters()

    def use_peft(fused: bool):
        def on():
            unet.enable_adapters()
            if fused:
                unet.fuse_lora()

        def off():
            if fused:
                unet.unfuse_lora()
            unet.disable_adapters()
        return on, off

    def use_tlora(variant: str, min_rank: int, fold):
        state = {}

        def on():
            cfg = tlora.TLoRAConfig(rank=R, min_rank=min_rank, variant=variant, target_module=("Attention",))
            state["net"] = tlora.inject(unet, cfg, generator=torch.Generator().manual_seed(0))
            state["h"] = tlora.attach(pipe, state["net"], fold=fold)

        def off():
            state["h"].detach()
            state["net"].remove()
        return on, off
    variants = {
        "base": (lambda: None, lambda: None),
        "peft LoRA r64 unmerged": use_peft(False),
        "peft LoRA r64 fused": use_peft(True),
        **{f"tlora {v} r64, min_rank {mr}, attached{' unmerged' if fold is None else ', fast path'}":
           use_tlora(v, mr, fold) for fold in (None, "auto") for v, mr in (("vanilla", 1), ("ortho", 1), ("ortho", 32))},
    }
    variants = {k: v for k, v in variants.items() if only is None or k in only}
    times = {k: [] for k in variants}
    for rnd in range(repeats + 1):
        for k, (on, off) in variants.items():
            on()
            secs = timed(run)
            if rnd:                                       # round 0 is the warm-up
                times[k].append(secs)
            off()
    return {k: statistics.median(v) for k, v in times.items()}, mb


def setup_bench(do_lycoris: bool = True):
    from diffusers import UNet2DConditionModel

    import tlora
    torch.manual_seed(0)
    t = time.perf_counter()
    unet = UNet2DConditionModel(**SDXL_CONFIG)
    build = time.perf_counter() - t
    cfg = tlora.TLoRAConfig(rank=R, variant="ortho", init="weight", sig_type="principal", target_module=("Attention",))
    t = time.perf_counter()
    net = tlora.inject(unet, cfg)
    ours = time.perf_counter() - t
    n = len(net.adapters)
    methods = sorted({a.svd for a in net.adapters.values()})
    net.remove()
    cfg_exact = cfg.replace(svd="exact")
    t = time.perf_counter()
    net = tlora.inject(unet, cfg_exact)
    ours_exact = time.perf_counter() - t
    net.remove()
    lyc = None
    if do_lycoris:
        from lycoris import LycorisNetwork, create_lycoris
        LycorisNetwork.apply_preset({"target_module": ["Attention"]})
        gc.collect()
        t = time.perf_counter()
        create_lycoris(unet, 1.0, linear_dim=R, linear_alpha=R, algo="tlora")
        lyc = time.perf_counter() - t
    return {"modules": n, "build": build, "tlora": ours, "tlora_methods": methods, "tlora_exact": ours_exact,
            "lycoris": lyc}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()}")


def train_table(reps: int) -> list:
    kinds = ["base", "peft", "peft-128", "lycoris", "tlora-vanilla", "tlora-ortho"]
    res = {(k, b): train_step_bench(k, b, reps) for b in (1, 4) for k in kinds}
    lines = ["## Train step (forward + backward + AdamW), small SDXL-like UNet, rank 64", "",
             "| adapter | batch 1 s | batch 4 s | batch 4 train memory MB | time ÷ peft r64 (b4) | memory ÷ peft r64 (b4) |",
             "|---|---|---|---|---|---|"]
    p4 = res[("peft", 4)]
    names = {"base": "base (no adapter)", "peft": "peft LoRA r64", "peft-128": "peft LoRA r128",
             "lycoris": "LyCORIS tlora r64", "tlora-vanilla": "tlora vanilla r64", "tlora-ortho": "tlora ortho r64"}

    def cell(r, key, fmt):
        return fmt.format(r[key]) if key in r else f"fails: {r['error']}"
    for k in kinds:
        r1, r4 = res[(k, 1)], res[(k, 4)]
        ratio_t = f"{r4['time'] / p4['time']:.2f}" if "time" in r4 else "-"
        ratio_m = f"{r4['mem'] / p4['mem']:.2f}" if "mem" in r4 else "-"
        lines.append(f"| {names[k]} | {cell(r1, 'time', '{:.3f}')} | {cell(r4, 'time', '{:.3f}')} | "
                     f"{cell(r4, 'mem', '{:.0f}')} | {ratio_t} | {ratio_m} |")
    return lines


def sampling_table(reps: int, steps: int = 25, size: int = 32, only=None) -> list:
    rows, mb = sampling_bench(reps, steps, size, only)
    base, peft = rows["base"], rows["peft LoRA r64 unmerged"]
    lines = [f"## Sampling: stock StableDiffusionPipeline, {steps} steps, CFG, {size}×{size} px "
             f"({size // 8}×{size // 8} latents), UNet {mb:.0f} MB", "",
             "| run | s per image | ÷ base | ÷ peft LoRA unmerged |", "|---|---|---|---|"]
    return lines + [f"| {k} | {v:.2f} | {v / base:.2f} | {v / peft:.2f} |" for k, v in rows.items()]


def layer_bench(tokens: int, variant, fold, reps: int, width: int = 1280, steps: int = 25) -> float:
    """One SDXL-width attention projection (Linear width → width) over a 25-step sampling schedule, CFG batch 2:
    seconds for the 25 calls, the mask set per step as attach sets it."""
    import tlora
    torch.manual_seed(0)
    lin = torch.nn.Linear(width, width).to(DEVICE)
    x = torch.randn(2, tokens // 2, width, device=DEVICE)
    ts = torch.linspace(999, 0, steps).tolist()
    a = None
    if variant is not None:
        a = tlora.TLoRAAdapter(lin, rank=R, variant=variant, min_rank=1, generator=torch.Generator().manual_seed(0))
        a.set_folding(fold)

    def run():
        with torch.no_grad():
            for t in ts:
                if a is not None:
                    r = a.schedule.ranks([t])[0]
                    mask = torch.zeros(1, R, device=DEVICE)
                    mask[0, :r] = 1
                    a.set_mask(mask, shared_rank=r)
                lin(x)
        if a is not None:
            a.unfold()
    return median_time(run, reps, warmup=1)


def layer_table(reps: int) -> list:
    """Where folding pays: the sampling cost of one layer at the token counts of real images."""
    lines = ["## Sampling, one layer: Linear 1280 → 1280 (an SDXL attention projection), rank 64, 25 steps, CFG", "",
             "| tokens per call | base s | vanilla unmerged | vanilla fast path | ortho unmerged | ortho fast path |",
             "|---|---|---|---|---|---|"]
    for tokens in (32, 512, 2048, 8192):     # 32×32 px with CFG … SDXL 1024² level 2 (64×64) with CFG
        base = layer_bench(tokens, None, None, reps)
        cells = [f"{layer_bench(tokens, v, f, reps) / base:.2f}×" for v in ("vanilla", "ortho") for f in (None, "auto")]
        lines.append(f"| {tokens} | {base:.3f} | " + " | ".join(cells) + " |")
    return lines + ["", "(Ratios ÷ base. 8192 tokens = SDXL at 1024×1024, 64×64 attention level, with CFG.)"]


def setup_table() -> list:
    s = setup_bench()
    return [f"## Setup: rank-64 ortho T-LoRA, base-weight SVD init, full-size SDXL UNet ({s['modules']} layers)", "",
            "| implementation | seconds | LyCORIS ÷ this |", "|---|---|---|",
            f"| tlora (svd=auto: {', '.join(s['tlora_methods'])}) | {s['tlora']:.1f} | {s['lycoris'] / s['tlora']:.1f}× |",
            f"| tlora (svd=exact, LyCORIS-identical tensors) | {s['tlora_exact']:.1f} | {s['lycoris'] / s['tlora_exact']:.1f}× |",
            f"| LyCORIS 4.1.3 create_lycoris(algo='tlora') | {s['lycoris']:.1f} | 1.0× |",
            "", f"(Building the UNet from its config took {s['build']:.0f} s and is not counted.)"]


def main(argv=None) -> int:
    from tlora.errors import OneLineParser
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no full-size SDXL")
    ap.add_argument("--no-full-sdxl", action="store_true", help="skip the setup benchmark on full-size SDXL")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the same tables on a GPU)")
    ap.add_argument("--only", choices=["train", "sampling", "layer", "setup"], help="run one table")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = device_of(ap, a.device)
    reps = 3 if a.quick else 10
    from tlora.processors import use_pil_image_processors
    use_pil_image_processors()
    import warnings
    warnings.filterwarnings("ignore")
    flags = "".join(f" {f}" for f, on in (("--quick", a.quick), (f"--device {a.device}", a.device != "cpu"),
                                           (f"--only {a.only}", a.only)) if on)
    lines = ["# Benchmarks", "", f"Machine: {machine()}.", f"Command: `python -m benchmarks.run{flags}` "
             f"({time.strftime('%Y-%m-%d')}).", ""]
    tables = {"train": lambda: train_table(reps), "sampling": lambda: sampling_table(2 if a.quick else 5),
              "layer": lambda: layer_table(reps),
              "setup": setup_table}
    for name, make in tables.items():
        if (a.only or name) != name or (name == "setup" and not a.only and (a.quick or a.no_full_sdxl)):
            continue
        table = make()
        print("\n".join(table), flush=True)
        lines += table + [""]
    Path(a.out).write_text("\n".join(lines))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
