"""The native weights file: exact round trips and one clear error for every broken file."""

import pytest
import torch
from safetensors import safe_open

import tlora
from tlora import TLoRAConfig
from tlora.weights import WeightsFileError, read_header

from conftest import perturb, tiny_unet, unet_inputs

KINDS = [("vanilla", "random", "last")] + [("ortho", i, s) for i in ("random", "weight")
                                           for s in ("principal", "last", "middle")]


def inputs():
    x, c = unet_inputs(2)
    return x, torch.tensor([900, 100]), c


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_bit_for_bit_including_conv_targets(tmp_path, kind):
    variant, init, sig = kind
    unet = tiny_unet()
    cfg = TLoRAConfig(rank=4, min_rank=2, exponent=0.5, alpha=2.0, variant=variant, init=init, sig_type=sig,
                      target_module=("Attention", "ResnetBlock2D"))
    net = tlora.inject(unet, cfg)
    assert any(a.is_conv and a.base_layer.kernel_size == (3, 3) for a in net.adapters.values())
    perturb(net)
    x, t, c = inputs()
    with tlora.timestep_mask(net, t):
        ref = unet(x, t, c).sample
    path = tlora.save(net, tmp_path / "w.safetensors", metadata={"base_model": "tiny", "family": "sd15",
                                                                 "training": {"steps": 3}})
    fresh = tiny_unet()
    loaded = tlora.load(path, fresh)
    assert loaded.config == net.config
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with tlora.timestep_mask(loaded, t):
        assert torch.equal(fresh(x, t, c).sample, ref)
    h = read_header(path)
    assert h["format"] == "tlora" and h["variant"] == variant and h["family"] == "sd15"
    assert h["timestep_convention"] == "t" and h["base_model"] == "tiny" and h["training"] == {"steps": 3}
    m = next(iter(h["modules"].values()))
    assert (m["rank"], m["min_rank"], m["exponent"], m["alpha"]) == (4, 2, 0.5, 2.0)
    if variant == "ortho":  # frozen tensors are stored, never re-derived
        with safe_open(str(path), "pt") as f:
            assert any(k.endswith(".q0") for k in f.keys()) and any(k.endswith(".lam0") for k in f.keys())


@pytest.fixture
def saved(tmp_path):
    unet = tiny_unet()
    net = tlora.inject(unet, TLoRAConfig(rank=4))
    perturb(net)
    return tlora.save(net, tmp_path / "w.safetensors")


def assert_clean_failure(path, match):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(WeightsFileError, match=match) as e:
        tlora.load(path, unet)
    assert "\n" not in str(e.value)
    assert list(unet.state_dict()) == list(before)    # nothing left injected


def test_flipped_byte_in_header_is_one_clear_error(saved):
    data = bytearray(saved.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode()
    key = '\\"rank\\": 4'                            # inside the JSON-in-JSON tlora header
    pos = header.index(key) + len(key) - 1
    data[8 + pos] = ord("5")
    saved.write_bytes(bytes(data))
    assert_clean_failure(saved, "corrupted")


def test_flipped_byte_in_tensor_data_is_detected(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x40
    saved.write_bytes(bytes(data))
    assert_clean_failure(saved, "corrupted")


def test_truncated_file_is_one_clear_error(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    assert_clean_failure(saved, "truncated or corrupted")


def test_file_for_another_base_model_is_one_clear_error(saved):
    other = tiny_unet(cross_attention_dim=16)
    with pytest.raises(WeightsFileError, match=r"weight shape .* wrong base model"):
        tlora.load(saved, other)


def test_missing_file_and_foreign_file(tmp_path):
    with pytest.raises(WeightsFileError, match="not found"):
        tlora.load(tmp_path / "nope.safetensors", tiny_unet())
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(WeightsFileError, match="unknown weights format"):
        tlora.load(tmp_path / "plain.safetensors", tiny_unet())


def test_save_is_atomic(tmp_path, monkeypatch):
    unet = tiny_unet()
    net = tlora.inject(unet, TLoRAConfig(rank=4))
    import tlora.weights as W

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(W, "save_file", boom)
    with pytest.raises(OSError):
        tlora.save(net, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_file_written_before_the_one_owner_refactor_loads_and_gives_its_recorded_output():
    """tests/data/tlora-format1-sd15.safetensors was written by tlora at 9d54561 + the ComfyUI nodes (format 1,
    ortho rank 4 with one vanilla rank-3 module, min_rank 2, exponent 2); the .expected file holds that
    version's masked output for two samples at t = 100 and 900. Every later tlora must read it the same."""
    from pathlib import Path
    from safetensors.torch import load_file
    data = Path(__file__).parent / "data"
    unet = tiny_unet()
    net = tlora.load(data / "tlora-format1-sd15.safetensors", unet)
    stored = load_file(str(data / "tlora-format1-sd15.safetensors"))
    ours = net.state_dict()
    assert set(ours) == set(stored) and all(torch.equal(ours[k], stored[k]) for k in stored)
    assert {a.variant for a in net.adapters.values()} == {"ortho", "vanilla"}
    want = load_file(str(data / "tlora-format1-sd15.expected.safetensors"))
    with torch.no_grad(), tlora.timestep_mask(net, want["timesteps"]):
        got = unet(want["x"], want["timesteps"], want["context"]).sample
    torch.testing.assert_close(got, want["output"], atol=1e-6, rtol=0)   # same math; another CPU may round apart


def test_written_files_and_checkpoint_folders_get_the_users_umask(tmp_path):
    """Atomic writes go through mkstemp / mkdtemp (0600 / 0700): the renamed file must have 0666 & ~umask."""
    import os
    import stat
    from tlora.checkpoint import save_checkpoint
    from tlora.fileio import write_json
    old = os.umask(0o022)
    try:
        unet = tiny_unet()
        net = tlora.inject(unet, TLoRAConfig(rank=2))
        tlora.save(net, tmp_path / "w.safetensors")
        write_json({"a": 1}, tmp_path / "x.json")
        opt = torch.optim.AdamW(net.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ck = save_checkpoint(tmp_path, 1, net, opt, sched, torch.Generator(), {})
    finally:
        os.umask(old)
    for f in (tmp_path / "w.safetensors", tmp_path / "x.json", ck / "tlora.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE(ck.stat().st_mode) == 0o755


def test_non_finite_tensors_and_a_missing_checksum_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    unet = tiny_unet()
    net = tlora.inject(unet, TLoRAConfig(rank=2))
    perturb(net)
    tlora.save(net, tmp_path / "w.safetensors")
    net.remove()
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(tmp_path / "w.safetensors"))
    key = sorted(tensors)[0]
    nan = dict(tensors)
    nan[key] = nan[key].clone()
    nan[key][0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata={"tlora": meta["tlora"]})   # no checksum either
    with pytest.raises(WeightsFileError, match="without its tlora_sha256"):
        tlora.load(tmp_path / "nan.safetensors", tiny_unet())
    with pytest.raises(WeightsFileError, match=f"non-finite values .* in {key}"):
        tlora.weights.read(tmp_path / "nan.safetensors", verify=False)
    unchecked = {k: v for k, v in meta.items() if k != "tlora_sha256"}
    save_file(tensors, str(tmp_path / "unchecked.safetensors"), metadata=unchecked)
    assert tlora.weights.read(tmp_path / "unchecked.safetensors", verify=False)[0].keys() == tensors.keys()
