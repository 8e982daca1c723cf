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
    assert profile["defaults"]["device"] == "auto" and profile["defaults"]["seed"] == 0
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


def test_profiles_name_the_same_notebooks_with_the_same_parameters():
    sections = {name: load_profile(name) for name in PROFILES}
    for name, profile in sections.items():
        assert set(profile) - {"defaults"} == set(NOTEBOOKS), f"{name}.yaml"
    for notebook in NOTEBOOKS:
        keys = {name: sorted(profile[notebook]) for name, profile in sections.items()}
        assert keys["quick"] == keys["cpu"] == keys["paper"], f"{notebook}: parameters differ between profiles: {keys}"


def test_profile_sizes_grow_from_quick_to_paper():
    quick, cpu, paper = (load_profile(n) for n in PROFILES)
    for nb in ("01_dmfa", "02_classification", "03_wae"):
        assert cpu[nb]["n_train"] == 10000  # all offline MNIST training images
        assert quick[nb]["epochs"] == 1 and quick[nb]["n_train"] <= 6000  # about a minute per study on 2 cores
        assert paper[nb]["n_train"] is None  # the whole split
    # the paper's protocol (supplementary, section 1)
    assert (paper["01_dmfa"]["epochs"], paper["01_dmfa"]["batch_size"], paper["01_dmfa"]["lr"]) == (20, 48, 4e-5)
    clf = paper["02_classification"]
    assert (clf["epochs"], clf["batch_size"], clf["lr"], clf["seeds"]) == (10, 24, 1e-3, [0, 1, 2])
    assert (paper["03_wae"]["epochs"], paper["03_wae"]["batch_size"], len(paper["03_wae"]["seeds"])) == (20, 128, 3)
    assert paper["04_timing"]["repeats"] == 5000
    for name in PROFILES:
        assert load_profile(name)["00_misconv_tour"] == {"n_images": 8, "mc_samples": 20000}


def test_notebook_parameters_merge_defaults_under_the_section():
    params = notebook_parameters("quick", "01_dmfa")
    assert params["profile"] == "quick" and params["device"] == "auto"
    assert params["epochs"] == 1
    assert notebook_parameters("quick", "notebooks/01_dmfa.ipynb") == params
    assert load_profile("quick", "01_dmfa") == params  # the ARCHITECTURE.md form


def test_section_overrides_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("defaults: {device: auto, seed: 0}\n01_dmfa: {seed: 5, epochs: 2}\n")
    assert notebook_parameters(str(path), "01_dmfa") == {"profile": "mine", "device": "auto", "seed": 5, "epochs": 2}
    assert notebook_parameters(load_profile(str(path)), "01_dmfa") == {"device": "auto", "seed": 5, "epochs": 2}


def test_unknown_profile_and_notebook_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown profile 'fast': profiles in .* are cpu, cpu10, paper, quick"):
        load_profile("fast")
    with pytest.raises(ValueError, match=r"profile 'quick' has no section for notebook '09_x'; its notebook "
                                         r"sections are: 00_misconv_tour, 01_dmfa, "):
        notebook_parameters("quick", "09_x")
    with pytest.raises(ValueError, match="profile file 'nope.yaml' does not exist"):
        load_profile("nope.yaml")


def test_malformed_profiles_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {device: auto}\n01_dmfa: {n-train: 5}\n")
    with pytest.raises(ValueError, match=r"parameter 'n-train' in section '01_dmfa' is not a valid Python identifier"):
        load_profile(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a mapping of sections, got list"):
        load_profile(str(bad))
    bad.write_text("01_dmfa: [1, 2]\n")
    with pytest.raises(ValueError, match="section '01_dmfa' must be a mapping of parameters, got list"):
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
        assert {"profile", "device", "seed"} <= assigned, nb.stem


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
    assert profile_problems(name, inferred) == []


def test_profile_problems_names_unknown_keys_and_bad_types(tmp_path, inferred):
    path = tmp_path / "typo.yaml"
    path.write_text("defaults: {device: auto, seed: 0}\n"
                    "00_misconv_tour: {n_imagez: 8, mc_samples: many}\n"
                    "07_nope: {}\n")
    problems = profile_problems(str(path), {"00_misconv_tour": inferred["00_misconv_tour"]})
    text = "\n".join(problems)
    assert "unknown parameter 'n_imagez' for 00_misconv_tour; did you mean 'n_images'? (set by profile typo)" in text
    assert "parameter 'mc_samples' of 00_misconv_tour must be an integer (default 20000), got str 'many'" in text
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
    spec = {"n_images": Parameter("n_images", "8"), "mc_samples": Parameter("mc_samples", "20000")}
    with pytest.raises(ValueError) as err:
        check_parameters("00_misconv_tour", {"n_imagez": 3, "mc_samples": "x"}, spec,
                         origins={"n_imagez": "-p n_imagez=3"})
    lines = str(err.value).splitlines()
    assert lines[0] == "unknown parameter 'n_imagez' for 00_misconv_tour; did you mean 'n_images'? (set by -p n_imagez=3)"
    assert lines[1] == "parameter 'mc_samples' of 00_misconv_tour must be an integer (default 20000), got str 'x'"
    with pytest.raises(ValueError, match=r"unknown parameter 'zzz' for nb; its parameters are: mc_samples, n_images"):
        check_parameters("nb", {"zzz": 1}, spec)
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


def test_apply_overrides_sets_values_in_order_and_names_a_misspelt_key():
    from labkit.lab.profiles import apply_overrides

    params = {"epochs": 5, "lr": 1e-3}
    out = apply_overrides(params, ["epochs=2", "lr=4e-5", "epochs=3"], where="the toy section")
    assert out == {"epochs": 3, "lr": 4e-5} and params == {"epochs": 5, "lr": 1e-3}   # a copy
    with pytest.raises(ValueError, match=r"-p epoch=2: 'epoch' is not a key of the toy section \(did you mean epochs\?\)"):
        apply_overrides(params, ["epoch=2"], where="the toy section")
    with pytest.raises(ValueError, match=r"'zzz' is not a key of here \(keys: epochs, lr\)"):
        apply_overrides(params, ["zzz=1"], where="here")
    # keys beyond the section's (a config's other fields) when given
    assert apply_overrides(params, ["results_dir=/tmp/x"], where="w", valid={"epochs", "lr", "results_dir"}) == \
        {"epochs": 5, "lr": 1e-3, "results_dir": "/tmp/x"}
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_overrides(params, ["epochs"], where="w")


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
    a, b = cpu["02_classification"], cpu10["02_classification"]
    assert b["seeds"] == list(range(10)) and b["init"] == "shared" and b["dmfa_replicates"] == 3
    assert all(b[k] == a[k] for k in ("n_train", "n_test", "epochs", "batch_size", "lr", "precision", "val_fraction"))
    assert "{replicate}" in b["dmfa_complete"] and "{replicate}" in b["dmfa_incomplete"]
