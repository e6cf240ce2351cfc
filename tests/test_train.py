"""tlora train on tiny pipelines saved to temporary folders (the real from_pretrained path)."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import tlora
from tlora.cli import main
from tlora.testing import build_pipeline
from tlora.train import TrainingError, train
from tlora.trainconfig import TrainConfig, load_config

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fam in ("sd15", "sdxl", "sd3", "flux", "flux2"):
        build_pipeline(fam).save_pretrained(root / fam)
        out[fam] = str(root / fam)
    return out


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"{i:02d}.png")
    (d / "01.txt").write_text("a sks toy on a table")
    return str(d)


def cfg_for(model, data, out, **kw):
    base = dict(model=model, data_dir=data, output_dir=str(out), class_name="toy", resolution=32, max_steps=3,
                validation_steps=2, validation_inference_steps=2, checkpointing_steps=2, device="cpu",
                validation_prompts=["a {0} on the beach"], tlora=tlora.TLoRAConfig(rank=4, target_module=()))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "flux2"])
def test_three_step_run_writes_weights_samples_logs(models, data, tmp_path, family):
    losses = []
    final = train(cfg_for(models[family], data, tmp_path / "out"), on_step=lambda s, l: losses.append(l))
    out = tmp_path / "out"
    assert final == out / "tlora.safetensors" and final.is_file()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "samples" / "step-2.png").is_file() and (out / "samples" / "step-3.png").is_file()
    assert any((out / "logs").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    header = tlora.weights.read_header(final)
    assert header["family"] == family and header["training"]["config"]["max_steps"] == 3
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["tlora"]["rank"] == 4 and resolved["tlora"]["target_module"]
    # the trained file attaches to a stock pipeline loaded from the same folder
    from tlora.generate import load_pipeline
    pipe = load_pipeline(models[family])
    with tlora.attach(pipe, final) as h:
        assert len(h.network.adapters) > 0


def test_sdxl_feedforward_targets_in_bf16_have_finite_loss(models, data, tmp_path):
    losses = []
    cfg = cfg_for(models["sdxl"], data, tmp_path / "o", mixed_precision="bf16", max_steps=4, validation_steps=0,
                  tlora=tlora.TLoRAConfig(rank=4, target_module=("Attention", "FeedForward")))
    final = train(cfg, on_step=lambda s, l: losses.append(l))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    header = tlora.weights.read_header(final)
    assert any(".ff." in p for p in header["modules"])
    tensors, _ = tlora.weights.read(final)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())


def test_batch_4_with_gradient_checkpointing_masked_ranks_get_zero_gradient(models, data, tmp_path):
    seen = {}

    def on_grads(step, network, t):
        sched = next(iter(network.schedules()))
        r_max = max(sched.ranks(t.tolist()))
        for name, p in network.named_parameters():
            axis = 1 if name.endswith((".lora_up", ".p")) else 0
            g = p.grad.movedim(axis, 0)
            seen.setdefault(step, []).append((r_max, g[r_max:].abs().max().item() if r_max < g.shape[0] else 0.0,
                                              g[:r_max].abs().max().item()))
    cfg = cfg_for(models["sd15"], data, tmp_path / "o", batch_size=4, gradient_checkpointing=True, max_steps=3,
                  validation_steps=0, tlora=tlora.TLoRAConfig(rank=16, variant="vanilla", target_module=()))
    train(cfg, on_grads=on_grads)
    partial = [s for s, rows in seen.items() if rows[0][0] < 16]
    assert partial, "no step had masked ranks"
    for s in partial:
        assert all(masked == 0.0 for _, masked, _ in seen[s])
    assert any(active > 0 for rows in seen.values() for _, _, active in rows)


def killed_at_3_then_resumed(model, data, tmp_path, **cfg):
    """(final weights of a straight run, of a run killed after step 3 and resumed from its last checkpoint)."""
    straight = train(cfg_for(model, data, tmp_path / "a", **cfg))

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 3:
            raise Killed
    with pytest.raises(Killed):
        train(cfg_for(model, data, tmp_path / "b", **cfg), on_step=kill)
    assert not (tmp_path / "b" / "tlora.safetensors").exists()
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-2"]
    return straight, train(cfg_for(model, data, tmp_path / "b", resume="latest", **cfg))


def test_resume_after_kill_is_bit_identical(models, data, tmp_path):
    straight, resumed = killed_at_3_then_resumed(
        models["sd15"], data, tmp_path, max_steps=5, checkpointing_steps=2, validation_steps=0, lr_scheduler="cosine",
        tlora=tlora.TLoRAConfig(rank=4, target_module=()))
    a, _ = tlora.weights.read(straight)
    b, _ = tlora.weights.read(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target", ["weights", "gradient"])
def test_non_finite_loss_stops_with_last_checkpoint_intact(models, data, tmp_path, target):
    """A NaN weight, or a NaN gradient (through clipping into every update), at step 3: the run stops before
    anything of step 3 is saved and names checkpoint-2, which exists and is finite."""
    def poison(step, network, t):
        if step == 3:
            with torch.no_grad():
                p = next(iter(network.parameters()))
                (p if target == "weights" else p.grad).fill_(float("nan"))
    cfg = cfg_for(models["sd15"], data, tmp_path / "o", max_steps=6, checkpointing_steps=2, validation_steps=0)
    with pytest.raises(TrainingError, match=r"non-finite at step 3.*checkpoint-2"):   # the weights check, after the
        train(cfg, on_grads=poison)                                                  # update; the loss would at 4
    tensors, _ = tlora.weights.read(tmp_path / "o" / "checkpoint-2" / "tlora.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert not (tmp_path / "o" / "tlora.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*")) == ["checkpoint-2"]


def _tree(p):
    return {str(q.relative_to(p)): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}


def test_a_foreign_checkpoint_is_kept_never_resumed_and_keep_last_k_counts_only_this_runs(models, data, tmp_path,
                                                                                           capsys):
    """OUT/checkpoint-50 of another run (rank 8): a fresh rank-4 run is refused in one line saying what differs;
    a rank-4 run that has its own checkpoints resumes its own latest (not 50), and keep-last-1 prunes only its
    own; checkpoint-50 keeps every byte."""
    other = cfg_for(models["sd15"], data, tmp_path / "other", max_steps=2, checkpointing_steps=2, validation_steps=0,
                    tlora=tlora.TLoRAConfig(rank=8, target_module=()))
    train(other)
    out = tmp_path / "out"
    ours = dict(checkpointing_steps=1, validation_steps=0, checkpoints_total_limit=1)
    train(cfg_for(models["sd15"], data, out, max_steps=2, **ours))               # this run: checkpoint-2
    import shutil
    shutil.copytree(tmp_path / "other" / "checkpoint-2", out / "checkpoint-50")
    foreign = _tree(out / "checkpoint-50")
    (tmp_path / "fresh.json").write_text(json.dumps(
        {"model": models["sd15"], "data_dir": data, "output_dir": str(out), "resolution": 32, "max_steps": 2,
         "device": "cpu", "class_name": "toy", "tlora": {"rank": 8}}))
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "fresh.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tlora.safetensors of another run" in err[0] and "tlora.rank: 4 → 8" in err[0]
    steps = []
    train(cfg_for(models["sd15"], data, out, max_steps=4, resume="latest", **ours),
          on_step=lambda s, l: steps.append(s))
    assert steps == [3, 4]                                          # resumed from its own checkpoint-2, not 50
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-50"]
    assert _tree(out / "checkpoint-50") == foreign


@pytest.mark.parametrize("what", ["family", "base", "rank"])
def test_resume_across_family_base_or_rank_is_refused_in_one_line(models, data, tmp_path, capsys, what):
    train(cfg_for(models["sd15"], data, tmp_path / "a", max_steps=2, checkpointing_steps=2, validation_steps=0))
    import shutil
    base = tmp_path / "copy-of-sd15"
    shutil.copytree(models["sd15"], base)
    model, rank = {"family": (models["sdxl"], 4), "base": (str(base), 4), "rank": (models["sd15"], 8)}[what]
    (tmp_path / "c.json").write_text(json.dumps(
        {"model": model, "data_dir": data, "output_dir": str(tmp_path / "b"), "resolution": 32, "max_steps": 4,
         "device": "cpu", "validation_steps": 0, "resume": str(tmp_path / "a" / "checkpoint-2"),
         "class_name": "toy", "tlora": {"rank": rank}}))
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    says = {"family": "family: 'sd15' → 'sdxl'", "base": "model: ", "rank": "tlora.rank: 4 → 8"}[what]
    assert len(err) == 1 and "is from another run" in err[0] and says in err[0], err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("bad", [{"max_grad_norm": float("nan")}, {"max_grad_norm": -1.0}, {"adam_beta1": 2.0},
                                 {"weight_decay": -1.0}, {"learning_rate": float("inf")}, {"lr_warmup_steps": -5},
                                 {"validation_guidance": float("nan")}, {"validation_multiplier": float("inf")}])
def test_non_finite_or_out_of_range_numbers_are_refused_before_anything_is_written(models, data, tmp_path, bad):
    """The schema checks a TrainConfig built in Python as one read from a file: it cannot even be made."""
    from tlora.errors import UsageError
    with pytest.raises(UsageError, match=next(iter(bad))):
        train(cfg_for(models["sd15"], data, tmp_path / "o", **bad))
    assert not (tmp_path / "o").exists()


def test_simpletuner_config_and_seed_lycoris_json_parse_and_run(models, data, tmp_path):
    lyc = {"algo": "tlora", "multiplier": 1.0, "linear_dim": 64, "linear_alpha": 32,
           "apply_preset": {"target_module": ["Attention", "FeedForward"]}}   # the seed guide's JSON, verbatim
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "lycoris_tlora.json").write_text(json.dumps(lyc))
    st = {"model_type": "lora", "lora_type": "lycoris", "lycoris_config": "config/lycoris_tlora.json",
          "validation_lycoris_strength": 1.0, "pretrained_model_name_or_path": models["sdxl"],
          "instance_data_dir": data, "output_dir": str(tmp_path / "out"), "learning_rate": 1e-4,
          "max_train_steps": 2, "train_batch_size": 1, "resolution": 32, "validation_prompt": "a sks toy",
          "validation_steps": 100, "validation_num_inference_steps": 2, "seed": 1, "mixed_precision": "no",
          "gradient_checkpointing": True, "model_family": "sdxl", "report_to": "tensorboard"}
    (tmp_path / "config.json").write_text(json.dumps(st))
    with pytest.warns(UserWarning, match="report_to"):
        cfg = load_config(str(tmp_path / "config.json"), ["device=\"cpu\""])
    assert (cfg.tlora.rank, cfg.tlora.alpha, cfg.tlora.variant, cfg.tlora.init, cfg.tlora.sig_type) == \
        (64, 32.0, "ortho", "weight", "principal")
    # rank 64 does not fit the tiny model's 32-wide layers: lower it the way a user would
    with pytest.warns(UserWarning):
        cfg = load_config(str(tmp_path / "config.json"), ["device=\"cpu\"", "tlora.rank=8", "tlora.alpha=4"])
    assert (cfg.tlora.rank, cfg.tlora.alpha, cfg.tlora.target_module) == (8, 4.0, ("Attention", "FeedForward"))
    assert (cfg.max_steps, cfg.gradient_checkpointing, cfg.validation_prompts) == (2, True, ["a sks toy"])
    train(cfg)
    assert (tmp_path / "out" / "tlora.safetensors").is_file()
    lyc["algo"] = "lokr"
    (tmp_path / "config" / "lycoris_tlora.json").write_text(json.dumps(lyc))
    assert main(["train", "--config", str(tmp_path / "config.json")]) == 2


def test_official_readme_command_line_parses_and_runs(models, data, tmp_path, capsys):
    argv = ["train", f"--pretrained_model_name_or_path={models['sd15']}", f"--train_data_dir={data}",
            f"--output_dir={tmp_path / 'out'}", "--mixed_precision=no", "--trainer_type=ortho_lora",
            "--trainer_class=sdxl_tlora", "--num_train_epochs=2", "--checkpointing_steps=100", "--resolution=32",
            "--validation_prompts=a {0} lying in the bed#a {0} swimming", "--num_val_imgs_per_prompt=1",
            "--placeholder_token=sks", "--class_name=dog", "--seed=0", "--lora_rank=8", "--min_rank=4",
            "--sig_type=last", "--one_image=01.png", "--set", "validation_inference_steps=2", "--device", "cpu"]
    assert main(argv) == 0
    h = tlora.weights.read_header(tmp_path / "out" / "tlora.safetensors")
    c = h["config"]
    assert (c["variant"], c["init"], c["sig_type"], c["rank"], c["min_rank"], c["alpha"]) == \
        ("ortho", "random", "last", 8, 4, None)
    t = h["training"]["config"]
    assert t["validation_prompts"] == ["a {0} lying in the bed", "a {0} swimming"] and t["one_image"] == "01.png"
    assert TrainConfig.from_dict(t).resolved_validation_prompts()[1] == "a sks dog swimming"


@pytest.mark.parametrize("change,match", [
    (dict(data_dir="/nonexistent"), "data_dir not found"),
    (dict(resolution=30), "multiple of 8"),
    (dict(tlora={"rank": 0}), "rank"),
    (dict(tlora={"rank": 4, "min_rank": 5}), "min_rank"),
    (dict(one_image="missing.png"), "one_image"),
    (dict(learning_rat=1e-4), "did you mean 'learning_rate'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(models, data, tmp_path, capsys, change, match):
    cfg = {"model": models["sd15"], "data_dir": data, "output_dir": str(tmp_path / "out"), "resolution": 32,
           "max_steps": 1, "device": "cpu"}
    cfg.update(change)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not (tmp_path / "out").exists()


def test_unreadable_and_missing_images(models, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    base = {"model": models["sd15"], "data_dir": str(d), "output_dir": str(tmp_path / "out"), "resolution": 32}
    (tmp_path / "c.json").write_text(json.dumps(base))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    assert "no images" in capsys.readouterr().err
    (d / "bad.png").write_bytes(b"not an image")
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_process_cpu_run_writes_one_file_equal_across_ranks(models, data, tmp_path):
    import subprocess
    import sys
    cfg = {"model": models["sd15"], "data_dir": data, "output_dir": str(tmp_path / "out"), "resolution": 32,
           "max_steps": 3, "validation_steps": 0, "validation_inference_steps": 2, "tlora": {"rank": 4}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    import os
    import signal
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tlora", "train",
                          "--config", str(tmp_path / "c.json"), "--device", "cpu"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:      # kill torchrun and its workers: none may outlive the test (a worker in
        import psutil                      # a session of its own would hold the pipes open forever)
        for child in psutil.Process(p.pid).children(recursive=True):
            child.kill()
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
    assert p.returncode == 0, err[-2000:]
    ranks = json.loads((tmp_path / "out" / "logs" / "ranks.json").read_text())
    assert ranks["processes"] == 2 and ranks["backend"] == "gloo"
    assert len(ranks["digests"]) == 2 and ranks["digests"][0] == ranks["digests"][1]
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == ["tlora.safetensors"]
    tensors, _ = tlora.weights.read(tmp_path / "out" / "tlora.safetensors")
    from tlora.train import _digest
    net = tlora.load(tmp_path / "out" / "tlora.safetensors", build_pipeline("sd15").unet)
    assert _digest(net) == ranks["digests"][0]


def test_validation_computes_metrics_and_keeps_the_best(models, data, tmp_path):
    from tlora.testing import save_clip, save_dinov2
    save_clip(tmp_path / "clip")
    save_dinov2(tmp_path / "dino")
    cfg = cfg_for(models["sd15"], data, tmp_path / "out", max_steps=4, validation_steps=2, checkpointing_steps=2,
                  eval_clip_model=str(tmp_path / "clip"), eval_dino_model=str(tmp_path / "dino"), best_metric="IS+TS")
    train(cfg)
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert best["step"] in (2, 4) and best["metric"] == "IS+TS"
    s = best["scores"]
    assert best["value"] == pytest.approx(s["IS"] + s["TS"]) and -1 <= s["DINO_IS"] <= 1
    assert best["checkpoint"] == f"checkpoint-{best['step']}"
    h = tlora.weights.read_header(tmp_path / "out" / "tlora-best.safetensors")
    assert h["training"]["step"] == best["step"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "out" / "logs"))
    ea.Reload()
    assert {"eval/IS", "eval/TS", "eval/DINO_IS", "loss", "lr", "mean_active_rank"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("eval/TS")] == [2, 4]


@pytest.mark.parametrize("flag,value,says", [
    ("lora_rank", 0, "--lora_rank must be an integer >= 1 and <= 4096, got 0"),
    ("min_rank", 0, "--min_rank must be an integer >= 1 and <= 4096, got 0"),
    ("alpha_rank_scale", 0.0, "--alpha_rank_scale must be a finite number > 0 and <= 1000, got 0.0"),
    ("trainer_type", "", "--trainer_type must be one of"),
    ("sig_type", "", "--sig_type must be one of"),
    ("num_train_epochs", 0, "--num_train_epochs must be an integer >= 1 and <= 10000000, got 0"),
])
def test_official_flags_given_as_zero_or_empty_are_errors_not_defaults(flag, value, says):
    """'absent' and 'zero' differ: --lora_rank 0 is an error, never the default 64."""
    from tlora.errors import UsageError
    from tlora.trainconfig import from_official
    with pytest.raises(UsageError) as e:
        from_official({"pretrained_model_name_or_path": "m", "train_data_dir": "d", flag: value}).validate()
    assert says in str(e.value)


def test_a_busy_output_folder_is_refused_and_a_stale_lock_taken_over(models, data, tmp_path):
    """OUT/.tlora.lock names the running process: another live process's lock refuses the run in one line
    (nothing else written); a lock left by a dead process is taken over; a finished run removes its lock."""
    import os
    from tlora.errors import UsageError
    out = tmp_path / "o"
    out.mkdir()
    (out / ".tlora.lock").write_text(str(os.getppid()))            # a live process that is not this one
    with pytest.raises(UsageError, match=f"in use by another tlora run \\(pid {os.getppid()}\\)"):
        train(cfg_for(models["sd15"], data, out, max_steps=1, validation_steps=0))
    assert [p.name for p in out.iterdir()] == [".tlora.lock"]
    (out / ".tlora.lock").write_text("999999999")                   # no such process
    train(cfg_for(models["sd15"], data, out, max_steps=1, validation_steps=0))
    assert (out / "tlora.safetensors").is_file() and not (out / ".tlora.lock").exists()


def test_tlora_train_start_prints_no_torchvision_fallback_warnings(models, data, tmp_path):
    """transformers' "`CLIPImageProcessor` requires torchvision" lines (once per processor diffusers imports) and
    diffusers' same-dtype cast warning are gone at the source: stderr holds only the progress bar."""
    import subprocess
    import sys
    (tmp_path / "c.json").write_text(json.dumps(
        {"model": models["sd15"], "data_dir": data, "output_dir": str(tmp_path / "out"), "resolution": 32,
         "max_steps": 1, "num_validation_images": 0, "device": "cpu", "tlora": {"rank": 4}}))
    r = subprocess.run([sys.executable, "-m", "tlora", "train", "--config", str(tmp_path / "c.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torchvision" not in r.stderr and "float32" not in r.stderr, r.stderr


def test_lr_scheduler_names_are_diffusers_own():
    from diffusers.optimization import SchedulerType
    from tlora.trainconfig import LR_SCHEDULERS
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_a_second_concurrent_run_into_the_same_folder_is_refused_in_one_line(models, data, tmp_path):
    """While a run trains (here, at its first step), `tlora train` with the same output_dir in another process
    exits 2 with one line naming the running process, and the running run finishes untouched."""
    import os
    import subprocess
    import sys
    cfg = {"model": models["sd15"], "data_dir": data, "output_dir": str(tmp_path / "out"), "resolution": 32,
           "max_steps": 2, "num_validation_images": 0, "device": "cpu", "tlora": {"rank": 4}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    second = {}

    def start_another(step, loss):
        if step == 1:
            second["r"] = subprocess.run([sys.executable, "-m", "tlora", "train", "--config", str(tmp_path / "c.json")],
                                         capture_output=True, text=True, timeout=300)
    final = train(load_config(str(tmp_path / "c.json"), []), on_step=start_another)
    r = second["r"]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert f"in use by another tlora run (pid {os.getpid()})" in lines[0]
    assert final.is_file() and not (tmp_path / "out" / ".tlora.lock").exists()
