"""tlora memory: the estimate from a config on the meta device against one measured training step."""
import json
from pathlib import Path

import pytest

from benchmarks import memory as bench
from tlora import memory
from tlora.cli import main
from tlora.config import TLoRAConfig
from tlora.quantize import BasePrecision
from tlora.testing import build_pipeline

README = Path(__file__).resolve().parents[1] / "docs" / "memory.md"     # the memory table lives here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("memmodels")
    for fam in bench.TINY:
        build_pipeline(fam).save_pretrained(root / fam)
    return root


@pytest.mark.parametrize("base", [BasePrecision(), BasePrecision("int8", "quanto"), BasePrecision("int8", "torchao")],
                         ids=str)
@pytest.mark.parametrize("family", bench.TINY)
def test_estimate_is_within_15_percent_of_a_measured_step(tiny, family, base):
    tl = TLoRAConfig(rank=8, min_rank=2, target_module=())
    config = memory.read_denoiser_config(str(tiny / family))
    est = memory.estimate(config, tl, 64, 2, False, "no", base)
    got = bench.measure(str(tiny / family), tl, 64, 2, base)
    assert est.family == got.family == family
    # the frozen weights are the real storages (quantized tensors' int8 data and scales), to the byte
    assert est.weights == got.weights
    # adapter, gradients and AdamW state: what the optimizer really holds after its step
    assert (est.adapter, est.gradients, est.optimizer) == (got.adapter, got.gradients, got.optimizer)
    assert abs(est.total - got.total) <= 0.15 * got.total
    assert abs(est.activations - got.activations) <= 0.15 * got.activations


def test_estimates_need_no_weights_and_follow_the_levers():
    flux = memory.read_denoiser_config("flux1-dev")
    tl = TLoRAConfig(rank=16, min_rank=8, target_module=())
    bf16 = memory.estimate(flux, tl, 1024, 1, True, "bf16")
    int8 = memory.estimate(flux, tl, 1024, 1, True, "bf16", BasePrecision("int8"))
    nf4 = memory.estimate(flux, tl, 1024, 1, True, "bf16", BasePrecision("nf4"))
    n = 11_901_408_320                                  # Flux.1-dev's parameter count
    assert bf16.weights == 2 * n                        # bf16 everywhere
    assert int8.weights < 0.52 * bf16.weights and nf4.weights < 0.3 * bf16.weights
    no_ckpt = memory.estimate(flux, tl, 1024, 1, False, "bf16", BasePrecision("int8"))
    assert no_ckpt.activations > 4 * int8.activations
    eight_bit = memory.estimate(flux, tl, 1024, 1, True, "bf16", BasePrecision("int8"), optimizer="adamw8bit")
    assert eight_bit.optimizer < 0.3 * int8.optimizer
    assert memory.estimate(flux, tl, 512, 1, True, "bf16").activations < bf16.activations


def test_readme_quotes_the_real_model_table():
    lines = bench.real_table()
    text = README.read_text()
    assert all(line in text for line in lines), "README's memory table differs from benchmarks.memory.real_table()"


def test_memory_command_prints_the_table(capsys):
    assert main(["memory", "--model", "sdxl-base", "--rank", "16", "--base-precision", "int8"]) == 0
    out = capsys.readouterr().out
    assert "sdxl-base (sdxl), rank 16 ortho, 1024², batch 1, checkpointing on, bf16, base int8 (quanto)" in out
    assert "expected peak:" in out


def test_train_dry_run_estimates_and_writes_nothing(tiny, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    cfg = {"model": str(tiny / "sd15"), "data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
           "resolution": 64, "base_precision": "int8", "tlora": {"rank": 4}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--dry-run"]) == 0
    assert "base int8 (quanto)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,match", [
    (["--model", "sdxl-base", "--base-precision", "int4"], "argument --base-precision: must be one of 'no', 'int8', 'nf4'"),
    (["--model", "sdxl-base", "--base-precision", "nf4", "--quantization-backend", "quanto"],
     "nf4 is not available in quanto"),
    (["--model", "/nonexistent/model"], "model config not found"),
    (["--model", "sdxl-base", "--resolution", "1000"], "multiple of 16"),
    (["--model", "sdxl-base", "--rank", "0"], "argument --rank: must be an integer >= 1"),
])
def test_bad_memory_input_is_one_line_exit_2(capsys, argv, match):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
