"""The CIFAR-10 row of the lab: the offline loader, the fully convolutional DMFA on 3x32x32 images
with NaN at missing pixels, the 3-channel MisConv classifier, the RGB inpainting figure, and quick
smokes of notebooks 01 and 02 on a few hundred real images (those that need the offline JPEG copy
skip, saying why, where it is absent)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from labkit import paths
from labkit.mfa import MFA
from labkit.models.dmfa import FullyConvDMFA, build_dmfa, test_masks
from tests.conftest import random_mfa
from tests.conftest import dmfa_recipe

#: the CIFAR-10 label order of the original data set's ``batches.meta`` (label i = CLASSES[i])
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _offline_tar():
    return paths.shared_datasets_dir() / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


def _skip_without_copy() -> None:
    tar = _offline_tar()
    if not tar.is_file():
        pytest.skip(f"no offline CIFAR-10 copy at {tar} (set LABKIT_SHARED_DATASETS to the folder holding "
                    "cifar10-jpeg/cifar10-jpeg.tar.gz)")
    if (paths.data_dir() / "cifar-10-batches-py").is_dir():
        pytest.skip(f"{paths.data_dir() / 'cifar-10-batches-py'} exists: the loader reads it before the JPEG copy")


def _image_digest(pixels: np.ndarray) -> str:
    """sha1 of an image's uint8 pixels laid out (C, H, W)."""
    return hashlib.sha1(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


# ============================================================================ the loader
def test_loader_reads_the_offline_copy_in_cifar10_label_order():
    """A few hundred test images: shape, dtype, range, labels; and each image's label is the
    CIFAR-10 index of the class folder its pixels come from, read here straight from the tar."""
    _skip_without_copy()
    from labkit.data import load_dataset

    test = load_dataset("cifar10", "test", limit=300, quiet=True)
    assert test.images.shape == (300, 3, 32, 32) and test.images.dtype == torch.float32
    assert float(test.images.min()) >= 0.0 and float(test.images.max()) <= 1.0
    assert test.labels.dtype == torch.int64 and set(test.labels.tolist()) <= set(range(10))
    assert "JPEG" in test.source, test.source
    # the fixed shuffle makes a prefix hold every class, none dominating
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.min()) >= 10 and int(counts.max()) <= 60, counts.tolist()

    # every test JPEG of the tar, decoded: pixels -> class folder
    from PIL import Image

    folder_of: dict[str, set] = {}
    with tarfile.open(_offline_tar()) as tf:
        for member in tf:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "test":
                with Image.open(io.BytesIO(tf.extractfile(member).read())) as im:
                    pixels = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
                folder_of.setdefault(_image_digest(pixels), set()).add(parts[1])
    assert sum(len(v) for v in folder_of.values()) == 10_000
    as_uint8 = (test.images * 255).round().to(torch.uint8).numpy()
    found = [folder_of.get(_image_digest(img)) for img in as_uint8]
    assert all(f is not None and len(f) == 1 for f in found), "loaded images that are not in the tar's test split"
    expected = [CLASSES.index(next(iter(f))) for f in found]
    assert test.labels.tolist() == expected

    train = load_dataset("cifar10", "train", limit=200, quiet=True)
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.float32
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    assert set(train.labels.tolist()) == set(range(10))


# ============================================================================ the DMFA
def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """``(n, 3, 32, 32)`` in [0, 1]: upsampled 4x4 noise, so that neighbouring pixels correlate."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def test_fully_conv_dmfa_shapes_and_nan_at_missing_pixels():
    torch.manual_seed(0)
    model = build_dmfa("cifar10", n_components=2, n_factors=3)
    assert isinstance(model, FullyConvDMFA) and model.image_shape == (3, 32, 32)
    B = 4
    x = _smooth_images(B)
    missing = test_masks(B, 32, 32, seed=0)                               # (B, 1, 32, 32), 16x16 squares
    assert int(missing[0].sum()) == 16 * 16
    x_nan = x.masked_fill(missing.expand_as(x), float("nan"))
    other = torch.where(missing.expand_as(x), torch.full_like(x, 1e6), x)   # another value at missing pixels
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            mfa = model(x_nan, missing, validate=True)
            ref = model(other, missing)
        assert mfa.weights.shape == (B, 2)
        assert mfa.means.shape == (B, 2, 3, 32, 32) and mfa.variances.shape == (B, 2, 3, 32, 32)
        assert mfa.factors.shape == (B, 2, 3, 3, 32, 32)
        for name in ("weights", "means", "factors", "variances"):
            value = getattr(mfa, name)
            assert torch.isfinite(value).all(), f"{name} not finite with NaN at the missing pixels"
            assert torch.equal(value, getattr(ref, name)), f"the values at missing pixels changed {name}"
        assert torch.allclose(mfa.weights.sum(1), torch.ones(B))
        assert float(mfa.variances.min()) > model.min_variance
        assert float(mfa.factors.abs().max()) <= 0.1                          # the RGB factor bound
        assert torch.isfinite(mfa.log_prob(x, missing)).all()


@pytest.mark.parametrize("warmup", [0, 1])
def test_train_dmfa_step_with_mse_warmup(warmup):
    """One incomplete-data training step of the fully convolutional DMFA: finite loss, and the MSE
    warm-up adds the squared error of the mean to the NLL only while it lasts."""
    from labkit.models.dmfa_training import train_dmfa

    torch.manual_seed(0)
    model = build_dmfa("cifar10")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = dmfa_recipe(epochs=1, batch_size=8, lr=1e-3, mse_warmup_epochs=warmup, precision="32")
    history = train_dmfa(model, _smooth_images(8), recipe, mode="incomplete", seed=0, device="cpu", progress=False)
    (h,) = history
    assert h["batches"] == 1
    for k in ("loss", "nll", "sse"):
        assert math.isfinite(h[k]), f"{k} = {h[k]}"
    assert h["sse"] > 0
    expected = h["nll"] + (h["sse"] if warmup else 0.0)
    assert h["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


# ============================================================================ MisConv, 3 channels
def test_cifar10_classifier_with_misconv_front(eager_misconv):
    from labkit.models.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("cifar10", "dmfa_misconv_complete").eval()
    assert model.front.in_channels == 3
    B = 2
    x = _smooth_images(B, seed=1)
    missing = test_masks(B, 32, 32, seed=1)
    x_nan = x.masked_fill(missing.expand_as(x), float("nan"))
    mfa = random_mfa(B=B, K=2, L=3, C=3, H=32, W=32, seed=0, dtype=torch.float32, factor_scale=0.1)
    with torch.no_grad():
        logits = model(x_nan, missing, mfa)
        filled = model(torch.where(missing.expand_as(x), torch.zeros_like(x), x), missing, mfa)
        other = model(x_nan, missing, random_mfa(B=B, K=2, L=3, C=3, H=32, W=32, seed=1, dtype=torch.float32,
                                                 factor_scale=0.1))
    assert logits.shape == (B, 10) and torch.isfinite(logits).all()
    assert torch.equal(logits, filled)                    # the values at missing pixels change nothing
    assert not torch.allclose(logits, other)              # the MFA over them does


# ============================================================================ the RGB figure
class _FixedMFA(nn.Module):
    """``forward(x, missing) -> MFA``: the same MFA for every call (one component, zero factors)."""

    def __init__(self, means: torch.Tensor, variances: torch.Tensor):
        super().__init__()
        self.means, self.variances = means, variances

    def forward(self, x, missing, *, validate=False):
        B, C, H, W = x.shape
        return MFA(torch.ones(B, 1), self.means[:B, None], torch.zeros(B, 1, 2, C, H, W),
                   self.variances[:B, None])


def test_rgb_inpainting_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.studies.density_figures import plot_inpainting

    n, S, L = 2, 3, 2
    x = _smooth_images(n, seed=2)
    missing = test_masks(n, 32, 32, seed=2)
    # per-channel std 0.1, 0.2, 0.3 (image 0) and twice that (image 1): the map is their mean
    std = torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.4, 0.6]]).view(n, 3, 1, 1).expand(n, 3, 32, 32)
    model = _FixedMFA(torch.full((n, 3, 32, 32), 0.5), std ** 2)
    fig = plot_inpainting(model, x, missing, n_samples=S, device="cpu", title="synthetic RGB")
    try:
        n_cols = 4 + S + L
        grid = fig.axes[:n * n_cols]
        assert [ax.get_title() for ax in grid[:n_cols]] == ["original", "input", "mean", "sample 1", "sample 2",
                                                            "sample 3", "std", "factor 1", "factor 2"]
        for i in range(n):
            row = grid[i * n_cols:(i + 1) * n_cols]
            original = np.asarray(row[0].images[0].get_array())
            assert original.shape == (32, 32, 3)                          # drawn in RGB
            np.testing.assert_allclose(original, x[i].permute(1, 2, 0).numpy(), atol=1e-6)
            mean = np.asarray(row[2].images[0].get_array())
            m = missing[i, 0].numpy()
            assert mean.shape == (32, 32, 3) and np.allclose(mean[m], 0.5) and np.allclose(mean[~m], original[~m])
            sd = np.asarray(row[3 + S].images[0].get_array())
            assert sd.shape == (32, 32)                                   # one map: the mean over R, G, B
            np.testing.assert_allclose(sd[m], 0.2 * (i + 1), rtol=1e-5)
            assert np.all(sd[~m] == 0)
            assert row[3 + S].images[0].get_clim() == pytest.approx((0.0, 0.4), rel=1e-5)   # one scale for the column
        bar = grid[(n - 1) * n_cols + 3 + S].images[0].colorbar             # under the std column
        assert bar is not None, "the std column has no colour bar"
        label = bar.ax.get_xlabel() + bar.ax.get_ylabel()
        assert "std" in label and "pixel value" in label and "R,G,B" in label
        assert bar.mappable.get_clim() == pytest.approx((0.0, 0.4), rel=1e-5)
    finally:
        plt.close(fig)


# ============================================================================ the notebooks
@pytest.mark.slow
def test_notebook_01_smoke_cifar10(tmp_path):
    """Notebook 01 on 200 CIFAR-10 training and 40 test images through its ``dataset`` parameter:
    16x16 holes (half the side), a fully convolutional DMFA, the classical MFA on 3x32x32."""
    _skip_without_copy()
    from labkit.lab.run_notebooks import execute

    res = tmp_path / "res"
    execute("01_dmfa", "quick", output_dir=tmp_path, dataset="cifar10", n_train=200, n_val=20, n_test=40,
            mfa_components=2, mfa_iterations=3, acflow="", results_dir=str(res), device="cpu")
    setting = json.loads((res / "cifar10_incomplete.json").read_text())
    assert setting["hole"] == 16 and setting["n_test"] == 40 and setting["n_train"] == 180
    assert setting["model"]["architecture"] == "fully_conv_small"
    assert math.isfinite(setting["test_nll"]) and math.isfinite(setting["test_sse"])
    import pandas as pd

    scores = pd.read_csv(res / "cifar10_incomplete.csv")
    assert len(scores) == 40 and (scores["n_missing"] == 3 * 16 * 16).all()
    for name in ("cifar10_incomplete.png", "cifar10_incomplete_curves.png", "cifar10_mfa_K2_L4.csv",
                 "cifar10_mfa_K2_L4.png"):
        assert (res / name).is_file(), name
    mfa = json.loads((res / "cifar10_mfa_K2_L4.json").read_text())
    assert mfa["hole"] == 16 and math.isfinite(mfa["test_nll"])


@pytest.mark.slow
def test_notebook_02_smoke_cifar10(tmp_path):
    """Notebook 02 on 200 CIFAR-10 training and 60 test images with the paper's CIFAR-10 batch and
    learning rate; a DMFA method without its checkpoint is reported as not ready, not run."""
    _skip_without_copy()
    import nbformat

    from labkit.lab.run_notebooks import execute
    from labkit.studies import classification as clf

    res = tmp_path / "res"
    absent = tmp_path / "no_dmfa_{dataset}.pt"
    out = execute("02_classification", "quick", output_dir=tmp_path, dataset="cifar10", masks=["square"],
                  methods=["zero", "dmfa_misconv_complete"], epochs=1, batch_size=None, lr=None, seeds=[0],
                  n_train=200, n_test=60, dmfa_complete=str(absent), results_dir=str(res), device="cpu")
    df = clf.read_results(res / "accuracy.csv")
    assert df["method"].tolist() == ["zero"] and (df["dataset"] == "cifar10").all() and (df["n_test"] == 60).all()
    settings = json.loads(df["settings"].iloc[0])
    assert (settings["batch_size"], settings["lr"]) == (64, 1e-4)          # PAPER_HYPERPARAMETERS["cifar10"]
    assert 0.0 <= float(df["accuracy"].iloc[0]) <= 1.0
    assert (res / "accuracy.png").is_file()
    nb = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "dmfa_misconv_complete    NOT READY" in text and str(absent).format(dataset="cifar10") in text
    assert "zero front: (4, 3, 32, 32) -> (4, 32, 32, 32)" in text
    assert "paper square" not in text                                       # MNIST's Table 1 is not shown beside CIFAR-10
