"""Nothing is lost and nothing silently changes: one test per data-loss scenario of the run folder and of a
command whose output is one of its inputs, and SIGINT / SIGTERM keeping the work of a run.

Every refusal is one line on stderr, exit 2, and every file that was there before is byte-identical after.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import tlora
import tlora.train
from tlora.cli import main
from tlora.testing import build_pipeline

from conftest import tiny_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    tiny_world(root)
    return root


def config(world, out, **kw):
    d = {"model": str(world / "model"), "data_dir": str(world / "data"), "output_dir": str(out), "resolution": 32,
         "max_steps": 2, "checkpointing_steps": 1, "checkpoints_total_limit": None, "validation_steps": 0,
         "num_validation_images": 0, "device": "cpu", "tlora": {"rank": 4}, **kw}
    return d


def write_config(path, d):
    path.write_text(json.dumps(d))
    return str(path)


def tree(p: Path):
    """Every file under ``p`` with its bytes (None when ``p`` does not exist)."""
    if not p.exists():
        return None
    return {str(q.relative_to(p)): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}


def refused(capsys, argv, says):
    """``tlora argv`` exits 2 with one stderr line containing ``says``."""
    capsys.readouterr()
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and says in err[0] and "Traceback" not in err[0], (rc, err)
    return err[0]


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished 2-step run (checkpoints 1 and 2, final weights), to copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--config", write_config(out.parent / "c.json", config(world, out))]) == 0
    return out


# -- the run folder -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_steps", [2, 1, 4])
def test_a_rerun_into_a_finished_run_is_refused_and_changes_nothing(world, finished, tmp_path, capsys, max_steps):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = tree(out)
    c = write_config(tmp_path / "c.json", config(world, out, max_steps=max_steps))
    line = refused(capsys, ["train", "--config", c], "holds a finished run")
    assert "--resume latest" in line and "--overwrite" in line
    assert tree(out) == before


def test_an_unfinished_run_of_this_config_is_not_restarted_silently(world, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "tlora.safetensors").unlink()
    shutil.rmtree(out / "checkpoint-2")
    before = tree(out)
    refused(capsys, ["train", "--config", write_config(tmp_path / "c.json", config(world, out, max_steps=4))],
            "this run's checkpoint-1")
    assert tree(out) == before


def test_resume_continues_a_finished_run_to_more_steps(world, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    steps = []
    cfg = tlora.trainconfig.TrainConfig.from_dict(config(world, out, max_steps=4, resume="latest"))
    tlora.train.train(cfg, on_step=lambda s, loss: steps.append(s))
    assert steps == [3, 4]
    assert tlora.weights.read_header(out / "tlora.safetensors")["training"]["config"]["max_steps"] == 4


def test_overwrite_trains_again_from_step_0_and_removes_only_its_own_results(world, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-7").mkdir()                               # a user's folder named like a checkpoint…
    (out / "checkpoint-7" / "x.txt").write_text("keep")          # … is not this run's: refused even with overwrite
    c = write_config(tmp_path / "c.json", config(world, out, max_steps=1))
    assert main(["train", "--config", c, "--overwrite"]) == 2
    shutil.rmtree(out / "checkpoint-7")
    assert main(["train", "--config", c, "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]   # the old checkpoint-2 went
    assert (out / "notes.txt").read_text() == "mine"
    assert tlora.weights.read_header(out / "tlora.safetensors")["training"]["config"]["max_steps"] == 1


def test_another_runs_final_weights_are_never_overwritten(world, finished, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(finished / "tlora.safetensors", out / "tlora.safetensors")     # final weights only, no checkpoints
    before = tree(out)
    c = write_config(tmp_path / "c.json", config(world, out, tlora={"rank": 8}))
    for extra in ([], ["--overwrite"]):
        refused(capsys, ["train", "--config", c, *extra], "tlora.safetensors of another run (tlora.rank: 4 → 8)")
    assert tree(out) == before


def test_resume_latest_never_replaces_a_folder_of_another_run_or_user_named_like_a_checkpoint(world, finished,
                                                                                              tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "holiday.jpg").write_bytes(b"a user's photo")
    before = tree(out)
    c = write_config(tmp_path / "c.json", config(world, out, max_steps=4))
    refused(capsys, ["train", "--config", c, "--resume", "latest"], "would write checkpoint-3 at step 3")
    assert tree(out) == before
    c = write_config(tmp_path / "c2.json", config(world, out, max_steps=4, checkpointing_steps=2))
    assert main(["train", "--config", c, "--resume", "latest"]) == 0      # step 3 writes no checkpoint: allowed
    assert (out / "checkpoint-3" / "holiday.jpg").read_bytes() == b"a user's photo"


def test_resume_with_no_checkpoint_is_an_error_not_a_fresh_start(world, tmp_path, capsys):
    out = tmp_path / "run"
    c = write_config(tmp_path / "c.json", config(world, out))
    refused(capsys, ["train", "--config", c, "--resume", "latest"], "holds no checkpoint of this run")
    assert not out.exists()
    refused(capsys, ["train", "--config", c, "--resume", "latest", "--overwrite"], "not both")


def test_official_flags_resume_to_more_epochs(world, tmp_path):
    out = tmp_path / "off"
    flags = [f"--pretrained_model_name_or_path={world / 'model'}", f"--train_data_dir={world / 'data'}",
             f"--output_dir={out}", "--trainer_type=ortho_lora", "--class_name=dog", "--placeholder_token=sks",
             "--lora_rank=4", "--min_rank=2", "--resolution=32", "--checkpointing_steps=1",
             "--num_val_imgs_per_prompt=0", "--device", "cpu"]
    assert main(["train", *flags, "--num_train_epochs=1"]) == 0
    assert main(["train", *flags, "--num_train_epochs=2", "--resume", "latest"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink loop", "lock is a folder"])
def test_a_broken_output_dir_is_refused_before_the_model_loads(world, tmp_path, capsys, monkeypatch, kind):
    out = tmp_path / "run"
    if kind == "dangling symlink":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "symlink loop":
        out.symlink_to(tmp_path / "run")
    else:
        (out / ".tlora.lock").mkdir(parents=True)
    monkeypatch.setattr(tlora.train, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    says = ".tlora.lock" if kind == "lock is a folder" else "symlink"
    refused(capsys, ["train", "--config", write_config(tmp_path / "c.json", config(world, out))], says)
    assert os.path.lexists(out)


def test_checkpoint_files_follow_the_umask(world, finished):
    modes = {p.name: p.stat().st_mode & 0o777 for p in (finished / "checkpoint-1").iterdir()}
    want = 0o666 & ~_umask()
    assert modes == {"tlora.safetensors": want, "state.safetensors": want, "state.json": want}, modes


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


# -- a command whose output is one of its inputs -----------------------------------------------------------------
@pytest.mark.parametrize("link", [False, True])
def test_no_command_writes_over_its_input(world, tmp_path, capsys, link):
    """convert onto its input, inspect --plot onto the weights, evaluate --out onto a reference image or a
    generated image; through a symlink too. Every input keeps its bytes."""
    w = tmp_path / "w.safetensors"
    shutil.copy(world / "w.safetensors", w)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "imgs" / "0.png")
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 9, 9)).save(ref)

    def target(p):
        if not link:
            return str(p)
        q = tmp_path / f"link-to-{p.name}"
        if not q.is_symlink():
            q.symlink_to(p)
        return str(q)
    before = {p: p.read_bytes() for p in (w, ref, tmp_path / "imgs" / "0.png")}
    refused(capsys, ["convert", str(w), target(w), "--to", "diffusers"], "is the input")
    refused(capsys, ["inspect", str(w), "--plot", target(w)], "is the input")
    ev = ["evaluate", "--images", str(tmp_path / "imgs"), "--reference", str(ref), "--clip", "none", "--dino", "none"]
    refused(capsys, ev + ["--out", target(ref)], "is the input")
    refused(capsys, ev + ["--out", target(tmp_path / "imgs" / "0.png")], "input")
    assert {p: p.read_bytes() for p in before} == before


def test_demo_over_an_earlier_demo_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "T-LoRA").mkdir(parents=True)
    (out / "lora-vs-tlora.png").write_bytes(b"an earlier demo")
    before = tree(out)
    refused(capsys, ["demo", "--out", str(out), "--steps", "1"], "--overwrite")
    assert tree(out) == before


def test_a_placeholder_token_cannot_make_official_inference_write_outside_samples(world, tmp_path):
    import yaml
    from safetensors.torch import save_file
    from conftest import official_checkpoint
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    unet = build_pipeline("sd15").unet
    save_file(official_checkpoint(unet, "ortho_lora", 4), str(run / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    hp = {"pretrained_model_name_or_path": str(world / "model"), "output_dir": str(run), "trainer_class": "sdxl_tlora",
          "trainer_type": "ortho_lora", "lora_rank": 4, "min_rank": 2, "alpha_rank_scale": 1.0,
          "placeholder_token": "../../../../ESCAPED", "class_name": "dog"}
    (run / "logs").mkdir()
    (run / "logs" / "hparams.yml").write_text(yaml.safe_dump(hp))
    assert main(["generate", "--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "1",
                 "--prompts", "a {0}", "--num_images_per_prompt", "1", "--num_inference_steps", "1"]) == 0
    written = [p for p in tmp_path.rglob("*.png")]
    samples = run / "checkpoint-1" / "samples"
    assert written and all(samples in p.parents for p in written), written
    assert not list(tmp_path.rglob("ESCAPED"))


# -- interruption ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_saves_the_step_and_resume_is_bit_identical(world, tmp_path, capsys, monkeypatch, sig, code):
    """The signal arrives during step 2 of 4 (checkpointing_steps 100: no checkpoint would be written): the step
    finishes, checkpoint-2 is saved, one line names it and the resume command, exit 128 + signal; resuming gives
    the weights of an uninterrupted run bit for bit."""
    whole = tmp_path / "whole"
    d = dict(max_steps=4, checkpointing_steps=100)
    assert main(["train", "--config", write_config(tmp_path / "w.json", config(world, whole, **d))]) == 0
    out = tmp_path / "run"
    c = write_config(tmp_path / "c.json", config(world, out, **d))
    real = tlora.train.train_step

    def step_with_signal(run, data, opt, acc, step, last):
        result = real(run, data, opt, acc, step, last)
        if step == 1:
            os.kill(os.getpid(), sig)
        return result
    monkeypatch.setattr(tlora.train, "train_step", step_with_signal)
    capsys.readouterr()
    assert main(["train", "--config", c]) == code
    lines = capsys.readouterr().err.splitlines()
    err = [ln for ln in lines if ln.startswith("tlora train: stopped")]
    assert len(err) == 1 and "checkpoint-2" in err[0] and f"--config {c} --resume latest" in err[0], lines
    assert not [ln for ln in lines if ": error:" in ln or ": failed:" in ln or "Traceback" in ln], lines
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "tlora.safetensors").exists() and not (out / ".tlora.lock").exists()
    monkeypatch.setattr(tlora.train, "train_step", real)
    assert main(["train", "--config", c, "--resume", "latest"]) == 0
    a, _ = tlora.weights.read(whole / "tlora.safetensors")
    b, _ = tlora.weights.read(out / "tlora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler          # handlers are back


def test_the_hostile_table_does_not_need_lycoris():
    code = ("import sys; sys.modules['lycoris'] = None; sys.path[:0] = ['tests', '.']; "
            "import test_hostile_inputs, test_official, test_trust; print(len(test_hostile_inputs.CASES))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout.split()[-1]) >= 100, r.stderr[-2000:]


# -- a failed library call leaves the model as it was -----------------------------------------------------------
def _state(model):
    """Every tensor of ``model`` (bytes), its hooks and its submodule names: what a failed call must not change."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    return tensors, hooks, sorted(n for n, _ in model.named_modules())


def _same(a, b):
    return a[1] == b[1] and a[2] == b[2] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k])
                                                                                 for k in a[0])


@pytest.mark.parametrize("kwargs", [{"multiplier": "x"}, {"multiplier": float("nan")}, {"multiplier": True},
                                    {"fold": "sometimes"}, {"mask": "yes"}])
def test_a_failed_attach_leaves_the_pipeline_as_it_was(world, kwargs):
    pipe = build_pipeline("sd15")
    before = _state(pipe.unet)
    with pytest.raises(ValueError):
        tlora.attach(pipe, world / "w.safetensors", **kwargs)
    assert _same(before, _state(pipe.unet))
    net = tlora.inject(pipe.unet, tlora.TLoRAConfig(rank=4))      # a network of the caller's: left as it was too
    with_net = _state(pipe.unet)
    with pytest.raises(ValueError):
        tlora.attach(pipe, net, **kwargs)
    assert _same(with_net, _state(pipe.unet)) and net.multiplier == 1.0


def test_a_failed_inject_or_load_leaves_the_model_as_it_was(world, tmp_path):
    unet = build_pipeline("sd15").unet
    before = _state(unet)
    taken = next(n for n, m in unet.named_modules() if n.endswith("attn2.to_v"))
    blocker = tlora.inject(unet, tlora.TLoRAConfig(rank=4, target_module=(), target_name=(taken,)))
    blocked = _state(unet)
    with pytest.raises(ValueError, match="already has a T-LoRA adapter"):
        tlora.inject(unet, tlora.TLoRAConfig(rank=4))           # the last target is taken: nothing is injected
    assert _same(blocked, _state(unet))
    blocker.remove()
    assert _same(before, _state(unet))
    bad = tmp_path / "bad.safetensors"
    tensors, meta = tlora.weights.read(world / "w.safetensors")
    k = sorted(tensors)[-1]
    tensors[k] = torch.zeros(1, 1)
    from safetensors.torch import save_file
    save_file(tensors, str(bad), metadata={"tlora": meta["tlora"]})
    for path in (bad, tmp_path / "missing.safetensors"):
        with pytest.raises(ValueError):
            tlora.load(path, unet)
        assert _same(before, _state(unet))


def test_multipliers_are_checked_and_a_removed_network_cannot_be_saved_or_attached(world, tmp_path):
    pipe = build_pipeline("sd15")
    net = tlora.inject(pipe.unet, tlora.TLoRAConfig(rank=4))
    for bad in (float("nan"), float("inf"), "2", True, None):
        with pytest.raises(ValueError, match="multiplier"):
            net.multiplier = bad
    assert net.multiplier == 1.0
    net.remove()
    with pytest.raises(ValueError, match="removed"):
        tlora.save(net, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="removed"):
        tlora.attach(pipe, net)
    assert not (tmp_path / "w.safetensors").exists()


# -- the machine and the environment ------------------------------------------------------------------------------
def test_an_ascii_terminal_gets_escapes_not_a_crash(world):
    """inspect prints α: with PYTHONIOENCODING=ascii it is escaped, exit 0, no traceback."""
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    r = subprocess.run([sys.executable, "-m", "tlora", "inspect", str(world / "w.safetensors")], env=env,
                       capture_output=True, text=True, encoding="ascii", errors="replace")
    assert r.returncode == 0 and "Traceback" not in r.stderr and "\\u03b1" in r.stdout, r.stderr[-1000:]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()[:100]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(world, tmp_path, tiny_disk, capsys):
    w = tmp_path / "big.safetensors"          # larger than the disk: the write fails part-way
    net = tlora.inject(build_pipeline("sd15").unet, tlora.TLoRAConfig(rank=16))
    tlora.save(net, w)
    assert w.stat().st_size > 256 * 1024
    capsys.readouterr()
    rc = main(["convert", str(w), str(tiny_disk / "out.safetensors"), "--to", "tlora"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 1 and len(err) == 1 and "failed" in err[0] and "Traceback" not in err[0], err
    assert list(tiny_disk.iterdir()) == []                   # no temporary file, no half file


DROP_AND_RUN = """
import os, sys
import tlora.cli, tlora.train, tlora.quantize, tlora.processors
tlora.quantize.import_backends(); tlora.processors.use_pil_image_processors()
import diffusers, transformers
tlora.trainconfig.TrainConfig()        # pydantic builds (and imports) its validators when first used
os.setgroups([]); os.setgid(65534); os.setuid(65534)      # everything imported: now an unprivileged user
sys.exit(tlora.cli.main(sys.argv[1:]))
"""


def test_permissions_are_bad_input_exit_2(world, tmp_path):
    """As an unprivileged user (the process drops root after its imports; skipped where it is not root): an
    unreadable config and an unreadable data_dir are one line, exit 2, nothing written."""
    import tempfile
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user after the imports")
    root = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        root.chmod(0o777)
        (root / "data").mkdir()
        (root / "data").chmod(0o000)
        c = root / "c.json"
        c.write_text(json.dumps({"model": "org/model", "data_dir": str(root / "data"), "output_dir": str(root / "o")}))
        c.chmod(0o644)
        secret = root / "secret.json"
        secret.write_text("{}")
        secret.chmod(0o000)
        runs = [(subprocess.Popen([sys.executable, "-c", DROP_AND_RUN, "train", "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root), says)
                for config, says in ((secret, "Permission denied"), (c, "Permission denied"))]   # side by side
        for proc, says in runs:
            _, stderr = proc.communicate(timeout=300)
            err = [ln for ln in stderr.splitlines() if ln.startswith("tlora")]
            assert proc.returncode == 2 and len(err) == 1 and says in err[0] and "Traceback" not in stderr, \
                stderr[-800:]
        assert not (root / "o").exists()
    finally:
        (root / "data").chmod(0o755)
        shutil.rmtree(root)
