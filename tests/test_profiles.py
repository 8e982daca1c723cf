"""profiles/*.yaml and labkit.profiles."""
from __future__ import annotations

import re

import pytest

from labkit.profiles import (
    PROFILES_DIR,
    available_profiles,
    load_profile,
    notebook_parameters,
    parse_override,
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
        assert quick[nb]["epochs"] == 1 and quick[nb]["n_train"] <= 1000  # minutes on 2 cores
        assert cpu[nb]["n_train"] == 10000  # all offline MNIST training images
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
    with pytest.raises(ValueError, match=r"unknown profile 'fast': profiles in .* are cpu, paper, quick"):
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


def test_profiles_dir_is_the_repositorys():
    assert (PROFILES_DIR / "quick.yaml").is_file()


def test_environment_yml_pins_match_pyproject():
    """environment.yml (conda users) must install exactly what pyproject.toml pins."""
    import tomllib

    import yaml

    from labkit.profiles import REPO_ROOT

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip_section) - {"-e .[test]"} == pins
    assert "-e .[test]" in pip_section
    python = project["requires-python"].removeprefix(">=")
    assert f"python={python}" in env["dependencies"]
