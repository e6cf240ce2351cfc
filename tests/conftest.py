"""Shared test fixtures: the tiny UNet, its inputs, and moving adapters off their init."""
import pytest
import torch

from tlora import testing as tiny


def tiny_unet(cross_attention_dim=32, **kw):
    """tlora.testing's UNet (seeded), at sample size 8."""
    return tiny.unet(cross_attention_dim=cross_attention_dim, **{"sample_size": 8, **kw})


@pytest.fixture
def unet():
    return tiny_unet()


def unet_inputs(b=2, cross=32, seed=0):
    """(latents (b, 4, 8, 8), text context (b, 5, cross)) for the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, cross, generator=g)


def perturb(module, seed=1, std=0.05):
    """Move every parameter of an adapter or a network (its trainable tensors) off its init, so deltas and
    gradients are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def with_flags(argv, flags, drop=(), repeatable=("--prompt",)):
    """``argv`` with each ``--flag value`` pair of ``flags`` put in: replacing the flag's value where ``argv`` has
    it (unless the flag is repeatable), else appended; the flags in ``drop`` (with their values) removed first."""
    argv, flags = list(argv), list(flags)
    for f in drop:
        i = argv.index(f)
        del argv[i:i + 2]
    for i in range(0, len(flags), 2):
        pair = flags[i:i + 2]
        if pair[0] in argv and pair[0] not in repeatable and len(pair) == 2:
            argv[argv.index(pair[0]) + 1] = pair[1]
        else:
            argv += pair
    return argv


# the official processor's projections → the key stem it saves (save_attn_procs)
OFFICIAL = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}


def official_checkpoint(unet, variant, rank, seed=0):
    """An official-format file, as save_attn_procs writes it, with trained-looking random tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in unet.named_modules():
        if type(mod).__name__ != "Attention":
            continue
        for proj, key in OFFICIAL.items():
            lin = mod.get_submodule(proj)
            pre = f"{name}.processor.{key}_lora"
            if variant == "lora":
                sd[f"{pre}.down.weight"] = torch.randn(rank, lin.in_features, generator=g) / rank
                sd[f"{pre}.up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.05
            else:
                q0 = torch.linalg.qr(torch.randn(lin.in_features, rank, generator=g))[0].T.contiguous()
                p0 = torch.linalg.qr(torch.randn(lin.out_features, rank, generator=g))[0].contiguous()
                lam0 = torch.rand(1, rank, generator=g)
                sd[f"{pre}.base_q.weight"], sd[f"{pre}.base_p.weight"], sd[f"{pre}.base_lambda"] = q0, p0, lam0
                sd[f"{pre}.q_layer.weight"] = q0 + 0.05 * torch.randn(q0.shape, generator=g)
                sd[f"{pre}.p_layer.weight"] = p0 + 0.05 * torch.randn(p0.shape, generator=g)
                sd[f"{pre}.lambda_layer"] = lam0 * 1.3
    return sd


def tiny_world(root):
    """``root/model`` (a tiny SD1.5 pipeline, saved), ``root/data`` (two 32×32 images) and ``root/w.safetensors``
    (a rank-4 T-LoRA for it, moved off its init); returns the pipeline (adapters removed)."""
    from PIL import Image
    import tlora
    pipe = tiny.build_pipeline("sd15")
    pipe.save_pretrained(root / "model")
    (root / "data").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "data" / f"{i}.png")
    net = tlora.inject(pipe.unet, tlora.TLoRAConfig(rank=4))
    perturb(net)
    tlora.save(net, root / "w.safetensors", metadata={"family": "sd15", "base_model": "tiny"})
    net.remove()
    return pipe


SOURCE_SKIP = {".git", ".venv", "site", "build", "dist", "demo-output", "__pycache__", ".pytest_cache"}


def source_copy(dest):
    """The repository's files without its venv, caches and build outputs (what a clean clone holds) at ``dest``."""
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root, dest, ignore=lambda d, names: [n for n in names if n in SOURCE_SKIP or n.endswith(".egg-info")])
    return dest


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for servers the tests start)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
