"""profiles/*.yaml and labkit.lab.profiles: profiles, overrides, and the notebooks' parameters they must fit."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from labkit import paths
from labkit.lab.profiles import (
    Parameter,
    available_profiles,
    check_parameters,
    inspect_parameters,
    load_profile,
    notebook_parameters,
    parse_override,
    profile_problems,
)

PROFILES = ["quick", "cpu", "paper"]
NOTEBOOKS = ["00_misconv_tour", "01_dmfa", "02_classification", "03_wae", "04_timing", "05_draw_a_mask"]
SHELL_STUDIES = ["acflow"]          # profile sections of the studies without a notebook
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def walk(value):
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


def test_the_three_profiles_exist():
    assert set(PROFILES) <= set(available_profiles())


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_with_valid_keys(name):
    profile = load_profile(name)
    for section, params in profile.items():
        for key in params:
            assert key.isidentifier(), f"{name}.yaml [{section}] {key!r} is not a Python identifier"
        # precision names are strings by design ("32", "bf16-mixed", "auto"): labkit.precision checks them
        params = {k: v for k, v in params.items() if k != "precision"}
        for value in walk(params):
            # PyYAML reads 4e-5 (no dot) as a *string*: write 4.0e-5.
            assert not (isinstance(value, str) and NUMBER.match(value)), (
                f"{name}.yaml [{section}] has the string {value!r} where a number was meant"
            )


def test_profiles_name_every_notebook_and_hold_only_what_differs_from_the_defaults():
    from labkit.studies.configs import CONFIGS

    for name in PROFILES:
        profile = load_profile(name)
        assert set(profile) - {"defaults"} == set(NOTEBOOKS) | set(SHELL_STUDIES), f"{name}.yaml"
        for notebook in NOTEBOOKS + SHELL_STUDIES:
            defaults = CONFIGS[notebook].defaults()
            same = [k for k, v in (profile[notebook] or {}).items() if k in defaults and v == defaults[k]
                    and k not in ("dataset", "mode", "modes", "seed", "seeds")]
            assert not same, f"{name}.yaml [{notebook}] repeats the defaults of {same}: drop them"


def test_profile_sizes_grow_from_quick_to_paper():
    from labkit.studies.configs import ClassificationConfig, DensityConfig, TimingConfig, TourConfig, WAEConfig

    for cls in (DensityConfig, ClassificationConfig, WAEConfig):
        quick, cpu, paper = (cls.build(n) for n in PROFILES)
        assert cpu.n_train == 10000  # all offline MNIST training images
        assert quick.epochs == 1 and quick.n_train <= 6000  # about a minute per study on 2 cores
        assert paper.n_train is None  # the whole split
    # the paper's protocol (supplementary, section 1)
    dmfa = DensityConfig.build("paper")
    assert (dmfa.epochs, dmfa.batch_size, dmfa.lr) == (20, 48, 4e-5)
    clf = ClassificationConfig.build("paper")
    assert (clf.epochs, clf.batch_size, clf.lr, clf.seeds) == (10, 24, 1e-3, [0, 1, 2])
    wae = WAEConfig.build("paper")
    assert (wae.epochs, wae.batch_size, len(wae.seeds)) == (20, 128, 3)
    assert TimingConfig.build("paper").repeats == 5000
    for name in PROFILES:
        tour = TourConfig.build(name)
        assert (tour.n_images, tour.mc_samples) == (8, 20000)


def test_notebook_parameters_merge_defaults_under_the_section():
    params = notebook_parameters("cpu", "01_dmfa")
    assert params["profile"] == "cpu" and params["epochs"] == 20
    assert notebook_parameters("quick", "01_dmfa") == {"profile": "quick"}     # quick: the defaults
    params = notebook_parameters("quick", "01_dmfa")
    assert notebook_parameters("quick", "notebooks/01_dmfa.ipynb") == params
    assert load_profile("quick", "01_dmfa") == params  # the ARCHITECTURE.md form


def test_section_overrides_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("defaults: {device: auto, seed: 0}\n01_dmfa: {seed: 5, epochs: 2}\n")
    assert notebook_parameters(str(path), "01_dmfa") == {"profile": "mine", "device": "auto", "seed": 5, "epochs": 2}
    assert notebook_parameters(load_profile(str(path)), "01_dmfa") == {"device": "auto", "seed": 5, "epochs": 2}


def test_unknown_profile_and_notebook_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown profile 'fast': profiles in .* are cifar10_authors, cpu, cpu10, paper, quick"):
        load_profile("fast")
    assert notebook_parameters("quick", "09_x") == {"profile": "quick"}     # a notebook of one's own: its defaults
    with pytest.raises(ValueError, match="profile file 'nope.yaml' does not exist"):
        load_profile("nope.yaml")


def test_malformed_profiles_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {device: auto}\n01_dmfa: {n-train: 5}\n")
    with pytest.raises(ValueError, match=r"setting 'n-train' in section '01_dmfa' is not a valid Python identifier"):
        load_profile(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a mapping of sections, got list"):
        load_profile(str(bad))
    bad.write_text("01_dmfa: [1, 2]\n")
    with pytest.raises(ValueError, match="section '01_dmfa' must be a mapping of settings, got list"):
        load_profile(str(bad))
    bad.write_text("01_dmfa: {a: [1\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_profile(str(bad))


def test_parse_override():
    assert parse_override("epochs=3") == (None, "epochs", 3)
    assert parse_override("01_dmfa.lr=4.0e-5") == ("01_dmfa", "lr", 4e-5)
    assert parse_override("masks=[square, noise]") == (None, "masks", ["square", "noise"])
    assert parse_override("device=cuda:0") == (None, "device", "cuda:0")
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_override("epochs")
    with pytest.raises(ValueError, match="'n-train' is not a valid parameter name"):
        parse_override("n-train=3")


def test_parse_override_reads_numbers_and_none_as_python_would():
    # PyYAML (YAML 1.1) reads 4e-5 as a string and None as the string "None"
    value = parse_override("lr=4e-5")[2]
    assert value == 4e-5 and isinstance(value, float)
    assert parse_override("n=-3")[2] == -3 and isinstance(parse_override("n=-3")[2], int)
    assert parse_override("n_train=None")[2] is None
    assert parse_override("n_train=null")[2] is None
    assert parse_override("device=cpu")[2] == "cpu"
    assert parse_override("acflow=")[2] == ""


def test_profiles_dir_is_the_repositorys():
    assert (paths.profiles_dir() / "quick.yaml").is_file()
    assert available_profiles() == available_profiles(paths.profiles_dir())


# ------------------------------------------------------------------ profiles against the notebooks


NOTEBOOK_FILES = sorted(paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def inferred():
    """Each notebook's parameters as papermill infers them from its parameters cell."""
    return {nb.stem: inspect_parameters(nb) for nb in NOTEBOOK_FILES}


def test_papermill_infers_every_assignment_of_every_parameters_cell(inferred):
    import ast

    import papermill

    assert {nb.stem for nb in NOTEBOOK_FILES} == set(NOTEBOOKS)
    for nb in NOTEBOOK_FILES:
        cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assigned = {t.id for node in ast.parse(cell.source).body
                    for t in (node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)])
                    if isinstance(t, ast.Name)}
        # papermill's own entry point, as ./lab run's papermill sees the notebook
        assert set(papermill.inspect_notebook(str(nb))) == assigned == set(inferred[nb.stem]), nb.stem
        # a study with a grid of seeds has ``seeds`` and no single ``seed``
        assert {"profile", "device"} <= assigned and assigned & {"seed", "seeds"}, nb.stem


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_key_is_a_notebook_parameter_of_a_fitting_type(name, inferred):
    """Each key of each section (and of defaults) exists in the notebook, with a compatible value."""
    profile = load_profile(name)
    for stem, spec in inferred.items():
        params = notebook_parameters(profile, stem, name=name)
        for key, value in params.items():
            assert key in spec, f"{name}.yaml: {stem} has no parameter {key!r}"
            assert spec[key].accepts(value), (
                f"{name}.yaml: {stem}.{key} = {value!r} does not fit {spec[key].expected()} "
                f"(default {spec[key].source})")
    assert profile_problems(name) == []


def test_profile_problems_names_unknown_keys_and_bad_types(tmp_path, inferred):
    path = tmp_path / "typo.yaml"
    path.write_text("defaults: {device: auto, seed: 0}\n"
                    "00_misconv_tour: {n_imagez: 8, mc_samples: many}\n"
                    "07_nope: {}\n")
    problems = profile_problems(str(path), ["00_misconv_tour"])
    text = "\n".join(problems)
    assert "unknown setting 'n_imagez' for 00_misconv_tour (set by profile typo); did you mean 'n_images'?" in text
    assert "setting 'mc_samples' of 00_misconv_tour must be an integer, got str 'many' (set by profile typo)" in text
    assert "section '07_nope' names no notebook" in text
    assert len(problems) == 3


def test_types_follow_the_default_and_the_annotation():
    n = Parameter("n", "8")
    assert n.accepts(3) and not n.accepts(2.5) and not n.accepts("abc") and not n.accepts(True)
    assert not n.accepts(None) and n.expected() == "an integer"
    lr = Parameter("lr", "1.0e-3")
    assert lr.accepts(1) and lr.accepts(0.5) and not lr.accepts("0.5") and not lr.accepts(False)
    masks = Parameter("masks", '["square"]')
    assert masks.accepts(["noise", "square"]) and masks.accepts([]) and not masks.accepts("square")
    flag = Parameter("backward", "True")
    assert flag.accepts(False) and not flag.accepts(1) and not flag.accepts("yes")
    name = Parameter("dataset", '"mnist"')
    assert name.accepts("svhn") and not name.accepts(3) and not name.accepts(["mnist"])
    free = Parameter("results_dir", "None")
    assert all(free.accepts(v) for v in (None, "x", 3, [1], {"a": 1})) and free.expected() == "anything"
    computed = Parameter("when", "time.time()")  # not a literal: no type to hold it to
    assert computed.accepts("anything")
    optional = Parameter("n_train", "500", type_name="Optional[int]")
    assert optional.accepts(None) and optional.accepts(10) and not optional.accepts("all")
    assert optional.expected() == "an integer or None"
    typed_none = Parameter("threads", "None", type_name="Optional[int]")
    assert typed_none.accepts(None) and typed_none.accepts(2) and not typed_none.accepts("2")


def test_check_parameters_suggests_close_names_and_names_the_origin():
    # a study notebook: checked against its config (names, types, ranges)
    with pytest.raises(ValueError) as err:
        check_parameters("00_misconv_tour", {"n_imagez": 3, "mc_samples": "x", "n_fit": 0},
                         origins={"n_imagez": "-p n_imagez=3"})
    lines = str(err.value).splitlines()
    assert lines[0] == "unknown setting 'n_imagez' for 00_misconv_tour (set by -p n_imagez=3); did you mean 'n_images'?"
    assert lines[1] == "setting 'mc_samples' of 00_misconv_tour must be an integer, got str 'x'"
    assert lines[2] == "setting 'n_fit' of 00_misconv_tour must be an integer >= 1, got 0"
    # a notebook of one's own, without a config: against its parameters cell
    spec = {"n_images": Parameter("n_images", "8"), "mc_samples": Parameter("mc_samples", "20000")}
    with pytest.raises(ValueError, match=r"unknown parameter 'zzz' for nb; its parameters are: mc_samples, n_images"):
        check_parameters("nb", {"zzz": 1}, spec)
    with pytest.raises(ValueError, match=r"parameter 'mc_samples' of nb must be an integer \(default 20000\), got str 'x'"):
        check_parameters("nb", {"mc_samples": "x"}, spec)
    check_parameters("nb", {"n_images": 3, "mc_samples": 10}, spec)  # fine: no error


def _notebook_with_parameters(path: Path, source: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source, metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell("x")]
    nbformat.write(nb, path)
    return path


def test_inspect_parameters_rejects_what_papermill_cannot_read(tmp_path):
    ok = _notebook_with_parameters(tmp_path / "ok.ipynb", "from typing import Optional\n\n"
                                   "a = 1  # count (0: none)\nb: Optional[int] = 2\nc = [1,\n     2]\n")
    spec = inspect_parameters(ok)
    assert list(spec) == ["a", "b", "c"] and spec["b"].nullable and spec["c"].default == [1, 2]
    bad = _notebook_with_parameters(tmp_path / "bad.ipynb", "a = 1\nb = 2  # 0 = off\n")
    with pytest.raises(ValueError, match=r"bad: papermill cannot read .* line 2: 'b = 2  # 0 = off'.* no '=' inside"):
        inspect_parameters(bad)
    untyped = _notebook_with_parameters(tmp_path / "pep604.ipynb", "n: int | None = 5\n")  # papermill skips it
    with pytest.raises(ValueError, match=re.escape("line 1: 'n: int | None = 5'")):
        inspect_parameters(untyped)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_precisions_are_known_names(name):
    from labkit.precision import resolve_precision

    for section, params in load_profile(name).items():
        if "precision" in params:
            assert params["precision"] in ("32", "bf16-mixed", "16-mixed", "auto"), (name, section, params["precision"])
            if params["precision"] != "16-mixed":
                assert resolve_precision(params["precision"], "cpu") in ("32", "bf16-mixed")


def test_a_quoted_override_stays_a_string():
    from labkit.lab.profiles import parse_override

    assert parse_override('precision="32"') == (None, "precision", "32")
    assert parse_override("precision='32'") == (None, "precision", "32")
    assert parse_override("lr=4e-5") == (None, "lr", 4e-5)
    assert parse_override("n=3")[2] == 3 and parse_override("x=None")[2] is None


def test_a_profile_can_extend_another(tmp_path):
    """'extends: base' takes every section of base and puts the file's parameters on top; a loop
    or a profile extending itself is refused, naming it."""
    (tmp_path / "base.yaml").write_text("defaults: {device: auto, seed: 0}\n02_classification: {epochs: 5, lr: 0.001}\n"
                                        "03_wae: {epochs: 2}\n")
    (tmp_path / "child.yaml").write_text("extends: base\n02_classification: {epochs: 9, seeds: [0, 1]}\n")
    child = load_profile("child", directory=tmp_path)
    assert child["02_classification"] == {"epochs": 9, "lr": 0.001, "seeds": [0, 1]}
    assert child["03_wae"] == {"epochs": 2} and child["defaults"] == {"device": "auto", "seed": 0}
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ValueError, match="loop"):
        load_profile("a", directory=tmp_path)
    (tmp_path / "me.yaml").write_text("extends: me\n")
    with pytest.raises(ValueError, match="'extends' must name another profile"):
        load_profile("me", directory=tmp_path)


def test_the_cpu10_profile_is_the_cpu_profile_with_ten_seeds():
    cpu, cpu10 = load_profile("cpu"), load_profile("cpu10")
    assert set(cpu) == set(cpu10)
    assert all(cpu10[s] == cpu[s] for s in cpu if s != "02_classification")
    from labkit.studies.configs import ClassificationConfig

    a, b = ClassificationConfig.build("cpu"), ClassificationConfig.build("cpu10")
    assert b.seeds == list(range(10)) and b.init == "shared" and b.dmfa_replicates == 3
    assert all(getattr(b, k) == getattr(a, k)
               for k in ("n_train", "n_test", "epochs", "batch_size", "lr", "precision", "val_fraction"))
    assert "{replicate}" in b.dmfa_complete and "{replicate}" in b.dmfa_incomplete


def test_a_study_without_a_notebook_has_a_checked_section(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("acflow: {epochs: 0, n_trian: 5}\nacflw: {}\n")
    text = "\n".join(problems := profile_problems(str(path), ["00_misconv_tour"]))
    assert "setting 'epochs' of acflow must be an integer >= 1, got 0 (set by profile mine)" in text
    assert "unknown setting 'n_trian' for acflow (set by profile mine); did you mean 'n_train'?" in text
    assert "section 'acflw' names no notebook; did you mean 'acflow'?" in text
    assert len(problems) == 3
