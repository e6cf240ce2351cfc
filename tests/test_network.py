"""inject / remove / timestep_mask on a tiny diffusers UNet2DConditionModel."""
import json

import pytest
import torch

import tlora
from tlora import TLoRAConfig

from conftest import perturb, tiny_unet, unet_inputs

CFG = TLoRAConfig(rank=8, min_rank=1, variant="vanilla")


def test_inject_targets_attention_linears_only(unet):
    net = tlora.inject(unet, CFG)
    n_attn = sum(type(m).__name__ == "Attention" for m in unet.modules())
    assert n_attn == 8 and len(net.adapters) == 4 * n_attn  # to_q, to_k, to_v, to_out.0 of attn1 and attn2
    assert all(p.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for p in net.adapters)
    assert all(".attn" in p for p in net.adapters)


def test_inject_matching_nothing_is_an_error(unet):
    with pytest.raises(ValueError, match="matched nothing"):
        tlora.inject(unet, CFG.replace(target_module=("NoSuchBlock",)))


def test_remove_restores_state_dict_exactly(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, c = unet_inputs(2)
    ref = unet(x, 10, c).sample
    net = tlora.inject(unet, CFG.replace(variant="ortho", target_module=("Attention", "ResnetBlock2D")))
    perturb(net)
    assert any(isinstance(a.base_layer, torch.nn.Conv2d) for a in net.adapters.values())
    assert not torch.equal(unet(x, 10, c).sample, ref)
    net.merge()
    net.remove()
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(unet(x, 10, c).sample, ref)


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_batch_of_four_timesteps_equals_four_single_runs(variant):
    unet = tiny_unet()
    net = tlora.inject(unet, CFG.replace(variant=variant))
    perturb(net)
    x, c = unet_inputs(4)
    t = torch.tensor([999, 700, 300, 0])
    with tlora.timestep_mask(net, t):
        out = unet(x, t, c).sample
        out.square().mean().backward()
    batch_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    singles = []
    sum_grads = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(4):
        unet.zero_grad()
        with tlora.timestep_mask(net, t[i:i + 1]):
            y = unet(x[i:i + 1], t[i:i + 1], c[i:i + 1]).sample
            (y.square().sum() / out.numel()).backward()
        singles.append(y.detach())
        for n, p in net.named_parameters():
            sum_grads[n] += p.grad
    torch.testing.assert_close(out.detach(), torch.cat(singles), atol=1e-5, rtol=1e-5)
    for n in batch_grads:
        torch.testing.assert_close(batch_grads[n], sum_grads[n], atol=1e-6, rtol=1e-4)
    # and the official bug (mask of timesteps[0] for all) would differ:
    with torch.no_grad(), tlora.timestep_mask(net, t[:1]):
        wrong = unet(x, t, c).sample
    assert not torch.allclose(wrong, out.detach(), atol=1e-5)


RANK_AXIS = {"lora_down": 0, "lora_up": 1, "q": 0, "p": 1, "lam": 0}


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_gradient_checkpointing_masked_ranks_get_exactly_zero_gradient(variant):
    unet = tiny_unet()
    unet.enable_gradient_checkpointing()
    unet.train()
    net = tlora.inject(unet, CFG.replace(variant=variant))
    perturb(net)
    x, c = unet_inputs(4)
    t = torch.tensor([999, 950, 900, 800])  # ranks 1, 1, 1, 2 of 8
    with tlora.timestep_mask(net, t):
        unet(x, t, c).sample.square().mean().backward()
    for name, p in net.named_parameters():
        g = p.grad.movedim(RANK_AXIS[name.rsplit(".", 1)[-1]], 0)
        assert g[2:].abs().max().item() == 0.0, name
    assert max(p.grad.abs().max().item() for p in net.parameters()) > 0
    # control: without the mask the same ranks do receive gradient
    unet.zero_grad()
    unet(x, t, c).sample.square().mean().backward()
    assert max(p.grad.movedim(RANK_AXIS[n.rsplit(".", 1)[-1]], 0)[2:].abs().max().item()
               for n, p in net.named_parameters()) > 0


def test_checkpointed_gradients_equal_plain_gradients():
    grads = []
    for ckpt in (False, True):
        unet = tiny_unet()
        if ckpt:
            unet.enable_gradient_checkpointing()
        unet.train()
        net = tlora.inject(unet, CFG.replace(variant="ortho"))
        perturb(net)
        x, c = unet_inputs(4)
        t = torch.tensor([999, 600, 300, 10])
        with tlora.timestep_mask(net, t):
            unet(x, t, c).sample.square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_outside_a_block_adapters_run_full_rank_and_blocks_nest(unet):
    net = tlora.inject(unet, CFG)
    a = next(iter(net.adapters.values()))
    assert a._mask is None
    with tlora.timestep_mask(net, 999):
        assert a._shared_rank == 1
        with tlora.timestep_mask(net, torch.tensor([0, 999])):
            assert a._shared_rank is None and a._mask.shape == (2, 8)
        assert a._shared_rank == 1
    assert a._mask is None


def test_merged_network_refuses_a_mask(unet):
    net = tlora.inject(unet, CFG)
    net.merge()
    with pytest.raises(RuntimeError, match="merged"):
        with tlora.timestep_mask(net, 500):
            pass


def test_module_algo_map_gives_each_adapter_its_own_rank_and_mask(unet):
    cfg = TLoRAConfig.from_lycoris({"algo": "tlora", "linear_dim": 8, "linear_alpha": 4,
                                    "apply_preset": {"target_module": ["Attention", "FeedForward"],
                                                     "module_algo_map": {"FeedForward": {"linear_dim": 4}}}})
    net = tlora.inject(unet, cfg)
    ranks = {p: a.rank for p, a in net.adapters.items()}
    assert {r for p, r in ranks.items() if ".ff." in p} == {4}
    assert {r for p, r in ranks.items() if ".attn" in p} == {8}
    with tlora.timestep_mask(net, 500):
        for p, a in net.adapters.items():
            assert a._shared_rank == tlora.active_rank(500, a.rank)  # no padding with ones (LyCORIS bug 10)
    ff = next(a for p, a in net.adapters.items() if ".ff." in p)
    assert ff.scale == 4 / 4 and next(a for p, a in net.adapters.items() if ".attn" in p).scale == 4 / 8


def test_target_name_and_exclude_name(unet):
    cfg = TLoRAConfig(rank=4, target_module=(), target_name=(r".*attn2\.to_k",))
    net = tlora.inject(unet, cfg)
    assert sorted(net.adapters) == sorted(p for p, _ in unet.named_modules() if p.endswith("attn2.to_k"))
    net.remove()
    net = tlora.inject(unet, TLoRAConfig(rank=4, exclude_name=(r".*to_out.*",)))
    assert len(net.adapters) == 24 and not any("to_out" in p for p in net.adapters)


SEED_JSON = {"algo": "tlora", "multiplier": 1.0, "linear_dim": 64, "linear_alpha": 32,
             "apply_preset": {"target_module": ["Attention", "FeedForward"]}}


def test_from_lycoris_seed_config_defaults_to_lycoris_form():
    cfg = TLoRAConfig.from_lycoris(SEED_JSON)
    assert (cfg.rank, cfg.alpha, cfg.min_rank, cfg.exponent) == (64, 32.0, 1, 1.0)
    assert (cfg.variant, cfg.init, cfg.sig_type) == ("ortho", "weight", "principal")
    assert cfg.target_module == ("Attention", "FeedForward")
    cfg2 = TLoRAConfig.from_lycoris({**SEED_JSON, "multiplier": 0.5, "tlora_min_rank": 4, "tlora_alpha": 2.0,
                                     "tlora_variant": "vanilla", "sig_type": "last", "tlora_init": "random"})
    assert (cfg2.multiplier, cfg2.min_rank, cfg2.exponent, cfg2.variant, cfg2.sig_type, cfg2.init) == \
        (0.5, 4, 2.0, "vanilla", "last", "random")
    flux2 = {**SEED_JSON, "apply_preset": {"target_module": ["Flux2Attention", "Flux2FeedForward",
                                                             "Flux2ParallelSelfAttention"]}}
    assert TLoRAConfig.from_lycoris(json.loads(json.dumps(flux2))).target_module[0] == "Flux2Attention"


def test_from_lycoris_rejects_unknown_keys_and_other_algos():
    with pytest.raises(ValueError, match="linear_dimm.*did you mean 'linear_dim'"):
        TLoRAConfig.from_lycoris({**SEED_JSON, "linear_dimm": 3})
    with pytest.raises(ValueError, match="'lokr' is not supported"):
        TLoRAConfig.from_lycoris({**SEED_JSON, "algo": "lokr"})
    with pytest.raises(ValueError, match="min_rank"):
        TLoRAConfig.from_lycoris({**SEED_JSON, "tlora_min_rank": 65})


def test_from_official_flags():
    o = TLoRAConfig.from_official("ortho_lora", 64, 32, 1.0, "last")
    assert (o.variant, o.init, o.sig_type, o.alpha, o.min_rank) == ("ortho", "random", "last", None, 32)
    assert TLoRAConfig.from_official("lora").variant == "vanilla"
    with pytest.raises(ValueError, match="trainer_type"):
        TLoRAConfig.from_official("dora")


def test_config_validates_itself():
    for kw, name in [(dict(rank=0), "rank"), (dict(min_rank=9, rank=8), "min_rank"), (dict(exponent=0), "exponent"),
                     (dict(variant="x"), "variant"), (dict(sig_type="top"), "sig_type")]:
        with pytest.raises(ValueError, match=name):
            TLoRAConfig(**kw)
    with pytest.raises(ValueError, match="did you mean 'min_rank'"):
        TLoRAConfig.from_dict({"min_rnk": 2})
    assert TLoRAConfig.from_dict(TLoRAConfig(rank=3).to_dict()) == TLoRAConfig(rank=3)


def test_ortho_rank_wider_than_a_layer_is_clamped_with_its_own_schedule(unet):
    with pytest.warns(UserWarning, match="clamped"):
        net = tlora.inject(unet, TLoRAConfig(rank=48, min_rank=4))
    ranks = {a.rank for a in net.adapters.values()}
    assert ranks == {32, 48}                          # 32-wide layers get 32, 64-wide ones keep 48
    with tlora.timestep_mask(net, 500):
        for a in net.adapters.values():
            assert a._shared_rank == tlora.active_rank(500, a.rank, 4)


@pytest.mark.parametrize("bad,says", [
    ({"linear_dim": 3.7}, "linear_dim in LyCORIS config must be an integer >= 1 and <= 4096, got 3.7"),
    ({"linear_dim": True}, "linear_dim in LyCORIS config must be an integer >= 1 and <= 4096, got True"),
    ({"linear_dim": 4, "tlora_min_rank": True}, "tlora_min_rank in LyCORIS config must be an integer"),
    ({"linear_dim": 4, "tlora_min_rank": 1.5}, "tlora_min_rank in LyCORIS config must be an integer"),
    ({"linear_dim": 4, "tlora_alpha": True}, "tlora_alpha in LyCORIS config must be a finite number"),
    ({"linear_dim": 4, "multiplier": "1"}, "multiplier in LyCORIS config must be a finite number"),
    ({"linear_dim": 4, "conv_dim": 2.5}, "conv_dim in LyCORIS config must be an integer"),
    ({"linear_dim": 4, "linear_alpha": None}, "linear_alpha in LyCORIS config must be given"),
    ({"linear_dim": 4, "use_data_init": "false"}, "use_data_init in LyCORIS config must be true or false"),
    ({"linear_dim": 4, "conv_alpha": float("nan")}, "conv_alpha in LyCORIS config must be a finite number"),
    ({"linear_dim": 4, "tlora_min_rank": 5}, "tlora_min_rank in LyCORIS config must be <= rank"),
    ({"linear_dim": 4, "apply_preset": {"target_name": "down_blocks"}}, "apply_preset.target_name .* list of strings"),
    ({"linear_dim": 4, "apply_preset": {"exclude_name": ["("]}}, "apply_preset.exclude_name .* regular expressions"),
])
def test_lycoris_values_of_the_wrong_type_are_refused_never_coerced(bad, says):
    with pytest.raises(ValueError, match=says):
        TLoRAConfig.from_lycoris({"algo": "tlora", **bad})


@pytest.mark.parametrize("field,value", [("min_rank", True), ("exponent", True), ("rank", True)])
def test_booleans_are_not_numbers_in_the_config(field, value):
    with pytest.raises(ValueError, match=field):
        TLoRAConfig(**{field: value})
