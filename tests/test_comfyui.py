"""The ComfyUI nodes against real ComfyUI code (tests/comfyui_env.py finds it; CI must not skip these).

Every comparison is with the diffusers path: the same weights in a tiny diffusers denoiser, the same T-LoRA
file under ``tlora.attach``."""
import pytest
import torch

import tlora
from comfyui_env import comfyui, load_node_package, loras_folder
from comfyui_models import FAMILIES, bind_sdxl, comfy_output, comfy_patcher, diffusers_denoiser, diffusers_output, inputs
from conftest import perturb
from tlora.families import FAMILIES as TABLE

FLUX_MLP = (r"single_transformer_blocks\.\d+\.proj_mlp",)   # the 4h rows of the fused linear1 after q, k, v


def make_tlora(den, family, path, variant="ortho", rank=8, min_rank=2, exponent=1.0, std=0.05):
    cfg = tlora.TLoRAConfig(rank=rank, min_rank=min_rank, exponent=exponent, variant=variant,
                            target_module=TABLE[family].target_module,
                            target_name=FLUX_MLP if family == "flux" else ())
    net = tlora.inject(den, cfg, generator=torch.Generator().manual_seed(0))
    perturb(net, std=std)
    net.family = family
    tlora.save(net, path)
    net.remove()
    return path


@pytest.fixture
def loras(tmp_path):
    loras_folder(tmp_path)
    return tmp_path


def sigmas(patcher, steps=10):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)


def twin(family):
    den = diffusers_denoiser(family)
    if family == "sdxl":
        bind_sdxl(den)
    return den, comfy_patcher(family, den)


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
@pytest.mark.parametrize("family", FAMILIES)
def test_node_equals_diffusers_attach_at_every_sigma_of_a_10_step_schedule(family, variant, loras):
    from tlora.comfyui import attached
    den, base = twin(family)
    make_tlora(den, family, loras / f"{family}.safetensors", variant)
    load = load_node_package()["Load T-LoRA"]()
    (patched,) = load.load(base, f"{family}.safetensors", 1.0, True)
    tl = attached(patched)[0]
    tl.record = True
    handle = tlora.attach(den, loras / f"{family}.safetensors", record=True)
    ms = patched.get_model_object("model_sampling")
    x, cond = inputs(family)
    moved = 0.0
    for s in sigmas(patched)[:-1]:
        got = comfy_output(patched, family, x, s, cond)
        want = diffusers_output(den, family, x, s, cond, ms)
        assert (got - want).abs().max().item() < 1e-4, f"sigma {float(s)}"
        moved = max(moved, (got - comfy_output(base, family, x, s, cond)).abs().max().item())
    handle.detach()
    assert moved > 1e-3                                   # the adapter does act
    assert len(tl.steps) == 10
    sched = next(iter(tl.network.schedules()))
    for (ts, ranks), (dts, dranks) in zip(tl.steps, handle.steps):
        assert ranks[sched] == [tlora.active_rank(t, 8, 2, 1.0) for t in ts]
        assert ranks[sched] == list(dranks)
    assert [r[sched][0] for _, r in tl.steps][0] < [r[sched][0] for _, r in tl.steps][-1]   # noisy → few ranks
