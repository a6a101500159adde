"""Each setting is declared once; the flags, environment names and README table follow from it."""

from __future__ import annotations

import dataclasses

from embedserve.settings import ModelSettings, Settings, all_declarations, declarations, load_settings, markdown_table
from tools.readme_settings import README, readme_table


def test_the_readme_configuration_table_is_the_one_the_declarations_give() -> None:
    assert readme_table(README.read_text()) == markdown_table(), (
        "README.md's configuration table is out of date: run `python tools/readme_settings.py`"
    )


def test_every_settings_field_but_the_model_list_is_a_declared_setting() -> None:
    declared = {name for cls in (ModelSettings, Settings) for name, _ in declarations(cls)}
    fields = {f.name for cls in (ModelSettings, Settings) for f in dataclasses.fields(cls)}
    assert fields - declared == {"models"}


def test_flags_environment_names_and_config_keys_are_unique() -> None:
    found = all_declarations()
    for attribute in ("env", "flag", "key"):
        values = [getattr(d, attribute) for d in found]
        assert len(set(values)) == len(values), attribute


def test_each_declaration_is_read_from_its_flag_and_its_environment_variable() -> None:
    # One value every setting accepts: its own default as the README shows it, where it parses.
    for name, d in declarations(Settings):
        sample = {"max_inputs_per_request": "16", "queue_size": "20000", "api_keys": "k"}.get(name, d.shown)
        sample = sample.split(" ")[0]
        from_env = load_settings([], {d.env: sample})
        from_flag = load_settings([d.flag, sample], {})
        assert getattr(from_env, name) == getattr(from_flag, name) == d.parse(sample, d.env), name
