"""The settings schema: the one place a setting's type, range, default, help and its names in other tools'
files are declared.

A dataclass of settings (:class:`tlora.config.TLoRAConfig`, :class:`tlora.trainconfig.TrainConfig`,
:class:`tlora.generate.GenerateSettings`, ...) annotates each field once::

    rank: Annotated[int, setting("adapter rank R", ge=1, le=MAX_RANK, lycoris="linear_dim", official="lora_rank")] = 64

and everything else is derived from that line: the checks (:func:`check`, run by each dataclass's
``__post_init__``, so a value built in Python is checked as one read from a file), reading a mapping from any
source with its own key names (:func:`parse`), the error wording (``tlora_alpha in lycoris.json must be a
finite number > 0, got True``), the ``--help`` of command-line flags (:func:`add_flag`), the translation tables
of the foreign readers (:func:`foreign_names`) and the README's table (:func:`markdown`).

Types and ranges are checked by pydantic (the field's usual choice: diffusers, gradio and FastAPI use it), one
``TypeAdapter`` per field, in strict mode: no bool for a number, no 3.7 for an integer, no string for a number,
no null unless the field may be null, NaN and infinities refused, a string never taken for a list.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import typing
from functools import lru_cache
from typing import Annotated, Any, Dict, Iterable, List, Literal, Optional, Tuple, Union, get_args, get_origin

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .errors import UsageError

SOURCES = ("lycoris", "simpletuner", "official", "comfyui")

# sizes above these are refused before anything is allocated (a rank of 2**40 would ask for exabytes)
MAX_RANK = 4096
MAX_RESOLUTION = 8192
MAX_BATCH = 4096
MAX_STEPS = 10 ** 7
MAX_SEED = 2 ** 32 - 1


# the types of the schedule's numbers, shared by TLoRAConfig's fields and tlora.schedule (one declaration)
Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Exponent = Annotated[float, Field(gt=0, le=1000)]
TrainTimesteps = Annotated[int, Field(ge=1, le=MAX_STEPS)]


class SettingError(UsageError):
    """One setting with a wrong value. ``key`` is the field's name (dotted below a section), ``requirement``
    what it must be; the message names the key as the source spells it."""

    def __init__(self, key: str, requirement: str, value: Any, source: Optional[str] = None, spelled: str = ""):
        self.key, self.requirement, self.value, self.source = key, requirement, value, source
        self.spelled = spelled or key                    # the key as its source writes it (``tlora.min_rank``)
        where = f" in {source}" if source else ""
        super().__init__(f"{spelled or key}{where} must be {requirement}, got {_short(value)}")

    def renamed(self, spelled: str, source: Optional[str]) -> "SettingError":
        return SettingError(self.key, self.requirement, self.value, source, spelled)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def setting(help: str, *, lycoris: Optional[str] = None, simpletuner: Optional[str] = None,
            official: Optional[str] = None, comfyui: Optional[str] = None, **constraints) -> FieldInfo:
    """A field's schema: ``help`` (one line), pydantic constraints (``ge``, ``gt``, ``le``, ``lt``; floats are
    always finite), and its key in each foreign source that has it."""
    names = {k: v for k, v in (("lycoris", lycoris), ("simpletuner", simpletuner), ("official", official),
                               ("comfyui", comfyui)) if v}
    return Field(description=help, json_schema_extra={"names": names}, **constraints)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One field of a settings dataclass, as its annotation declares it."""
    name: str
    annotation: Any
    info: FieldInfo
    default: Any

    @property
    def help(self) -> str:
        return self.info.description or ""

    @property
    def names(self) -> Dict[str, str]:
        return dict((self.info.json_schema_extra or {}).get("names", {}))

    @property
    def adapter(self) -> TypeAdapter:
        return _adapter(self.annotation)

    def check(self, value: Any) -> Any:
        """``value`` validated (a list for a tuple field becomes a tuple, an int for a float a float), or
        SettingError naming this field."""
        if isinstance(value, str) and not _utf8(value):      # a non-UTF-8 path from the command line
            raise SettingError(self.name, "valid UTF-8 text (rename it)", value)
        try:
            return self.adapter.validate_python(value)
        except ValidationError:
            raise SettingError(self.name, describe(self), value) from None

    def parse_text(self, text: str) -> Any:
        """A command-line value: JSON when it parses (numbers, true/false/null, lists), else the plain string."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        return self.check(value)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@lru_cache(maxsize=None)
def _adapter(annotation) -> TypeAdapter:
    return TypeAdapter(annotation, config=ConfigDict(strict=True, allow_inf_nan=False))


def specs(cls) -> Dict[str, Spec]:
    """Every declared setting of the dataclass ``cls`` (fields without a :func:`setting` are not settings)."""
    return _specs(cls)


@lru_cache(maxsize=None)
def _specs(cls) -> Dict[str, Spec]:
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        ann = hints[f.name]
        infos = [m for m in get_args(ann)[1:] if isinstance(m, FieldInfo)] if get_origin(ann) is Annotated else []
        info = next((m for m in reversed(infos) if m.description), None)   # a shared type's Field has none
        if info is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = Spec(f.name, ann, info, default)
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def check(obj, where: str = "") -> None:
    """Validate every setting of the dataclass instance ``obj`` in place (values normalised: tuples, floats);
    SettingError for the first wrong one, its key prefixed with ``where``."""
    for name, spec in specs(type(obj)).items():
        try:
            object.__setattr__(obj, name, spec.check(getattr(obj, name)))
        except SettingError as e:
            raise SettingError(where + e.key, e.requirement, e.value) from None


def check_schedule(max_rank: int, min_rank: int, exponent: float, num_train_timesteps: int) -> None:
    """A rank schedule's numbers (:class:`tlora.schedule.RankSchedule`), by the same types as TLoRAConfig's
    rank, min_rank, exponent and num_train_timesteps; ValueError (SettingError) naming the first wrong one."""
    for name, kind, value in (("max_rank", Rank, max_rank), ("min_rank", Rank, min_rank),
                              ("exponent", Exponent, exponent), ("num_train_timesteps", TrainTimesteps,
                                                                 num_train_timesteps)):
        try:
            _adapter(kind).validate_python(value)
        except ValidationError:
            raise SettingError(name, _describe(kind), value) from None
    if min_rank > max_rank:
        raise SettingError("min_rank", f"<= max_rank ({max_rank})", min_rank)


def check_value(cls, key: str, value: Any, where: str = "") -> Any:
    """One value against the schema of ``cls.key`` (a per-module override, a header entry)."""
    try:
        return specs(cls)[key].check(value)
    except SettingError as e:
        raise SettingError(where + e.key, e.requirement, e.value) from None


def describe(spec: Spec) -> str:
    """What a value of ``spec`` must be, in words: "an integer in [1, 4096]", "one of 'ortho', 'vanilla'"."""
    return _describe(spec.annotation)


def _describe(ann) -> str:
    meta = {}
    if get_origin(ann) is Annotated:
        args = get_args(ann)
        ann = args[0]
        for m in args[1:]:
            for c in getattr(m, "metadata", []):
                for k in ("ge", "gt", "le", "lt", "multiple_of"):
                    if getattr(c, k, None) is not None:
                        meta[k] = getattr(c, k)
    if get_origin(ann) is Union and type(None) in get_args(ann):
        inner = next(a for a in get_args(ann) if a is not type(None))
        return _describe(Annotated[(inner, Field(**meta))] if meta else inner) + " or null"
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(ann))
    if ann is bool:
        return "true or false"
    if ann is str:
        return "a string"
    if get_origin(ann) in (tuple, Tuple, list, List):
        return "a list of strings"
    if get_origin(ann) in (dict, Dict) or ann is dict:
        return "an object"
    word = "an integer" if ann is int else "a finite number"
    lo = f">= {meta['ge']}" if "ge" in meta else f"> {meta['gt']}" if "gt" in meta else None
    hi = f"<= {meta['le']}" if "le" in meta else f"< {meta['lt']}" if "lt" in meta else None
    text = " ".join([word] + ([f"{lo} and {hi}"] if lo and hi else [lo or hi] if lo or hi else []))
    return text + (f", a multiple of {meta['multiple_of']}" if "multiple_of" in meta else "")


def foreign_names(cls, source: str) -> Dict[str, str]:
    """{key in ``source`` (e.g. "linear_dim"): field name ("rank")} for the fields of ``cls`` it has."""
    return {s.names[source]: s.name for s in specs(cls).values() if source in s.names}


def unknown_keys(keys: Iterable[str], known: Iterable[str], what: str) -> UsageError:
    """One line naming unknown keys and the closest known spelling of each."""
    known = list(known)
    parts = []
    for k in sorted(keys):
        close = difflib.get_close_matches(k, known, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return UsageError(f"unknown {what} key(s): {', '.join(parts)}")


def build(cls, kwargs: dict, source: Optional[str], spelled: Optional[Dict[str, str]] = None):
    """``cls(**kwargs)``; a SettingError names the key as ``source`` spells it (``spelled``: field → key)."""
    spelled = spelled or {}
    try:
        return cls(**kwargs)
    except SettingError as e:
        head = re.match(r"[^.\[]+", e.key).group(0)      # "module_algo_map['x'].rank" → "module_algo_map"
        raise e.renamed(spelled.get(head, head) + e.key[len(head):], source) from None


def parse(cls, data: Any, source: str, names: Optional[Dict[str, str]] = None, extra: Iterable[str] = (),
          **fixed):
    """``cls`` from the mapping ``data`` read from ``source`` (a file name, "--set", "lycoris.json"), whose keys
    are ``names`` (source key → field; default: the field names) plus the keys in ``extra``, which the caller
    reads itself and which are dropped here. ``fixed``: fields set by the caller. An unknown key, a wrong type
    or range is a SettingError / UsageError in one line naming the key as ``source`` spells it."""
    if not isinstance(data, dict):
        raise UsageError(f"{source} must hold an object of settings, got {_short(data)}")
    names = names if names is not None else {f.name: f.name for f in dataclasses.fields(cls)}
    extra = set(extra)
    bad = set(data) - set(names) - extra
    if bad:
        raise unknown_keys(bad, list(names) + sorted(extra), source)
    kwargs = {names[k]: v for k, v in data.items() if k in names}
    kwargs.update(fixed)
    return build(cls, kwargs, source, {field: key for key, field in names.items()})


def markdown(cls, prefix: str = "", sources: Tuple[str, ...] = ("simpletuner", "lycoris", "official")) -> List[str]:
    """The settings of ``cls`` as markdown table rows (header first): key, what it must be, default, what it
    sets, and its key in each of ``sources``."""
    def row(cells):
        return "|" + "|".join(f" {c.replace('|', chr(92) + '|')} " if c else " " for c in cells) + "|"
    rows = [row(["key", "value", "default", "what it sets", *sources]), "|" + "---|" * (4 + len(sources))]
    for s in specs(cls).values():
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        foreign = [f"`{'--' if k == 'official' else ''}{s.names[k]}`" if k in s.names else "" for k in sources]
        rows.append(row([f"`{prefix}{s.name}`", describe(s), f"`{json.dumps(default)}`", s.help, *foreign]))
    return rows


def settings_table() -> str:
    """Every training setting (TrainConfig, then its ``tlora`` section): the README's table, ``tlora settings``."""
    from .config import TLoRAConfig
    from .trainconfig import TrainConfig
    return "\n".join(markdown(TrainConfig) + markdown(TLoRAConfig, prefix="tlora.")[2:])


def add_flag(parser, flag: str, cls, field: str, help_extra: str = "", help_hidden: bool = False, **kw) -> None:
    """An argparse flag whose type, range, default and help are ``cls.field``'s (one source of truth); a bad
    value is argparse's one-line error naming the flag."""
    spec = specs(cls)[field]

    def convert(text: str):
        try:
            return spec.parse_text(text)
        except SettingError as e:
            raise argparse.ArgumentTypeError(f"must be {e.requirement}, got {text!r}") from None
    convert.__name__ = field
    default = kw.pop("default", spec.default)
    shown_default = spec.default if default is None else default     # what applies when the flag is not given
    shown = "" if shown_default is None else f" (default {json.dumps(shown_default)})"
    text = argparse.SUPPRESS if help_hidden else spec.help + shown + help_extra
    parser.add_argument(flag, type=convert, default=default, help=text, **kw)
