"""The study configs: one set of defaults, the profiles as checked overrides, the notebooks in step.

The notebooks' parameters cells are read as papermill reads them (``labkit.lab.profiles.
inspect_parameters``), independently of the config classes, so a default changed in one place and
not the other fails here.
"""
from __future__ import annotations

import dataclasses

import pytest

from labkit import paths
from labkit.config import StudyConfig, parse_override, profile_names, read_profile
from labkit.lab.profiles import inspect_parameters
from labkit.studies.configs import CONFIGS, ClassificationConfig, DensityConfig, WAEConfig, config_class


@pytest.mark.parametrize("section", sorted(s for s, cls in CONFIGS.items() if cls.NOTEBOOK))
def test_the_notebook_parameters_cell_repeats_the_config_defaults(section):
    cls = CONFIGS[section]
    cell = inspect_parameters(paths.notebooks_dir() / f"{section}.ipynb")
    defaults = cls.defaults()
    assert sorted(cell) == sorted(defaults), (
        f"{section}: parameters only in the notebook {sorted(set(cell) - set(defaults))}, "
        f"only in {cls.__name__} {sorted(set(defaults) - set(cell))}")
    differ = {k: (cell[k].default, defaults[k]) for k in defaults if cell[k].default != defaults[k]}
    assert not differ, f"{section}: notebook default != {cls.__name__} default: {differ}"


@pytest.mark.parametrize("profile", profile_names())
def test_every_profile_section_builds_a_valid_config(profile):
    sections = read_profile(profile)
    unknown = set(sections) - set(CONFIGS) - {"defaults"}
    assert not unknown, f"profile {profile}: sections for no study: {unknown}"
    for section, cls in CONFIGS.items():
        cfg = cls.build(profile)
        assert cfg.profile == profile
        for k, v in (sections.get(section) or {}).items():
            assert getattr(cfg, k) == v or (isinstance(v, int) and getattr(cfg, k) == float(v)), (profile, section, k)


def test_the_quick_profile_is_the_defaults():
    for cls in CONFIGS.values():
        assert cls.build("quick").changed() == {}, cls.__name__


def test_the_layers_apply_in_order_profile_then_overrides():
    assert ClassificationConfig().epochs == 1
    assert ClassificationConfig.build("cpu").epochs == 5
    assert ClassificationConfig.build("cpu", {"epochs": 7}).epochs == 7
    assert ClassificationConfig.build("cpu", {"epochs": 7}).seeds == [0, 1, 2]   # the profile's, kept
    assert ClassificationConfig.build(None, {"epochs": 7}).seeds == [0]          # no profile: the defaults


def test_an_unknown_setting_names_the_closest_valid_one_and_who_set_it():
    with pytest.raises(ValueError, match=r"unknown setting 'epocs' for 02_classification \(set by -p\); did you mean 'epochs'"):
        ClassificationConfig.build("quick", {"epocs": 3})


def test_an_unknown_setting_in_a_profile_names_the_profile(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("extends: quick\n03_wae:\n  lr_dis: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"'lr_dis' for 03_wae \(profile mine\); did you mean 'lr_disc'"):
        WAEConfig.build(bad)


@pytest.mark.parametrize("name,value,words", [
    ("epochs", "abc", "an integer or None, got str 'abc'"),
    ("epochs", 0, "an integer >= 1, got 0"),
    ("epochs", True, "an integer or None, got bool True"),
    ("lr", -1.0, "a number > 0"),
    ("val_fraction", 1.0, "a number >= 0 and < 1"),
    ("masks", ["square", "squares"], "did you mean 'square'"),
    ("precision", 32, "a string, got int 32"),
    ("device", "gpu", "'auto' or a torch device name"),
])
def test_a_bad_value_says_what_it_must_be(name, value, words):
    with pytest.raises(ValueError) as err:
        ClassificationConfig.build("quick", {name: value})
    assert f"setting {name!r} of 02_classification must be" in str(err.value) and words in str(err.value)
    assert f"set by -p {name}=" in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        ClassificationConfig.build("quick", {"epochs": 0, "lr": 0.0, "n_tset": 3})
    assert len(str(err.value).splitlines()) == 3


def test_configs_are_frozen_and_replace_checks_names():
    cfg = DensityConfig.build("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert cfg.replace(epochs=3).epochs == 3 and cfg.epochs == 20
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        cfg.replace(epoch=3)
    with pytest.raises(ValueError, match="an integer >= 1"):
        cfg.replace(epochs=0)


def test_an_integer_for_a_float_setting_is_a_float_and_lists_are_copies():
    a, b = ClassificationConfig.build("quick", {"lr": 1}), ClassificationConfig()
    assert a.lr == 1.0 and isinstance(a.lr, float)
    a.masks.append("noise")                 # a field's list is the config's own, not the class default's
    assert b.masks == ["square"] and ClassificationConfig().masks == ["square"]


def test_every_setting_has_a_line_of_doc():
    for cls in CONFIGS.values():
        assert issubclass(cls, StudyConfig)
        for name in cls.names():
            assert cls.doc(name).strip(), f"{cls.__name__}.{name} has no doc"
        assert f"| `{cls.names()[0]}` |" in cls.describe()


def test_a_study_without_a_notebook_has_none():
    shell_only = {s for s, cls in CONFIGS.items() if not cls.NOTEBOOK}
    assert shell_only == {"acflow"}
    assert not any((paths.notebooks_dir() / f"{s}{ext}").exists() for s in shell_only for ext in (".ipynb", ".py"))
    assert all((paths.notebooks_dir() / f"{s}.ipynb").exists() for s in set(CONFIGS) - shell_only)


def test_studies_are_found_by_name_or_section():
    assert config_class("classification") is ClassificationConfig is config_class("02_classification")
    with pytest.raises(ValueError, match="did you mean 'classification'"):
        config_class("clasification")


@pytest.mark.parametrize("text,expected", [
    ("epochs=3", (None, "epochs", 3)), ("lr=4e-5", (None, "lr", 4e-5)), ("n_train=None", (None, "n_train", None)),
    ("masks=[square,noise]", (None, "masks", ["square", "noise"])), ("precision='32'", (None, "precision", "32")),
    ("03_wae.epochs=2", ("03_wae", "epochs", 2)),
])
def test_overrides_are_read_as_a_python_user_types_them(text, expected):
    assert parse_override(text) == expected
