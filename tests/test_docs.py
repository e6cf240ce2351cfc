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
