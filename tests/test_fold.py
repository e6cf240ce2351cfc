"""Sampling's fast path: the active ranks folded into the base weights (``attach(..., fold=...)``).

Folded or not, a masked sampling run gives the same images (1e-5 in fp32, bf16 rounding in bf16), including a
sampler that goes back to a noisier timestep and a batch whose samples have different timesteps; detaching
restores every weight bit for bit; the per-layer choice follows the cost rule."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import tlora
from tlora import TLoRAConfig
from tlora.testing import build_pipeline

from conftest import perturb, tiny_unet, unet_inputs
from test_attach import TARGETS



def pipeline(family, dtype, variant="ortho"):
    pipe = build_pipeline(family)
    net = tlora.inject(pipe.unet if hasattr(pipe, "unet") else pipe.transformer,
                       TLoRAConfig(rank=8, min_rank=2, variant=variant, target_module=TARGETS[family]))
    perturb(net, std=0.3)
    return pipe.to(dtype), net


def images(pipe, net, fold):
    with tlora.attach(pipe, net, fold=fold) as h:
        out = pipe(prompt="a sks dog", num_inference_steps=4, guidance_scale=2.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
        folded = [r for r in h.network.folded_ranks().values() if r is not None]
    return out, folded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_folded_sampling_equals_unmerged_sampling(family, dtype):
    """fp32: within 1e-5. bf16: within twice what bf16 itself changes (the unfolded bf16 run against fp32)."""
    pipe, net = pipeline(family, dtype)
    plain, none_folded = images(pipe, net, fold=None)
    folded, ranks = images(pipe, net, fold="always")
    assert not none_folded and ranks and set(ranks) == {tlora.active_rank(float(pipe.scheduler.timesteps[-1]), 8, 2)}
    tol = 1e-5
    if dtype != torch.float32:
        tol = 2 * np.abs(plain - images(*pipeline(family, torch.float32), fold=None)[0]).max()
    assert np.abs(folded - plain).max() <= tol
    auto, _ = images(pipe, net, fold="auto")
    assert np.abs(auto - plain).max() <= tol


def unet_world(dtype=torch.float32, variant="ortho"):
    unet = tiny_unet().to(dtype)
    net = tlora.inject(unet, TLoRAConfig(rank=8, min_rank=1, variant=variant))
    perturb(net, std=0.3)
    x, ctx = unet_inputs(b=2)
    return unet, net, x.to(dtype), ctx.to(dtype)


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_a_sampler_that_steps_back_and_per_sample_timesteps_stay_exact(variant):
    """Timesteps 999 → 500 → 800 → 200 → 600 (restarts, img2img strength, ancestral samplers go back to noisier
    steps: the rank shrinks and grows), then a batch of two different timesteps (runs unmerged, nothing folded)."""
    unet, net, x, ctx = unet_world(variant=variant)
    calls = [torch.tensor(999.0), torch.tensor(500.0), torch.tensor(800.0), torch.tensor(200.0), torch.tensor(600.0),
             torch.tensor([900.0, 100.0])]

    def run(fold):
        outs, folded = [], []
        with torch.no_grad(), tlora.attach(unet, net, fold=fold) as h:
            for t in calls:
                outs.append(unet(x, t, encoder_hidden_states=ctx).sample)
                folded.append(sorted({r for r in h.network.folded_ranks().values()}, key=str))
        return outs, folded
    plain, _ = run(None)
    fast, folded = run("always")
    for a, b in zip(plain, fast):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    assert [f[0] for f in folded[:5]] == [tlora.active_rank(float(t), 8) for t in calls[:5]]
    assert folded[5] == [None]                        # different ranks in one batch: nothing folded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_detach_leaves_every_weight_bit_identical(dtype):
    unet, net, x, ctx = unet_world(dtype)
    before = {k: v.clone() for k, v in unet.state_dict().items() if "tlora_adapter" not in k}
    with torch.no_grad(), tlora.attach(unet, net, fold="always") as h:
        for t in (999.0, 700.0, 300.0, 800.0, 0.0):
            unet(x, torch.tensor(t), encoder_hidden_states=ctx)
        assert any(r is not None for r in h.network.folded_ranks().values())
        changed = [k for k, v in unet.state_dict().items() if k in before and not torch.equal(v, before[k])]
        assert changed                                     # the weights really were folded into
    after = {k: v for k, v in unet.state_dict().items() if "tlora_adapter" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_per_layer_choice_follows_the_cost_rule():
    """Linear 48 → 64, rank 8: folding costs out·in·(Δr + 8) = 3072·(Δr + 8) (8: the pass over the weight), the
    unmerged adapter tokens·r·(in+out) = tokens·r·112. One token: unmerged wins; 4096 tokens: folding wins;
    after folding 6 ranks, 2 more cost 3072·10, not 3072·16 from scratch."""
    base = nn.Linear(48, 64)
    a = tlora.TLoRAAdapter(base, rank=8, variant="vanilla", min_rank=1)
    perturb(a)
    assert not a.fold_is_cheaper(tokens=1, r=8)            # 49152 > 1·8·112
    assert a.fold_is_cheaper(tokens=4096, r=8)             # 49152 <= 4096·8·112
    assert not a.fold_is_cheaper(tokens=54, r=8) and a.fold_is_cheaper(tokens=55, r=8)   # from scratch: 49152
    a.set_folding("auto")
    mask = torch.zeros(1, 8)
    mask[0, :6] = 1
    a.set_mask(mask)
    with torch.no_grad():
        one = base(torch.randn(1, 48))
        assert a.folded_rank is None                       # one token: the unmerged adapter ran
        many_x = torch.randn(4096, 48)
        many = base(many_x)
        assert a.folded_rank == 6                          # 4096 tokens: the weight carries ranks 0..5
        # from 6 folded ranks to 8: 3072·10 = 30720 in fp32 (incremental), not 49152 from scratch
        assert not a.fold_is_cheaper(tokens=34, r=8) and a.fold_is_cheaper(tokens=35, r=8)   # 30464 < 30720 <= 31360
    a.set_folding(None)
    assert a.folded_rank is None
    with torch.no_grad():
        ref = base(many_x)                                 # unmerged, same mask
    assert one.shape == (1, 64) and (many - ref).abs().max().item() <= 1e-5
