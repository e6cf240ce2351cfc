"""``tlora push RUN_DIR REPO_ID``: a finished run's final weights, model card and validation samples to a Hugging
Face Hub model repository, as one commit made with ``huggingface_hub``'s own upload API.

What goes (nothing else of the run folder, which is only read): ``tlora.safetensors``, ``tlora-best.safetensors``
when there is one, ``config.resolved.json``, ``samples/*.png``, and ``README.md``: the run's model card, or, when
the folder's README.md is not tlora's, a card made for the upload alone. Every file must be a regular file inside
the run folder (a symlink could point anywhere), so nothing outside it can be sent.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

from . import card
from .errors import UsageError
from .fileio import show

FILES = ("tlora.safetensors", "tlora-best.safetensors", "config.resolved.json")


class HubError(RuntimeError):
    """The Hub refused or could not be reached; the message is one line."""


def _own_file(run_dir: Path, path: Path) -> Path:
    if path.is_symlink() or not path.is_file():
        raise UsageError(f"{show(path)} is not a regular file of the run folder (a symlink or something else); "
                         "tlora push sends only the run's own files: replace it with the file itself")
    return path


def upload_plan(run_dir) -> List[Tuple[str, Union[Path, bytes]]]:
    """(path in the repository, local file or bytes) of everything ``push`` sends, checked; reads only."""
    from .weights import read_header
    run_dir = Path(run_dir)
    final = run_dir / "tlora.safetensors"
    if not run_dir.is_dir() or not (final.is_file() or final.is_symlink()):
        raise UsageError(f"{show(run_dir)} is not a finished tlora run: it has no tlora.safetensors")
    header = read_header(_own_file(run_dir, final))
    plan: List[Tuple[str, Union[Path, bytes]]] = [
        (name, _own_file(run_dir, run_dir / name)) for name in FILES
        if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    samples = run_dir / "samples"
    if samples.is_symlink():
        _own_file(run_dir, samples)
    if samples.is_dir():
        plan += [(f"samples/{p.name}", _own_file(run_dir, p)) for p in sorted(samples.glob("*.png"))]
    readme = run_dir / card.CARD_NAME
    ours = readme.is_file() and not readme.is_symlink() and card.is_ours(readme)
    plan.append((card.CARD_NAME, readme if ours else str(card.model_card(header, run_dir)).encode("utf-8")))
    return plan


def operations(plan) -> list:
    """``huggingface_hub.CommitOperationAdd`` of each planned file (hashed locally; no network)."""
    from huggingface_hub import CommitOperationAdd
    return [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=src if isinstance(src, bytes) else str(src))
            for dest, src in plan]


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"REPO_ID {repo_id!r} is not a Hub repository id ({str(e).splitlines()[0]}); give "
                         "user-or-org/name") from None
    if "/" not in repo_id:
        raise UsageError(f"REPO_ID {repo_id!r} needs its owner: user-or-org/{repo_id}")
    return repo_id


def token() -> str:
    """The Hub token huggingface_hub finds (HF_TOKEN, or the one ``hf auth login`` stored); one line without."""
    from huggingface_hub import get_token
    found = get_token()
    if not found:
        raise UsageError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access), "
                         "or see what would be sent with --dry-run")
    return found


def push(plan, repo_id: str, private: bool, message: str) -> str:
    """One commit of the planned files to ``repo_id`` (created when missing); returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=token())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations(plan), commit_message=message)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise HubError(f"the Hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return str(info.commit_url)
