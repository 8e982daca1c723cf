"""labkit.paths: every derived path follows LAB_ROOT / LABKIT_* set at call time, not at import."""
from __future__ import annotations

from pathlib import Path

import pytest

from labkit import paths

PACKAGE_PARENT = Path(paths.__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("LAB_ROOT", "LABKIT_DATA", "LABKIT_CACHE", "LABKIT_SHARED_DATASETS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_are_relative_to_the_package(clean_env):
    assert paths.repo_root() == PACKAGE_PARENT
    assert paths.results_dir("wae", "quick") == PACKAGE_PARENT / "results" / "wae" / "quick"
    assert paths.data_dir() == PACKAGE_PARENT / "data"
    assert paths.cache_dir("classification") == PACKAGE_PARENT / "data" / "cache" / "classification"
    assert paths.profiles_dir() == PACKAGE_PARENT / "profiles"
    assert paths.notebooks_dir() == PACKAGE_PARENT / "notebooks"
    assert paths.shared_datasets_dir() == PACKAGE_PARENT.parent / "shared" / "datasets"


def test_environment_set_after_import_is_honoured(clean_env, tmp_path):
    root = tmp_path / "checkout"
    clean_env.setenv("LAB_ROOT", str(root))
    assert paths.repo_root() == root.resolve()
    assert paths.results_dir() == root.resolve() / "results"
    assert paths.data_dir() == root.resolve() / "data"
    assert paths.cache_dir() == root.resolve() / "data" / "cache"
    assert paths.shared_datasets_dir() == root.resolve().parent / "shared" / "datasets"
    assert paths.repo_path("results/x.pt") == root.resolve() / "results" / "x.pt"
    assert paths.repo_path(tmp_path / "abs.pt") == tmp_path / "abs.pt"          # absolute paths stay
    clean_env.setenv("LABKIT_DATA", str(tmp_path / "d"))
    clean_env.setenv("LABKIT_CACHE", str(tmp_path / "c"))
    clean_env.setenv("LABKIT_SHARED_DATASETS", str(tmp_path / "s"))
    assert paths.data_dir() == tmp_path / "d"
    assert paths.cache_dir("classification") == tmp_path / "c" / "classification"
    assert paths.shared_datasets_dir() == tmp_path / "s"


def test_study_defaults_follow_lab_root(clean_env, tmp_path):
    """The studies read their default folders from labkit.paths when asked, not at import."""
    from labkit import data
    from labkit.studies import draw_app
    from labkit.studies import classification as clf
    from labkit.studies import wae
    from labkit.studies.configs import ClassificationConfig
    from labkit.studies.imputers import imputer_settings
    from labkit.studies.wae import WAEConfig

    clean_env.setenv("LAB_ROOT", str(tmp_path))
    root = tmp_path.resolve()
    cfg = imputer_settings(ClassificationConfig(profile="p"))
    assert clf.results_path(ClassificationConfig(profile="p")) == root / "results" / "classification" / "p"
    assert cfg.cache_path() == root / "data" / "cache" / "classification"
    assert cfg.resolve("results/dmfa/{dataset}{mask_suffix}.pt", "svhn", "noise") == root / "results/dmfa/svhn_noise.pt"
    assert wae.results_path(WAEConfig(profile="p")) == root / "results" / "wae" / "p"
    assert imputer_settings(WAEConfig(profile="p")).cache_path() == cfg.cache_path()
    assert draw_app.draw_dir() == root / "results" / "draw"
    assert draw_app.classifier_path(draw_app.ZERO).parent == root / "results" / "draw"
    assert data.default_root() == root / "data"
