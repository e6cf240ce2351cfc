"""Tiny models built offline from configs, shared by the tests."""
import pytest
import torch


def tiny_unet(cross_attention_dim=32, **kw):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
               attention_head_dim=8, norm_num_groups=8)
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


@pytest.fixture
def unet():
    return tiny_unet()


def perturb(network, seed=1, std=0.05):
    """Move every trainable adapter tensor off its init so deltas and gradients are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
