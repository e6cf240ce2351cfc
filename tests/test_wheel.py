"""The package as a user installs it: ``python -m build`` gives an sdist and a wheel holding tlora and what
``tlora demo`` and ``--model toyworld`` need, nothing of the repository's research, tests or benchmarks; the
wheel installs into a fresh venv (no index: every dependency must already be satisfied by the pinned set this
suite runs on) and its commands run from there."""
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import source_copy

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = ("research/", "tests/", "benchmarks/", "toyworld-textured", "tlora/toyworld/pretrain.py",
               "tlora/toyworld/textured.py", "tlora/toyworld/tradeoff.py")
def _deps_view(dest: Path) -> Path:
    """This interpreter's site-packages as links, less tlora itself: the dependencies a fresh venv is given (pip among them: a
    venv made without pip uses this one)."""
    dest.mkdir()
    for item in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not item.name.lower().startswith(("tlora", "__editable__", "_tlora")):
            (dest / item.name).symlink_to(item)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_copy(tmp / "src")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,), (sdist,) = (tmp / "dist").glob("*.whl"), (tmp / "dist").glob("*.tar.gz")
    return tmp, wheel, sdist


def test_the_wheel_holds_the_package_and_the_demo_model_only(built):
    _, wheel, sdist = built
    import tlora
    assert wheel.name == f"tlora-{tlora.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if any(x in n for x in NOT_SHIPPED)]
    assert {"tlora/cli.py", "tlora/demo.py", "tlora/toyworld/world.py", "tlora/toyworld/experiment.py",
            "tlora/assets/toyworld/model_index.json", "tlora/assets/toyworld/unet/diffusion_pytorch_model.safetensors",
            "tlora/assets/concept.png"} <= set(names)
    assert any(n.startswith("tlora/assets/configs/") and n.endswith(".json") for n in names)
    assert wheel.stat().st_size < 15 * 2**20           # the flat world's 11 MB model and the code
    # the sdist is the source (tests and research included, as a source release is), without build outputs
    members = tarfile.open(sdist).getnames()
    assert any(m.endswith("/src/tlora/cli.py") for m in members)
    assert not any(".venv/" in m or "/site/" in m or "__pycache__" in m for m in members)


def test_the_wheel_installs_in_a_fresh_venv_and_its_commands_run(built, tmp_path):
    tmp, wheel, _ = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_deps.pth").write_text(str(_deps_view(tmp_path / "deps")) + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{wheel}[quantize,comfyui,plot,ui]"],
                          capture_output=True, text=True, env=env, timeout=600)       # the extras resolve too
    assert inst.returncode == 0, inst.stderr[-2000:]
    run = lambda *argv: subprocess.run([str(venv / "bin" / "tlora"), *argv], capture_output=True, text=True,  # noqa
                                       env=env, cwd=tmp_path, timeout=900)
    where = subprocess.run([str(py), "-c", "import tlora; print(tlora.__file__)"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(purelib), where.stdout + where.stderr
    assert run("--help").returncode == 0
    memory = run("memory", "--model", "flux1-dev")
    assert memory.returncode == 0 and "flux" in memory.stdout.lower(), memory.stderr
    demo = run("demo", "--steps", "2", "--rank", "4", "--out", "demo")
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "demo" / "lora-vs-tlora.png").is_file() and "T-LoRA" in demo.stdout
    # the study's model is the repository's, not the wheel's: one line says where it is
    textured = run("train", "--model", "toyworld-textured", "--image", str(ROOT / "src/tlora/assets/concept.png"),
                   "--placeholder", "sks", "--class", "shape", "--steps", "1", "--out", "t")
    assert textured.returncode == 2 and textured.stderr.strip().splitlines() == [
        "tlora train: error: toyworld-textured is the toy-world study's model and is not installed with tlora; "
        "clone the repository and pass its research/models/toyworld-textured folder"]
    assert not (tmp_path / "t").exists()
