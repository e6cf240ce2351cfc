"""Parity with the reference implementation, lycoris-lora 4.1.3 (a test extra)."""
import pytest
import torch
import torch.nn as nn

import tlora

lyc_tlora = pytest.importorskip("lycoris.modules.tlora")


@pytest.mark.parametrize("R,Rmin", [(64, 1), (64, 32), (16, 4), (8, 8)])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_schedule_equals_lycoris_compute_timestep_mask(R, Rmin, alpha):
    for t in range(0, 1000):
        ref = lyc_tlora.compute_timestep_mask(t, 1000, R, Rmin, alpha)
        assert torch.equal(tlora.rank_mask(t, R, Rmin, alpha), ref), t


@pytest.mark.parametrize("k", [1, 5, 12, 16])
@pytest.mark.parametrize("multiplier,alpha", [(1.0, 16), (0.5, 4)])
def test_ortho_linear_equals_lycoris_tloramodule(k, multiplier, alpha):
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    R = 16
    ref = lyc_tlora.TLoraModule("lycoris_x", base, multiplier=multiplier, lora_dim=R, alpha=alpha)
    ref.apply_to()
    ours_base = nn.Linear(24, 20)
    ours_base.load_state_dict(base.state_dict())
    ours = tlora.TLoRAAdapter(ours_base, R, alpha=alpha, variant="ortho", init="weight", sig_type="principal",
                              multiplier=multiplier)
    # LyCORIS's own data init must equal ours bit for bit before training
    torch.testing.assert_close(ours.q0, ref.base_q)
    torch.testing.assert_close(ours.p0, ref.base_p)
    torch.testing.assert_close(ours.lam0, ref.base_lambda.reshape(-1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking tensors, copied into both
        ref.q_layer.weight.add_(torch.randn(ref.q_layer.weight.shape, generator=g) * 0.05)
        ref.p_layer.weight.add_(torch.randn(ref.p_layer.weight.shape, generator=g) * 0.05)
        ref.lambda_layer.mul_(1 + torch.randn(ref.lambda_layer.shape, generator=g) * 0.1)
        ours.q.copy_(ref.q_layer.weight)
        ours.p.copy_(ref.p_layer.weight)
        ours.lam.copy_(ref.lambda_layer.reshape(-1))
        ours.q0.copy_(ref.base_q)
        ours.p0.copy_(ref.base_p)
        ours.lam0.copy_(ref.base_lambda.reshape(-1))
    x = torch.randn(3, 7, 24, generator=g)
    mask = tlora.rank_mask(0, R)
    mask[:, k:] = 0
    lyc_tlora.set_timestep_mask(mask)
    try:
        expected = base(x)
    finally:
        lyc_tlora.clear_timestep_mask()
    ours.set_mask(mask)
    torch.testing.assert_close(ours_base(x), expected, atol=1e-5, rtol=1e-5)
