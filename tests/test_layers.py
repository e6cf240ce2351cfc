"""Adapter math on single layers: table-driven over Linear and Conv2d geometries."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tlora import TLoRAAdapter
from tlora import functional as Fn

from conftest import perturb

R = 6

LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(8, 10, 1),
    "conv3x3_s2_p1": lambda: nn.Conv2d(8, 10, 3, stride=2, padding=1),
    "conv3x3_dil2_reflect": lambda: nn.Conv2d(8, 10, 3, padding=2, dilation=2, padding_mode="reflect"),
}
KINDS = [("vanilla", "random", "last"), *[("ortho", i, s) for i in ("random", "weight")
                                            for s in ("principal", "last", "middle")]]


def make(layer, kind, **kw):
    torch.manual_seed(0)
    base = LAYERS[layer]()
    variant, init, sig = kind
    return base, TLoRAAdapter(base, R, variant=variant, init=init, sig_type=sig, **kw)


def inputs(base, b=2):
    g = torch.Generator().manual_seed(3)
    if isinstance(base, nn.Linear):
        return torch.randn(b, 5, base.in_features, generator=g)
    return torch.randn(b, base.in_channels, 9, 9, generator=g)


def plain(base, x):
    return base._conv_forward(x, base.weight, base.bias) if isinstance(base, nn.Conv2d) else F.linear(x, base.weight, base.bias)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_delta_at_init_for_every_mask(layer, kind):
    base, a = make(layer, kind)
    x = inputs(base)
    ref = plain(base, x)
    assert torch.equal(base(x), ref)
    for mask in (torch.ones(1, R), torch.tensor([[1., 1, 0, 0, 0, 0]]), torch.tensor([[1., 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])):
        a.set_mask(mask)
        assert torch.equal(base(x), ref)


def truncated_reference(base, a, x, k):
    """The adapter cut to its first k ranks, computed directly from the weights."""
    out_f = base.weight.shape[0]
    if a.variant == "vanilla":
        dw = Fn.lora_delta(a.lora_down.reshape(R, -1)[:k], a.lora_up.reshape(out_f, R)[:, :k])
    else:
        dw = Fn.ortho_delta(a.q.reshape(R, -1)[:k], a.p.reshape(out_f, R)[:, :k], a.lam[:k],
                            a.q0.reshape(R, -1)[:k], a.p0.reshape(out_f, R)[:, :k], a.lam0[:k])
    w = base.weight + a.scale * a.multiplier * dw.reshape(base.weight.shape)
    return plain(base, x) if k == 0 else (base._conv_forward(x, w, base.bias) if isinstance(base, nn.Conv2d)
                                          else F.linear(x, w, base.bias))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS[:3])
def test_rank_k_mask_equals_truncated_adapter(layer, kind):
    base, a = make(layer, kind, alpha=3.0, multiplier=0.7)
    perturb(a, seed=7, std=0.1)
    x = inputs(base)
    for k in (1, 3, R):
        m = torch.zeros(1, R)
        m[:, :k] = 1
        a.set_mask(m)
        assert a._shared_rank == k                       # fast path taken
        fast = base(x)
        a.set_mask(m.expand(2, R).clone(), shared_rank=None)
        a._shared_rank, a._max_rank = None, R            # force the general per-sample path over all ranks
        slow = base(x)
        ref = truncated_reference(base, a, x, k)
        torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(slow, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS[:2])
def test_per_sample_masks_equal_single_runs_outputs_and_gradients(layer, kind):
    base, a = make(layer, kind)
    perturb(a, seed=7, std=0.1)
    x = inputs(base, b=4)
    ks = [1, 2, 4, 6]
    masks = torch.stack([torch.arange(R) < k for k in ks]).float()
    a.set_mask(masks)
    out = base(x)
    out.square().sum().backward()
    batch_grads = [p.grad.clone() for p in a.parameters()]
    singles, grads = [], [torch.zeros_like(p) for p in a.parameters()]
    for i in range(4):
        a.zero_grad()
        a.set_mask(masks[i:i + 1])
        y = base(x[i:i + 1])
        y.square().sum().backward()
        singles.append(y.detach())
        grads = [g + p.grad for g, p in zip(grads, a.parameters())]
    torch.testing.assert_close(out.detach(), torch.cat(singles), atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(batch_grads, grads):
        torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS[:2])
def test_masked_ranks_get_exactly_zero_gradient(layer, kind):
    base, a = make(layer, kind)
    perturb(a, seed=7, std=0.1)
    x = inputs(base, b=2)
    a.set_mask(torch.stack([torch.arange(R) < 2, torch.arange(R) < 3]).float())
    base(x).square().sum().backward()
    rows = {"lora_down": 0, "lora_up": 1, "q": 0, "p": 1, "lam": 0}
    for name, p in a.named_parameters():
        g = p.grad.movedim(rows[name], 0)
        assert g[3:].abs().max().item() == 0.0, name
        assert g[:3].abs().max().item() > 0.0, name


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS[:3])
def test_merge_equals_unmerged_and_unmerge_restores_exactly(layer, kind):
    base, a = make(layer, kind, alpha=2.0, multiplier=0.5)
    perturb(a, seed=7, std=0.1)
    x = inputs(base)
    w0 = base.weight.detach().clone()
    unmerged = base(x)
    a.merge()
    assert not torch.equal(base.weight, w0)
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)
    a.unmerge()
    assert torch.equal(base.weight, w0)
    assert torch.equal(base(x), unmerged)


@pytest.mark.parametrize("layer", LAYERS)
def test_multiplier_scales_the_delta(layer):
    base, a = make(layer, KINDS[1])
    perturb(a, seed=7, std=0.1)
    x = inputs(base)
    ref = plain(base, x)
    d1 = base(x) - ref
    a.multiplier = 0.25
    torch.testing.assert_close(base(x) - ref, 0.25 * d1, atol=1e-6, rtol=1e-4)
    a.multiplier = 0.0
    assert torch.equal(base(x), ref)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS[:2])
def test_bf16_base_delta_within_1e_3_of_fp32(layer, kind):
    base, a = make(layer, kind)
    perturb(a, seed=7, std=0.1)
    x = inputs(base)
    base.to(torch.bfloat16)
    assert a.lora_down.dtype == torch.float32 if kind[0] == "vanilla" else a.q.dtype == torch.float32
    xb = x.to(torch.bfloat16)
    y = base(xb)
    assert y.dtype == torch.bfloat16
    d16 = a.delta(xb)                                   # float32 math on the bf16 model's input
    with torch.no_grad():                               # the same delta computed in float64
        a64 = {n: t.detach().double() for n, t in a.named_parameters()}
        a64.update({n: t.double() for n, t in a.named_buffers()})
        x64 = xb.double()
        if kind[0] == "vanilla":
            ref = a._up(a._down(x64, a64["lora_down"]), a64["lora_up"])
        else:
            lam = (lambda v: v.reshape(1, -1, 1, 1)) if a.is_conv else (lambda v: v)
            ref = (a._up(a._down(x64, a64["q"]) * lam(a64["lam"]), a64["p"])
                   - a._up(a._down(x64, a64["q0"]) * lam(a64["lam0"]), a64["p0"]))
        ref = ref * a.scale
    rel = (d16.double() - ref).norm() / ref.norm()
    assert rel.item() < 1e-3
    assert ((y.float() - plain(base, xb).float()) - d16).abs().max() <= 0.02 * d16.abs().max()
    dw = a.delta_weight()
    assert dw.dtype == torch.float32


def test_bf16_ortho_residual_keeps_small_delta():
    # REFERENCE bug 8: computing P·λ·Q − P0·λ0·Q0 in bf16 loses 10-23 % of a small ΔW
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(torch.bfloat16)
    a = TLoRAAdapter(base, 16, variant="ortho", init="weight", sig_type="principal")
    with torch.no_grad():
        a.lam.mul_(1.001)  # a small, realistic early-training change
    x = torch.randn(4, 64)
    exact = a.delta(x.double().float())
    ref = ((a.p.double() * (a.lam.double() - a.lam0.double())) @ a.q.double() * a.scale).float()
    torch.testing.assert_close(exact, x @ ref.T, rtol=1e-3, atol=1e-6)


def test_orthogonality_loss_zero_at_init_and_positive_after():
    base = nn.Linear(16, 16)
    a = TLoRAAdapter(base, 4, variant="ortho")
    assert a.orthogonality_loss().item() < 1e-10
    perturb(a, seed=7, std=0.1)
    q, p = a.q.detach(), a.p.detach()
    expected = ((p.T @ p - torch.eye(4)) ** 2).sum() + ((q @ q.T - torch.eye(4)) ** 2).sum()
    torch.testing.assert_close(a.orthogonality_loss(), expected)


def test_sig_type_selects_singular_triplets():
    torch.manual_seed(0)
    base = nn.Linear(10, 8)
    s = torch.linalg.svdvals(base.weight)
    for sig, sl in (("principal", slice(0, 3)), ("last", slice(5, 8)), ("middle", slice(2, 5))):
        a = TLoRAAdapter(base, 3, init="weight", sig_type=sig)
        torch.testing.assert_close(a.lam, s[sl])
        a.detach_from_base()


def test_ortho_rank_above_layer_size_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds min"):
        TLoRAAdapter(nn.Linear(4, 4), 8, variant="ortho")


def test_mask_batch_mismatch_is_a_clear_error():
    base, a = make("linear", KINDS[0])
    a.set_mask(torch.stack([torch.arange(R) < 2, torch.arange(R) < 3]).float())
    with pytest.raises(ValueError, match="batch"):
        base(torch.randn(3, 12))


def test_randomized_principal_init_is_orthonormal_and_close_to_exact():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(96, 96, generator=g))[0]
    v = torch.linalg.qr(torch.randn(128, 96, generator=g))[0]
    w = (u * torch.logspace(0, -3, 96)) @ v.T                        # a decaying spectrum, like trained weights
    q, p, lam, how = Fn.svd_init(w, 8, "principal", g, from_weight=True)
    assert how == "randomized"
    eq, ep, elam, how_e = Fn.svd_init(w, 8, "principal", from_weight=True, method="exact")
    assert how_e == "exact"
    torch.testing.assert_close(lam, elam, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q @ q.T, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.T @ p, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close((p * lam) @ q, (ep * elam) @ eq, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("sig", ["principal", "last", "middle"])
def test_random_init_samples_haar_frames_and_gaussian_singular_values(sig):
    g = torch.Generator().manual_seed(0)
    q, p, lam, how = Fn.svd_init(torch.zeros(40, 60), 6, sig, g, from_weight=False)
    assert how == "haar"
    torch.testing.assert_close(q @ q.T, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.T @ p, torch.eye(6), atol=1e-5, rtol=0)
    # the singular values of an N(0, 1/r) 40x60 matrix lie in the Marchenko-Pastur bulk: (sqrt(60) +- sqrt(40)) / r
    assert bool((lam > (60 ** 0.5 - 40 ** 0.5) / 6 * 0.8).all() and (lam < (60 ** 0.5 + 40 ** 0.5) / 6 * 1.2).all())
    assert bool((lam[:-1] >= lam[1:]).all())


def test_every_variant_a_config_may_name_has_its_type():
    # config owns the words (checked before torch loads), layers the types behind them: the two agree
    from tlora.config import VARIANTS
    from tlora.layers import FORMS
    assert tuple(FORMS) == VARIANTS and all(FORMS[v].name == v for v in VARIANTS)
