"""Files on disk, done one way for the whole package.

* Every write goes to a temporary name in the target folder and is renamed into place, so a reader (or a
  crash) never sees half a file: :func:`atomic_write`, and on it :func:`write_json`, :func:`save_png`.
* JSON and YAML mappings (configs, ``hparams.yml``) are read with one-line errors: :func:`read_mapping`.
* Text files a user hands in (captions, prompt lists) are read as UTF-8 with one-line errors: :func:`read_text`.
* Every output location of every command is checked before any work by one function, :func:`check_output`,
  which knows the command's inputs (an output that is an input, a dangling symlink, a folder where a file is
  wanted, a place nothing can be created); names built from user or file data go through :func:`safe_name`;
  paths in messages through :func:`show` (quoted, so a newline cannot split the one line).
* An exception shown to a user is its first line: :func:`first_line`.
* What counts as an image file (:data:`IMAGE_EXTS`) and as a hub id rather than a local path
  (:func:`looks_like_hub_id`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Type

import yaml

from .errors import UsageError


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# short names of toy pipelines → their folder: shipped inside the package, or (the study's) in the repository only
SHIPPED_MODELS = {"toyworld": "toyworld"}
REPOSITORY_MODELS = {"toyworld-textured": "research/models/toyworld-textured"}


def model_path(name: str) -> str:
    """A ``model`` argument as diffusers takes it: a shipped model's short name (``toyworld``) becomes its folder
    inside the package; ``toyworld-textured`` its folder in a source checkout of tlora (it is the study's model,
    not installed with the package); a local folder or hub id stays as it is."""
    if Path(name).exists():
        return name
    if name in SHIPPED_MODELS:
        from importlib import resources
        return str(resources.files("tlora") / "assets" / SHIPPED_MODELS[name])
    if name in REPOSITORY_MODELS:
        folder = Path(__file__).resolve().parents[2] / REPOSITORY_MODELS[name]
        if not (folder / "model_index.json").is_file():
            raise UsageError(f"{name} is the toy-world study's model and is not installed with tlora; clone the "
                             f"repository and pass its {REPOSITORY_MODELS[name]} folder")
        return str(folder)
    return name


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


def write_files(folder: os.PathLike, writers: Dict[str, Callable[[str], None]]) -> Path:
    """Several files written as one unit into ``folder``: each ``writers[name](temporary path)`` writes into a
    temporary folder; only when all have been written are they moved in (the whole folder renamed into place when
    ``folder`` did not exist; else file by file, the last name last). On any error nothing of them is left."""
    folder = Path(folder)
    fresh = not folder.exists()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent if fresh else folder))
    moved: list = []
    try:
        for name, write in writers.items():
            write(str(tmp / name))
            plain_mode(tmp / name)
        if fresh:
            plain_mode(tmp, directory=True)
            os.rename(tmp, folder)
            return folder
        for name in writers:
            os.replace(tmp / name, folder / name)
            moved.append(folder / name)
        tmp.rmdir()
    except BaseException:
        for m in moved:
            m.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_json(obj, path: os.PathLike) -> Path:
    """``obj`` as indented, strict JSON (non-JSON values via ``str``; NaN and inf are an error, never written),
    written atomically."""
    text = json.dumps(obj, indent=2, default=str, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def show(path) -> str:
    """A path as a one-line message prints it: quoted, control characters (a newline) escaped."""
    return repr(str(path))


def _real(path) -> Path:
    return Path(os.path.realpath(path))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(path: os.PathLike, what: str, folder: bool, inputs: Iterable = (), writes: Iterable[str] = ()
                 ) -> Path:
    """The one check every output location of every command goes through, before any work. Raises UsageError
    (one line) for an output ``path`` (a folder when ``folder``, else a file) that

    * is a symlink to nothing or a symlink loop, or lies below one;
    * is the wrong kind of thing (a folder where a file is wanted, ...), lies below a file, or lies where
      nothing can be created (probed with a temporary folder, removed again);
    * is, or resolves through symlinks to, one of the command's ``inputs`` (files or folders; names that are
      not on disk, such as hub ids, are skipped), or would replace a file inside an input folder;
    * is a folder holding an input file under one of the names the command ``writes`` there.
    """
    try:
        return _check_output(Path(path), what, folder, inputs, set(writes))
    except OSError as e:          # a name too long, a component that is not a folder, ...: the path is the problem
        raise UsageError(f"{what} {show(path)} cannot be used: {e.strerror or e}") from None


def _check_output(p: Path, what: str, folder: bool, inputs: Iterable, writes: set) -> Path:
    path = p
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} {show(path)} is not a valid UTF-8 name (logs and JSON files need one); rename "
                         "it") from None
    for q in (p, *p.parents):
        if os.path.lexists(q) and not q.exists():
            raise UsageError(f"{what} {show(path)}: {show(q)} is a symlink to nothing (or a symlink loop); remove it "
                             "or give another path")
    if p.exists() and p.is_dir() != folder:
        raise UsageError(f"{what} {show(path)} is {'a file' if folder else 'a folder'}; give "
                         f"{'a folder' if folder else 'a file name'}")
    parent = p if folder else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {show(path)} cannot be created: {show(parent)} is a file")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    long = next((part for part in p.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:      # caught here, not when the first file is written after the model loaded
        raise UsageError(f"{what} {show(path)} cannot be created: a name in it is over {name_max} bytes")
    try:
        Path(tempfile.mkdtemp(prefix=".tlora-probe.", dir=parent)).rmdir()
    except OSError as e:
        raise UsageError(f"{what} {show(path)} is not writable: {e.strerror} in {show(parent)}") from None
    _check_not_an_input(p, what, folder, inputs, writes)
    return p


def _check_not_an_input(p: Path, what: str, folder: bool, inputs: Iterable, writes: set) -> None:
    out = _real(p)
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        src = _real(given)
        if out == src:
            raise UsageError(f"{what} {show(p)} is the input {show(given)}: it would be overwritten; give another "
                             f"{'folder' if folder else 'file name'}")
        if src.is_dir() and not folder and p.exists() and _inside(out, src):
            raise UsageError(f"{what} {show(p)} would replace a file of the input folder {show(given)}; give "
                             "another file name")
        if folder and src.parent == out and src.name in writes:
            raise UsageError(f"{what} {show(p)} holds the input {show(given)}, which this command would "
                             "overwrite; give another folder")


def remove_own(folder: Path, names: Iterable[str]) -> None:
    """Remove the entries ``names`` of ``folder`` (what a command itself wrote there earlier, for its
    ``--overwrite``); a symlink is unlinked, never followed; nothing else is touched."""
    for name in names:
        q = Path(folder) / name
        if q.is_symlink() or q.is_file():
            q.unlink()
        elif q.is_dir():
            shutil.rmtree(q)


def safe_name(text: str, what: str) -> str:
    """``text`` (from a user or a file: a prompt, a placeholder token) as one file or folder name that cannot
    leave the folder it is put in: path separators, NUL and control characters become ``_``; ``.`` / ``..`` and
    names over 255 bytes are refused (UsageError naming ``what``)."""
    name = "".join("_" if c in "/\\\0" or ord(c) < 32 else c for c in text).strip()
    if name in ("", ".", "..") or len(name.encode("utf-8", "surrogateescape")) > 255:
        raise UsageError(f"{what} {text!r} cannot name a folder (empty, '.', '..' or over 255 bytes)")
    return name


def read_text(path: os.PathLike, what: str) -> str:
    """A UTF-8 text file a user gave (a caption, a prompt list); UsageError in one line when it is missing, a
    folder or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} not found: {path}" if not p.exists() else f"{what} {path} is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None


def save_png(image, path: os.PathLike, text: Optional[Dict[str, str]] = None) -> Path:
    """A PIL image as PNG, written atomically; ``text``: tEXt chunks (e.g. the settings that made it)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), suffix=".png")


def read_mapping(path: os.PathLike, what: str, error: Type[Exception] = ValueError, kind: str = "json",
                 lists: bool = False) -> dict:
    """The mapping a ``kind`` ("json" or "yaml", parsed with ``yaml.safe_load``) file holds (or a list, when
    ``lists``). Anything else — a missing file, bad syntax, bad UTF-8, nesting deep enough to exhaust the parser,
    a list — raises ``error`` with one line naming ``what`` and the path."""
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
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be a config") from None
    if lists and isinstance(d, list):
        return d
    if not isinstance(d, dict):
        raise error(f"{what} {path} is not a YAML mapping" if is_yaml else f"{what} {path} must hold a JSON object")
    return d
