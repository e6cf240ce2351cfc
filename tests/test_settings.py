"""The settings schema is the only place a setting's type and range appear: every check below is derived from
``tlora.settings.specs`` (nothing here restates a range), and each consumer — the dataclasses themselves,
``--set``, the command-line flags, the SimpleTuner / LyCORIS / official readers, the README — is shown to use it."""
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from tlora import settings as S
from tlora.cli import build_parser
from tlora.config import TLoRAConfig
from tlora.generate import GenerateSettings
from tlora.settings import SettingError
from tlora.trainconfig import TrainConfig, apply_overrides, from_official, from_simpletuner

ROOT = Path(__file__).resolve().parents[1]
CLASSES = (TrainConfig, TLoRAConfig, GenerateSettings)


def numeric(cls):
    """(field, spec, lowest allowed, highest allowed) of every int / float setting with a range."""
    out = []
    for spec in S.specs(cls).values():
        meta = {}
        for m in get_args(spec.annotation)[1:]:
            for c in getattr(m, "metadata", []):
                for k in ("ge", "gt", "le", "lt"):
                    if getattr(c, k, None) is not None:
                        meta[k] = getattr(c, k)
        if meta:
            out.append((spec.name, spec, meta))
    return out


def required(cls):
    """Keyword arguments a class needs besides its settings (GenerateSettings' model, prompts, ...)."""
    return {"model": "m", "weights": None, "prompts": ["p"], "out": "o"} if cls is GenerateSettings else {}


def outside(meta, kind):
    """A value just outside the range ``meta`` declares."""
    if "ge" in meta:
        return meta["ge"] - (1 if kind is int else 1e-3)
    if "gt" in meta:
        return meta["gt"]
    return meta.get("le", meta.get("lt")) + (1 if kind is int else 1e-3) if "le" in meta else meta["lt"]


def base_kind(spec):
    t = get_args(spec.annotation)[0]
    inner = [a for a in get_args(t) if a is not type(None)] or [t]
    return inner[0]


CASES = [(cls, name, spec, meta) for cls in CLASSES for name, spec, meta in numeric(cls)]


@pytest.mark.parametrize("cls,name,spec,meta", CASES, ids=[f"{c.__name__}.{n}" for c, n, _, _ in CASES])
def test_every_ranged_number_refuses_bool_string_nan_and_out_of_range_and_takes_its_bounds(cls, name, spec, meta):
    kind = base_kind(spec)
    bad = [True, "1", outside(meta, kind)] + ([float("nan"), float("inf")] if kind is float else [2.5])
    for value in bad:
        with pytest.raises(SettingError) as e:
            cls(**required(cls), **{name: value})
        assert e.value.key == name and S.describe(spec) == e.value.requirement
    for bound in ("ge", "le"):
        if bound in meta and not (cls is TLoRAConfig and name == "min_rank" and bound == "le"):
            kw = {name: meta[bound]}
            if cls is TLoRAConfig and name in ("rank", "conv_rank") and bound == "ge":
                kw["min_rank"] = 1
            if cls is TLoRAConfig and name == "rank" and bound == "le":
                pass
            cls(**required(cls), **kw)          # the bound itself is allowed


def test_every_field_has_help_and_every_type_is_checked():
    for cls in CLASSES:
        for spec in S.specs(cls).values():
            assert spec.help and not spec.help.endswith("."), (cls.__name__, spec.name)
    skipped = {"tlora"} | {"mask", "seeds", "overwrite", "model", "weights", "prompts", "out", "negative_prompt",
                           "placeholder"}
    for cls in CLASSES:
        import dataclasses
        unchecked = {f.name for f in dataclasses.fields(cls)} - set(S.specs(cls)) - skipped
        assert not unchecked, (cls.__name__, unchecked)


def test_set_is_checked_by_the_schema_and_names_the_key():
    for name, spec, meta in numeric(TrainConfig):
        d = apply_overrides({"model": "m", "data_dir": "d"}, [f"{name}={json.dumps(outside(meta, base_kind(spec)))}"])
        with pytest.raises(SettingError, match=f"^{name} in c.json must be {re.escape(S.describe(spec))}"):
            TrainConfig.from_dict(d, "c.json")
    d = apply_overrides({}, ["tlora.rank=true"])
    with pytest.raises(SettingError, match="^tlora.rank in c.json must be an integer"):
        TrainConfig.from_dict(d, "c.json")


@pytest.mark.parametrize("cls", [TrainConfig, TLoRAConfig])
def test_foreign_readers_name_the_key_as_their_source_spells_it(tmp_path, cls):
    """Every SimpleTuner, LyCORIS and official key the schema declares: a boolean where a number goes is refused
    by that reader, in that source's own key."""
    for source in ("simpletuner", "lycoris", "official"):
        for key, field in S.foreign_names(cls, source).items():
            spec = S.specs(cls)[field]
            if base_kind(spec) not in (int, float):
                continue
            if source == "lycoris":
                read = lambda: TLoRAConfig.from_lycoris({"algo": "tlora", "linear_dim": 4, key: True}, "l.json")  # noqa
                spelled = key
            elif source == "official":
                read = lambda: from_official({"pretrained_model_name_or_path": "m", "train_data_dir": "d",  # noqa
                                              key: True})
                spelled = "--" + key
            else:
                lyc = tmp_path / "lyc.json"
                lyc.write_text(json.dumps({"algo": "tlora", "linear_dim": 4}))
                read = lambda: from_simpletuner({"lycoris_config": str(lyc), key: True}, tmp_path, "st.json")  # noqa
                spelled = key
            with pytest.raises(SettingError) as e:
                read()
            assert str(e.value).startswith(f"{spelled} ") and "got True" in str(e.value), (source, key, str(e.value))


def test_command_line_flags_take_type_range_default_and_help_from_the_schema(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    checked = 0
    for command, cls, flags in (("generate", GenerateSettings, {"--steps": "steps", "--num-images": "num_images",
                                                                "--seed": "seed", "--height": "height"}),
                                ("memory", TrainConfig, {"--resolution": "resolution", "--batch": "batch_size"}),
                                ("memory", TLoRAConfig, {"--min-rank": "min_rank"}),
                                ("convert", TLoRAConfig, {"--exponent": "exponent", "--min-rank": "min_rank"})):
        actions = {o: a for a in sub[command]._actions for o in a.option_strings}
        for flag, field in flags.items():
            spec = S.specs(cls)[field]
            assert actions[flag].help.startswith(spec.help), (command, flag)
            with pytest.raises(Exception):
                actions[flag].type("true")
            checked += 1
    assert checked == 9


def test_the_readme_lists_every_training_setting_as_the_schema_has_it():
    readme = (ROOT / "docs" / "train.md").read_text()      # the settings table lives in the train docs
    table = S.settings_table()
    assert table == "\n".join(S.markdown(TrainConfig) + S.markdown(TLoRAConfig, prefix="tlora.")[2:])
    assert table in readme, "regenerate with: tlora settings (into docs/train.md)"
    rows = [ln for ln in table.splitlines()[2:]]
    assert len(rows) == len(S.specs(TrainConfig)) + len(S.specs(TLoRAConfig))
    r = subprocess.run([sys.executable, "-m", "tlora", "settings"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == table
