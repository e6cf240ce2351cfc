"""Shared test fixtures: the tiny UNet, its inputs, and moving adapters off their init."""
import pytest
import torch

from tlora import tiny


def tiny_unet(cross_attention_dim=32, **kw):
    """tlora.tiny's UNet (seeded), at sample size 8."""
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
