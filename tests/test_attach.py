"""tlora.attach on tiny stock diffusers pipelines: masks at every denoising step, nothing forked."""
import numpy as np
import pytest
import torch

import tlora
from tlora import TLoRAConfig
from tlora.families import FAMILIES, detect
from tlora.testing import build_denoiser, build_pipeline

from conftest import perturb

TARGETS = {"sd15": ("Attention",), "sdxl": ("Attention",), "sd3": ("Attention",), "flux": ("FluxAttention",),
           "flux2": FAMILIES["flux2"].target_module}


def make(family, variant="ortho", min_rank=1, rank=8, multiplier=1.0):
    pipe = build_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    net = tlora.inject(den, TLoRAConfig(rank=rank, min_rank=min_rank, variant=variant, target_module=TARGETS[family],
                                        multiplier=multiplier))
    perturb(net, std=0.3)
    return pipe, den, net


def run(pipe, guidance=1.0, steps=4):
    return pipe(prompt="a sks dog", num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def manual_masking(pipe, den, net, calls_per_step=1):
    """Mask each denoiser call by hand from the scheduler's own grid (Flux.2 Klein runs CFG as two calls)."""
    orig = den.forward
    calls = iter(range(10_000))

    def forward(*a, **k):
        t = float(pipe.scheduler.timesteps[next(calls) // calls_per_step])
        with tlora.timestep_mask(net, t):
            return orig(*a, **k)
    den.forward = forward
    try:
        return run(pipe, guidance=GUIDANCE[detect(den).name])
    finally:
        del den.forward


GUIDANCE = {"sd15": 2.0, "sdxl": 2.0, "sd3": 2.0, "flux": 3.5, "flux2": 4.0}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "flux2"])
def test_attached_pipeline_masks_every_step_like_manual_masking(family):
    pipe, den, net = make(family)
    handle = tlora.attach(pipe, net, record=True, fold=None)   # exact; folding: test_fold.py
    img = run(pipe, guidance=GUIDANCE[family])
    grid = [float(t) for t in pipe.scheduler.timesteps]
    per_step = len(handle.steps) // len(grid)
    assert len(handle.steps) == per_step * len(grid) and per_step == (2 if family == "flux2" else 1)
    for (ts, ranks), t in zip(handle.steps, [t for t in grid for _ in range(per_step)]):
        assert all(v == pytest.approx(t) for v in ts)
        assert ranks == [tlora.active_rank(t, 8)] * len(ts)
    assert len({r[0] for _, r in handle.steps}) > 1             # the rank really changes over the steps
    handle.detach()
    manual = manual_masking(pipe, den, net, per_step)
    assert np.array_equal(img, manual)
    full_rank = run(pipe, guidance=GUIDANCE[family])            # detached: adapters at full rank
    assert not np.allclose(full_rank, img, atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cfg_batch_of_two_gets_one_mask_per_sample(family):
    pipe, den, net = make(family)
    with tlora.attach(pipe, net, record=True) as handle:
        run(pipe, guidance=5.0, steps=2)
    assert all(len(ts) == 2 and len(r) == 2 and r[0] == r[1] for ts, r in handle.steps)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "flux2"])
def test_min_rank_equal_rank_matches_merged_weights(family):
    pipe, den, net = make(family, min_rank=8)
    with tlora.attach(pipe, net):
        masked = run(pipe, guidance=GUIDANCE[family])
    net.merge()
    merged = run(pipe, guidance=GUIDANCE[family])
    net.unmerge()
    np.testing.assert_allclose(masked, merged, atol=2e-4)


def test_per_sample_timesteps_get_per_sample_masks():
    pipe, den, net = make("sd15")
    with tlora.attach(pipe, net, record=True) as h:
        x = torch.randn(3, 4, 16, 16)
        c = torch.randn(3, 6, 32)
        t = torch.tensor([999, 500, 10])
        out = den(x, t, c).sample
    assert h.steps[0][1] == [tlora.active_rank(v, 8) for v in (999, 500, 10)]
    with tlora.timestep_mask(net, t):
        ref = den(x, t, c).sample
    assert torch.equal(out, ref)


def test_flux2_klein_denoiser_level():
    den = build_denoiser("flux2")
    assert detect(den).name == "flux2"
    cfg = TLoRAConfig(rank=8, target_module=FAMILIES["flux2"].target_module)
    net = tlora.inject(den, cfg)
    classes = {type(m).__name__ for p, m in den.named_modules() for a in net.adapters if a.startswith(p + ".")}
    assert {"Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"} <= classes
    perturb(net, std=0.3)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 48, generator=g),
              img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(5, 4))
    sigma = torch.tensor([0.9, 0.2])
    with tlora.attach(den, net, record=True) as h:
        out = den(timestep=sigma, **kw).sample
    assert h.steps[0][1] == [tlora.active_rank(900, 8), tlora.active_rank(200, 8)]
    with tlora.timestep_mask(net, sigma * 1000):
        ref = den(timestep=sigma, **kw).sample
    assert torch.equal(out, ref)


def test_detach_leaves_pipeline_exactly_as_before(tmp_path):
    pipe, den, net = make("sd15")
    tlora.save(net, tmp_path / "w.safetensors")
    net.remove()
    before = {k: v.clone() for k, v in den.state_dict().items()}
    ref = run(pipe)
    h = tlora.attach(pipe, tmp_path / "w.safetensors", multiplier=0.5)
    assert h.network.multiplier == 0.5
    assert not np.array_equal(run(pipe), ref)
    h.detach()
    after = den.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not den._forward_pre_hooks and not den._forward_hooks
    assert np.array_equal(run(pipe), ref)


def test_attach_file_for_other_denoiser_is_clear_error(tmp_path):
    pipe, den, net = make("sd15")
    tlora.save(net, tmp_path / "w.safetensors")
    other = build_pipeline("sd3")
    with pytest.raises(ValueError, match="does not have"):
        tlora.attach(other, tmp_path / "w.safetensors")


def test_edm_style_scheduler_is_refused():
    from diffusers import EulerDiscreteScheduler
    pipe, den, net = make("sd15")
    pipe.scheduler = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    with pytest.raises(ValueError, match="log"):
        tlora.attach(pipe, net)
