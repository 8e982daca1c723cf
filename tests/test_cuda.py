"""What only a GPU can check: the CUDA code paths against the CPU (skipped without CUDA).

On CUDA, MisConv's fast path compiles to Triton kernels and evaluates Φ with ``torch.erfc``, not
the erfc-free fits the CPU uses in float32; so it is compared here with the float64 eager formula
computed on the CPU. TF32 is switched off in the comparisons (the default for cuDNN convolutions
would round their inputs to 10 mantissa bits); the trainers run with the defaults users get.
Other CUDA checks live beside their subject: the masks (``test_masks.py``), the draw panels
(``test_draw.py``), the flow (``test_acflow.py``) and the 16-bit scaler (``test_precision.py``).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from labkit import precision as P
from labkit.checkpoint import load_checkpoint
from labkit.mfa import MFA
from labkit.models.dmfa import build_dmfa, test_masks
from labkit.misconv import MisConv2d
from tests.conftest import random_mfa
from tests.conftest import dmfa_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _mfa_to(mfa: MFA, device, dtype) -> MFA:
    return MFA(*(t.detach().to(device, dtype) for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances)))


def _forward_and_grads(conv: MisConv2d, x, missing, mfa: MFA):
    """Output and the gradients of a fixed projection of it w.r.t. the weights and every MFA tensor."""
    leaves = [conv.weight, conv.bias, mfa.weights, mfa.means, mfa.factors, mfa.variances]
    for t in leaves:
        t.requires_grad_(True)
    out = conv(x, missing, mfa)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return out.detach(), torch.autograd.grad((out * probe).sum(), leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cfg", [dict(C=1), dict(C=3, K=2, L=3), dict(C=2, K=2, stride=2, padding=2, dilation=2),
                                 dict(C=2, noise=True)], ids=["C1-direct", "C3-K2", "strided", "noise-full"])
def test_compiled_misconv_on_cuda_equals_the_float64_formula_on_the_cpu(cfg, dtype, no_tf32):
    cfg = dict(cfg)
    C, K, L, noise = cfg.pop("C"), cfg.pop("K", 1), cfg.pop("L", 2), cfg.pop("noise", False)
    B, H, W = 3, 12, 11
    torch.manual_seed(0)
    ref_conv = MisConv2d(C, 4, 3, padding=cfg.pop("padding", 1), dtype=torch.float64, fast=False, **cfg)
    mfa = random_mfa(B=B, K=K, L=L, C=C, H=H, W=W, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(B, C, H, W, dtype=torch.float64, generator=g)
    missing = torch.zeros(B, 1, H, W, dtype=torch.bool)
    if noise:
        missing = torch.rand(missing.shape, generator=g) < 0.7
    else:
        missing[0, :, 2:5, 3:6] = True
        missing[1, :, H - 4:, 0:3] = True
    x = x.masked_fill(missing.expand_as(x), float("nan"))
    ref, ref_grads = _forward_and_grads(ref_conv, x, missing, mfa)

    conv = copy.deepcopy(ref_conv).to(CUDA, dtype)
    conv.fast = True
    out, grads = _forward_and_grads(conv, x.to(CUDA, dtype), missing.to(CUDA), _mfa_to(mfa, CUDA, dtype))
    assert out.device.type == "cuda" and out.dtype == dtype and torch.isfinite(out).all()
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu().double(), ref, **tol)
    for name, a, b in zip(["weight", "bias", "mfa.weights", "mfa.means", "mfa.factors", "mfa.variances"], grads, ref_grads):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.cpu().double(), b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 100,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """``(n, 3, 32, 32)`` in [0, 1] with correlated neighbours (upsampled 4x4 noise)."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def test_fully_conv_dmfa_on_cuda_matches_the_cpu(no_tf32):
    """The CIFAR-10 DMFA with NaN at the missing pixels: float32 on CUDA against float64 on the CPU
    (same weights), and under bf16-mixed autocast on CUDA its heads still come out float32 and close."""
    torch.manual_seed(0)
    model = build_dmfa("cifar10", n_components=2, n_factors=3).eval()
    x = _smooth_images(4)
    missing = test_masks(4, 32, 32, seed=0, device="cpu")
    x = x.masked_fill(missing.expand_as(x), float("nan"))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double(), missing)
        gpu = model.to(CUDA)
        got = gpu(x.to(CUDA), missing.to(CUDA))
        with P.autocast("bf16-mixed", CUDA):
            low = gpu(x.to(CUDA), missing.to(CUDA))
    for name in ("weights", "means", "factors", "variances"):
        a, b, c = getattr(got, name), getattr(ref, name), getattr(low, name)
        assert a.device.type == "cuda" and torch.isfinite(a).all() and torch.isfinite(c).all(), name
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert c.dtype == torch.float32, name
        # bfloat16 keeps 8 mantissa bits: a few per cent of each head's range
        assert float((c - a).abs().max()) <= 0.1 * float(a.abs().max()) + 1e-3, name
    lp = got.log_prob(x.to(CUDA).nan_to_num(), missing.to(CUDA))
    torch.testing.assert_close(lp.cpu().double(), ref.log_prob(x.double().nan_to_num(), missing), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_trainers_on_cuda_under_mixed_precision(tmp_path, precision):
    """Both trainers on CUDA with the defaults users get: the fully convolutional DMFA (with the MSE
    warm-up) and the classifier with a MisConv front; finite losses, weights that moved, the precision
    (and for 16-mixed the gradient scaler) in the checkpoint, and the MisConv front kept float32."""
    from labkit.models.classifier import build_classifier, train_classifier
    from labkit.models.dmfa_training import train_dmfa

    torch.manual_seed(0)
    dmfa = build_dmfa("cifar10")
    before = {k: v.clone() for k, v in dmfa.state_dict().items()}
    recipe = dmfa_recipe(epochs=2, batch_size=8, lr=1e-3, mse_warmup_epochs=1, precision=precision)
    hist = train_dmfa(dmfa, _smooth_images(16), recipe, mode="incomplete", seed=0, device="cuda", progress=False,
                      checkpoint=tmp_path / "d.pt")
    assert all(math.isfinite(h[k]) for h in hist for k in ("loss", "nll", "sse"))
    assert any(not torch.equal(before[k], v.cpu()) for k, v in dmfa.state_dict().items())
    saved = load_checkpoint(tmp_path / "d.pt")
    assert saved["config"]["precision"] == precision
    if precision == "16-mixed":
        assert saved["scaler"]["scale"] > 0

    n, size = 16, 32
    g = torch.Generator().manual_seed(2)
    missing = test_masks(n, size, size, seed=3, device="cpu")
    data = SimpleNamespace(train_images=_smooth_images(n, seed=4), train_labels=torch.randint(10, (n,), generator=g),
                           train_missing=missing, fit_idx=torch.arange(12), val_idx=torch.arange(12, 16))

    class DMFAOutputs:  # the study's aux source: the DMFA's MFA for each batch, on the batch's device
        def get(self, idx, x, j):
            with torch.no_grad():
                return P.to_float32(dmfa.eval()(x, j))

    model = build_classifier("cifar10", "dmfa_misconv_complete")
    front = set()
    model.front.register_forward_hook(lambda m, i, out: front.add(out.dtype))
    hist, _ = train_classifier(model, data, DMFAOutputs(), epochs=2, batch_size=4, lr=1e-3, seed=0, progress=False,
                               device="cuda", precision=precision, checkpoint=tmp_path / "c.pt", select="last")
    assert all(math.isfinite(h[k]) for h in hist for k in ("loss", "acc", "val_accuracy"))
    assert front == {torch.float32}
    assert next(model.parameters()).device.type == "cuda"
    assert load_checkpoint(tmp_path / "c.pt")["config"]["precision"] == precision
