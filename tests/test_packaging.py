"""The packaging files agree with each other.

pyproject.toml states ranges (what labkit works with), constraints.txt pins one exact version of
every package pyproject names (what the lab is tested with), and environment.yml repeats those pins
for conda users. These tests keep the three in step, and check the license metadata and the
citation file. Each checker returns a list of problems; the tests feed them broken copies too, so a
checker that stopped looking would fail here.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------
def project_requirements(pyproject: dict) -> dict[str, Requirement]:
    """Every requirement pyproject names (core and every extra), by canonical name.

    A self-reference such as ``labkit[lab]`` (an extra that pulls in another) is left out.
    """
    project = pyproject["project"]
    own = canonicalize_name(project["name"])
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    reqs: dict[str, Requirement] = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == own:
            continue
        if name in reqs and str(reqs[name].specifier) != str(req.specifier):
            raise ValueError(f"pyproject.toml names {req.name} twice with different ranges: "
                             f"{reqs[name].specifier} and {req.specifier}")
        reqs[name] = req
    return reqs


def parse_pins(lines: list[str], source: str) -> dict[str, str]:
    """``name==version`` lines (comments and blanks skipped) as {canonical name: version}.

    Raises ValueError naming the line when an entry is not one exact ``==`` pin or repeats a name.
    """
    pins: dict[str, str] = {}
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise ValueError(f"{source}: {line!r} is not an exact pin (name==version)")
        name = canonicalize_name(req.name)
        if name in pins:
            raise ValueError(f"{source}: {req.name} is pinned twice")
        pins[name] = specs[0].version
    return pins


def constraints_pins(text: str) -> dict[str, str]:
    return parse_pins(text.splitlines(), "constraints.txt")


def environment_parts(text: str) -> tuple[str | None, dict[str, str], list[str]]:
    """environment.yml as (conda python spec, pip pins, pip option lines such as ``-e .[test]``)."""
    env = yaml.safe_load(text)
    python = None
    pip_lines: list[str] = []
    for dep in env.get("dependencies", []):
        if isinstance(dep, str) and re.match(r"python\s*[=<>]", dep):
            python = dep.split("=", 1)[1].lstrip("=")
        elif isinstance(dep, dict) and "pip" in dep:
            pip_lines.extend(dep["pip"])
    options = [line for line in pip_lines if line.lstrip().startswith("-")]
    pins = parse_pins([line for line in pip_lines if not line.lstrip().startswith("-")], "environment.yml")
    return python, pins, options


# ---------------------------------------------------------------------------------------------
# Checkers: each returns the list of problems it found
# ---------------------------------------------------------------------------------------------
def pin_problems(reqs: dict[str, Requirement], pins: dict[str, str]) -> list[str]:
    """Every pyproject requirement is pinned, inside its range; nothing else is pinned."""
    problems = []
    for name, req in sorted(reqs.items()):
        if name not in pins:
            problems.append(f"{req.name} is in pyproject.toml but not pinned in constraints.txt")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's range "
                            f"'{req.specifier}'")
    for name in sorted(set(pins) - set(reqs)):
        problems.append(f"constraints.txt pins {name}, which pyproject.toml does not name")
    return problems


def environment_problems(env_pins: dict[str, str], pins: dict[str, str]) -> list[str]:
    """environment.yml pins exactly what constraints.txt pins, at the same versions."""
    problems = []
    for name in sorted(set(pins) | set(env_pins)):
        if name not in env_pins:
            problems.append(f"{name}=={pins[name]} is in constraints.txt but not in environment.yml")
        elif name not in pins:
            problems.append(f"environment.yml pins {name}, which constraints.txt does not")
        elif env_pins[name] != pins[name]:
            problems.append(f"{name}: environment.yml pins {env_pins[name]}, constraints.txt {pins[name]}")
    return problems


def requires_python_problems(python_spec: str | None, requires_python: str) -> list[str]:
    if python_spec is None:
        return ["environment.yml does not name a python version"]
    if not SpecifierSet(requires_python).contains(Version(python_spec)):
        return [f"environment.yml asks for python {python_spec}, outside requires-python '{requires_python}'"]
    return []


def license_problems(pyproject: dict, root: Path) -> list[str]:
    project = pyproject["project"]
    problems = []
    if project.get("license") != "MIT":
        problems.append(f"project.license must be the SPDX string 'MIT', got {project.get('license')!r}")
    files = project.get("license-files", [])
    if "LICENSE" not in files:
        problems.append(f"project.license-files must list LICENSE, got {files!r}")
    path = root / "LICENSE"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for needle in ("MIT License", "Copyright (c) 2026 the misconv-lab authors",
                   "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND"):
        if needle not in text:
            problems.append(f"LICENSE lacks {needle!r}")
    if any("License ::" in c for c in project.get("classifiers", [])):
        problems.append("a 'License ::' classifier next to an SPDX license string is rejected by setuptools")
    return problems


def build_system_problems(pyproject: dict) -> list[str]:
    """setuptools is required with a lower bound that reads SPDX license strings (77) and a cap."""
    problems = []
    reqs = [Requirement(r) for r in pyproject["build-system"]["requires"]]
    setuptools = [r for r in reqs if canonicalize_name(r.name) == "setuptools"]
    if not setuptools:
        return ["build-system.requires does not name setuptools"]
    spec = setuptools[0].specifier
    if spec.contains("76.1.0"):
        problems.append(f"setuptools '{spec}' admits releases older than 77, which reject license = \"MIT\"")
    if not any(s.operator in ("<", "<=", "==", "~=") for s in spec):
        problems.append(f"setuptools '{spec}' has no upper bound")
    return problems


CFF_AUTHORS = {  # family name -> given names, for both papers
    "Przewięźlikowski": "Marcin", "Śmieja": "Marek", "Struski": "Łukasz", "Tabor": "Jacek",
}


def citation_problems(cff: dict, version: str) -> list[str]:
    """The parts of CFF 1.2.0 this project relies on (the full schema is checked by cffconvert)."""
    problems = []
    for key in ("cff-version", "message", "title", "authors"):
        if key not in cff:
            problems.append(f"CITATION.cff lacks the required key {key!r}")
    if str(cff.get("cff-version")) != "1.2.0":
        problems.append(f"cff-version must be 1.2.0, got {cff.get('cff-version')!r}")
    if str(cff.get("version")) != version:
        problems.append(f"CITATION.cff version {cff.get('version')!r} differs from pyproject's {version!r}")
    if cff.get("license") != "MIT":
        problems.append(f"CITATION.cff license must be MIT, got {cff.get('license')!r}")
    for i, author in enumerate(cff.get("authors", [])):
        if not isinstance(author, dict) or not ({"family-names", "name"} & set(author)):
            problems.append(f"author {i} needs family-names (a person) or name (an entity)")
    refs = {str(r.get("title", "")).lower(): r for r in cff.get("references", []) if isinstance(r, dict)}
    wanted = {
        "misconv: convolutional neural networks for missing data": ("2110.14010", 4),
        "estimating conditional density of missing values using deep gaussian mixture model": ("2010.02183", 3),
    }
    for title, (arxiv, n_authors) in wanted.items():
        ref = refs.get(title)
        if ref is None:
            problems.append(f"CITATION.cff references lack {title!r}")
            continue
        for key in ("type", "authors", "year"):
            if key not in ref:
                problems.append(f"reference {title!r} lacks {key!r}")
        ids = " ".join(str(v) for v in (ref.get("url", ""), ref.get("identifiers", "")))
        if arxiv not in ids:
            problems.append(f"reference {title!r} does not give arXiv:{arxiv}")
        names = [a.get("family-names") for a in ref.get("authors", [])]
        if len(names) != n_authors or any(CFF_AUTHORS.get(n) is None for n in names):
            problems.append(f"reference {title!r} has authors {names}")
    return problems


# ---------------------------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return constraints_pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))


def test_every_dependency_is_pinned_inside_its_range(pyproject, pins):
    reqs = project_requirements(pyproject)
    assert {"torch", "numpy", "scikit-image", "ray", "pytest"} <= set(reqs)
    assert pin_problems(reqs, pins) == []


def test_environment_yml_has_the_same_pins(pyproject, pins):
    python, env_pins, options = environment_parts((ROOT / "environment.yml").read_text(encoding="utf-8"))
    assert environment_problems(env_pins, pins) == []
    assert requires_python_problems(python, pyproject["project"]["requires-python"]) == []
    # the lab itself, editable, with the extras ./lab installs (test pulls in lab)
    assert any(re.fullmatch(r"-e \.\[(.*,)?test(,.*)?\]", o.strip()) for o in options), options


def test_test_extra_pulls_in_the_lab_extra(pyproject):
    """The suite runs notebooks and the app, so `.[test]` alone must bring the lab's packages."""
    extras = pyproject["project"]["optional-dependencies"]
    own = canonicalize_name(pyproject["project"]["name"])
    self_refs = [Requirement(r) for r in extras["test"] if canonicalize_name(Requirement(r).name) == own]
    assert self_refs and "lab" in self_refs[0].extras


def test_license_and_build_requirement(pyproject):
    assert license_problems(pyproject, ROOT) == []
    assert build_system_problems(pyproject) == []


def test_citation_file(pyproject):
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation_problems(cff, pyproject["project"]["version"]) == []


# ---------------------------------------------------------------------------------------------
# The checkers catch what they are for (planted mistakes)
# ---------------------------------------------------------------------------------------------
def _reqs(*lines: str) -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(x).name): Requirement(x) for x in lines}


def test_pin_checker_catches_missing_out_of_range_and_extra_pins():
    reqs = _reqs("torch>=2.7", "scikit-image>=0.22", "numpy>=1.26,<3")
    good = {"torch": "2.14.1", "scikit-image": "0.26.0", "numpy": "2.4.6"}
    assert pin_problems(reqs, good) == []
    assert pin_problems(reqs, {**good, "numpy": "3.0.0"}) == [
        "constraints.txt pins numpy==3.0.0, outside pyproject's range '<3,>=1.26'"]
    assert pin_problems(reqs, {k: v for k, v in good.items() if k != "scikit-image"}) == [
        "scikit-image is in pyproject.toml but not pinned in constraints.txt"]
    assert pin_problems(reqs, {**good, "tifffile": "2026.3.3"}) == [
        "constraints.txt pins tifffile, which pyproject.toml does not name"]


def test_pin_parser_accepts_only_exact_pins_and_normalises_names():
    assert constraints_pins("# c\nScikit_Image==0.26.0  # why\n\nPyYAML==6.0.3\n") == {
        "scikit-image": "0.26.0", "pyyaml": "6.0.3"}
    for bad in ("torch>=2.7", "torch==2.*", "torch", "torch==2.14.1,<3"):
        with pytest.raises(ValueError, match="not an exact pin"):
            constraints_pins(bad)
    with pytest.raises(ValueError, match="pinned twice"):
        constraints_pins("ray==2.60.0\nRay==2.60.0")


def test_project_requirements_skip_the_self_reference_and_reject_conflicts():
    doc = {"project": {"name": "labkit", "dependencies": ["torch>=2.7"],
                       "optional-dependencies": {"lab": ["ray>=2.40"], "test": ["labkit[lab]", "pytest>=8"]}}}
    assert sorted(project_requirements(doc)) == ["pytest", "ray", "torch"]
    doc["project"]["optional-dependencies"]["lab"].append("torch>=2.0")
    with pytest.raises(ValueError, match="twice with different ranges"):
        project_requirements(doc)


def test_environment_checker_catches_drift():
    text = ("dependencies:\n  - python=3.11\n  - pip\n  - pip:\n"
            "      - torch==2.14.1\n      - ray==2.60.0\n      - -e .[test]\n")
    python, env_pins, options = environment_parts(text)
    assert (python, env_pins, options) == ("3.11", {"torch": "2.14.1", "ray": "2.60.0"}, ["-e .[test]"])
    assert environment_problems(env_pins, {"torch": "2.14.1", "ray": "2.60.0"}) == []
    assert environment_problems(env_pins, {"torch": "2.14.0", "ray": "2.60.0"}) == [
        "torch: environment.yml pins 2.14.1, constraints.txt 2.14.0"]
    assert environment_problems(env_pins, {"torch": "2.14.1"}) == [
        "environment.yml pins ray, which constraints.txt does not"]
    assert environment_problems({"torch": "2.14.1"}, {"torch": "2.14.1", "ray": "2.60.0"}) == [
        "ray==2.60.0 is in constraints.txt but not in environment.yml"]
    assert requires_python_problems("3.10", ">=3.11") != []
    assert requires_python_problems(None, ">=3.11") != []


def test_license_and_build_checkers_catch_old_forms(pyproject, tmp_path):
    old = {"project": {**pyproject["project"], "license": {"text": "MIT"}}}
    assert any("SPDX" in p for p in license_problems(old, ROOT))
    assert any("LICENSE lacks" in p for p in license_problems(pyproject, tmp_path))  # no LICENSE there
    assert build_system_problems({"build-system": {"requires": ["setuptools>=68"]}}) == [
        "setuptools '>=68' admits releases older than 77, which reject license = \"MIT\"",
        "setuptools '>=68' has no upper bound"]


def test_citation_checker_catches_missing_reference(pyproject):
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    cff["references"] = [r for r in cff["references"] if "MisConv" not in r["title"]]
    cff["version"] = "9.9.9"
    problems = citation_problems(cff, pyproject["project"]["version"])
    assert any("misconv" in p for p in problems) and any("version" in p for p in problems)
