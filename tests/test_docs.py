"""The README leads and the docs hold the rest: the README is short, every relative link in it and in docs/
points at a file that exists, and every ``tlora`` command line in their code blocks parses with today's flags."""
import re
import shlex
from pathlib import Path

import pytest

from tlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_is_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [ln.split("#")[0] for ln in links if not ln.startswith(("http://", "https://", "#", "mailto:"))]
    missing = [ln for ln in local if ln and not (page.parent / ln).exists()]
    assert not missing, missing


def _commands(page: Path):
    """Every ``tlora …`` line of the page's bash code blocks, comments and continuations handled."""
    out, block, inside = [], [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside and line.strip() in ("```bash", "```sh")
            continue
        if inside:
            block.append(line)
    joined = "\n".join(block).replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("tlora ") and "|" not in line and "…" not in line and "..." not in line:
            out.append(line)
    return out


COMMANDS = [(p, c) for p in PAGES for c in _commands(p)]


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p.name}:{c[:50]}" for p, c in COMMANDS])
def test_every_command_in_the_docs_parses(page, command):
    argv = shlex.split(command)[1:]
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]


def test_the_docs_name_every_subcommand():
    parser = build_parser()
    names = next(a for a in parser._actions if a.dest == "command").choices
    named = {shlex.split(c)[1] for _, c in COMMANDS}
    assert set(names) - {"settings"} <= named | {"demo"}, set(names) - named


def _lines(prefix: str):
    """Every line of the pages' bash code blocks that starts with ``prefix`` (continuations joined)."""
    out = []
    for page in PAGES:
        text = re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S)
        for line in "\n".join(text).replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefix):
                out.append(line)
    return out


PYTHON_M = sorted(set(_lines("python -m ")))
MAKE = sorted(set(_lines("make ")))


@pytest.mark.parametrize("command", PYTHON_M, ids=[c[:60] for c in PYTHON_M])
def test_every_python_module_command_in_the_docs_parses(command, capsys):
    # the module imports and its own parser takes the line's flags (with --help added, so nothing runs)
    import importlib
    argv = shlex.split(command)[2:]
    module = importlib.import_module(argv[0])
    entry = getattr(module, "main", None) or importlib.import_module(argv[0] + ".__main__").main   # python -m build
    with pytest.raises(SystemExit) as e:
        entry(argv[1:] + ["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_every_make_target_in_the_docs_exists():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {shlex.split(c)[1] for c in MAKE}
    assert named >= {"demo", "test", "docs"} and named <= targets, named - targets


def test_no_install_line_asks_the_package_index_for_tlora():
    # tlora is installed from the repository; "pip install tlora[...]" would fail on a fresh machine
    asks = re.compile(r"""pip install (-\S+ )*["']?tlora(\[|["'\s]|$)""")
    lines = [c for c in _lines("pip install") + _lines("path/to/ComfyUI/python -m pip install") if asks.search(c)]
    assert lines and all("@ git+" in c for c in lines), lines


def _mkdocs(config: Path, site: Path):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d",
                           str(site)], capture_output=True, text=True, timeout=300)


def test_the_docs_site_builds_in_strict_mode_and_a_broken_link_fails_it(tmp_path):
    import shutil
    done = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-2000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert all(f'id="tlora.{name}"' in api for name in ("attach", "inject", "timestep_mask", "save", "load"))
    # the same site with one broken link does not build: strict mode is on
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "docs" / "demo.md").write_text((copy / "docs" / "demo.md").read_text() + "\n[gone](no-such-page.md)\n")
    config = copy / "mkdocs.yml"
    config.write_text(config.read_text().replace("paths: [src]", f"paths: [{ROOT / 'src'}]"))
    broken = _mkdocs(config, tmp_path / "site2")
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr
