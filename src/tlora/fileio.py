"""Files on disk, done one way for the whole package.

* Every write goes to a temporary name in the target folder and is renamed into place, so a reader (or a
  crash) never sees half a file: :func:`atomic_write`, and on it :func:`write_json`, :func:`save_png`.
* JSON and YAML mappings (configs, ``hparams.yml``) are read with one-line errors: :func:`read_mapping`.
* An exception shown to a user is its first line: :func:`first_line`.
* What counts as an image file (:data:`IMAGE_EXTS`) and as a hub id rather than a local path
  (:func:`looks_like_hub_id`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Type

import yaml


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (one slash, not a relative or absolute path): what a model hub would be asked for."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(path: os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would (0666 / 0777 less the umask): temporary files and
    folders are created 0600 / 0700, and that mode would survive their rename."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(temporary path)`` in ``path``'s folder (created if needed), then rename onto ``path`` with the
    mode a plain ``open`` would give (0666 less the umask; mkstemp's 0600 would survive the rename).
    On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj, path: os.PathLike) -> Path:
    """``obj`` as indented JSON (non-JSON values via ``str``), written atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))


def save_png(image, path: os.PathLike) -> Path:
    """A PIL image as PNG, written atomically."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def read_mapping(path: os.PathLike, what: str, error: Type[Exception] = ValueError, kind: str = "json") -> dict:
    """The mapping a ``kind`` ("json" or "yaml", parsed with ``yaml.safe_load``) file holds. Anything else — a
    missing file, bad syntax, bad UTF-8, a list — raises ``error`` with one line naming ``what`` and the path."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {path}")
    is_yaml = kind == "yaml"
    try:
        text = p.read_text(encoding="utf-8")
        d = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        kind = "readable YAML" if is_yaml else "valid JSON"
        raise error(f"{what} {path} is not {kind}: {first_line(e) if is_yaml else e}") from None
    if not isinstance(d, dict):
        raise error(f"{what} {path} is not a YAML mapping" if is_yaml else f"{what} {path} must hold a JSON object")
    return d
