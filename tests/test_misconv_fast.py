"""MisConv2d's fast path (window + fused elementwise, labkit/misconv_fast.py) against its eager path
(labkit.misconv.misconv_reference).

The fast path must compute the same function as the eager formula: same outputs and gradients
(float64: to rounding; float32: within float32 tolerances), NaN-safety, every stride / padding /
dilation / kernel shape, K > 1, L = 0, per-channel masks, masks that spread over the whole image
(the full-size path), images with nothing missing. Most comparisons run the fast algorithm's
kernels eagerly (LABKIT_MISCONV_COMPILE's switch off: seconds); ``test_compiled_*`` run them
through torch.compile (Inductor), which is what users get by default.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import labkit.misconv as MC
import labkit.misconv_fast as M
from labkit.mfa import MFA
from labkit.misconv import MisConv2d
from tests.conftest import random_mfa


@pytest.fixture
def eager_kernels(monkeypatch):
    """Run the fast path's kernels without torch.compile (the same Python functions), the direct
    kernel included (uncompiled, the layer would otherwise take the convolution path)."""
    monkeypatch.setattr(M, "_COMPILE", False)
    monkeypatch.setattr(M, "_DIRECT_EAGER", True)


@pytest.fixture
def spy(monkeypatch):
    """Names of the fast kernels that ran."""
    names = []
    real = M._run_fused

    def recording(name, fn, *args, **kwargs):
        names.append(name)
        return real(name, fn, *args, **kwargs)

    monkeypatch.setattr(M, "_run_fused", recording)
    return names


def _case(C=2, K=1, L=2, k=3, s=1, p=1, d=1, B=3, H=12, W=11, per_channel=False, mask="boxes", dtype=torch.float64,
          seed=0, nan=True):
    torch.manual_seed(seed)
    conv = MisConv2d(C, 4, k, stride=s, padding=p, dilation=d, dtype=dtype)
    mfa = random_mfa(B=B, K=K, L=L, C=C, H=H, W=W, dtype=dtype, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.rand(B, C, H, W, dtype=dtype, generator=g)
    missing = torch.zeros(B, C if per_channel else 1, H, W, dtype=torch.bool)
    if mask == "boxes":                           # small boxes: the windowed path
        missing[0, :, 2:5, 3:6] = True
        missing[1, :, H - 4:, 0:3] = True         # touches the border: crops reach the zero padding
        if B > 2 and per_channel:
            missing[2, C - 1, 0, W - 1] = True    # one pixel of one channel in a corner
    elif mask == "noise":                         # spread over the image: the full-size path
        missing = torch.rand(missing.shape, generator=g) < 0.7
    if nan:
        x = torch.where(missing, torch.full((), float("nan"), dtype=dtype), x)
    return conv, x, missing, mfa


def _outputs_and_grads(conv, x, missing, mfa, fast, grad=True):
    conv.fast = fast
    leaves = [conv.weight, conv.bias, mfa.weights, mfa.means, mfa.factors, mfa.variances]
    if not grad:
        with torch.no_grad():
            return conv(x, missing, mfa), None
    for t in leaves:
        t.requires_grad_(True)
        t.grad = None
    out = conv(x, missing, mfa)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    return out.detach(), grads


def _assert_same(conv, x, missing, mfa, *, grad=True, rtol=1e-9, atol=1e-12):
    ref, ref_g = _outputs_and_grads(conv, x, missing, mfa, fast=False, grad=grad)
    out, out_g = _outputs_and_grads(conv, x, missing, mfa, fast=True, grad=grad)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    if grad:
        names = ["weight", "bias", "mfa.weights", "mfa.means", "mfa.factors", "mfa.variances"]
        for name, a, b in zip(names, out_g, ref_g):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * 100, msg=lambda m, n=name: f"gradient of {n}: {m}")


CONFIGS = [
    dict(),                                                   # C=2, K=1: windowed, convolutions
    dict(K=3),                                                # K > 1: the mean crops join the stack
    dict(L=0),
    dict(K=2, s=2, p=2, d=2),                                 # stride, padding, dilation
    dict(k=(3, 2), s=(2, 1), p=(1, 0), per_channel=True),     # rectangular kernel, per-channel mask
    dict(K=2, k=5, s=3, p=0, per_channel=True),
    dict(C=1),                                                # one channel: the direct kernel (no grad)
    dict(C=1, K=2, L=3, s=2, p=1, d=2),
    dict(C=1, k=(2, 3), s=(1, 2), p=(0, 1)),
    dict(K=2, mask="noise"),                                  # full-size path
    dict(C=1, L=0, mask="noise"),
]
IDS = ["C2K1", "K3", "L0", "stride-pad-dil", "rect-perchannel", "k5s3", "C1-direct", "C1-K2-strided",
       "C1-rect", "noise-full", "noise-L0"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_fast_equals_eager_float64(cfg, grad, eager_kernels):
    conv, x, missing, mfa = _case(**cfg)
    _assert_same(conv, x, missing, mfa, grad=grad)


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_fast_uses_the_window_and_the_direct_kernel(grad, eager_kernels, spy):
    conv, x, missing, mfa = _case(C=1)
    _outputs_and_grads(conv, x, missing, mfa, fast=True, grad=grad)
    # with autograd: the convolution-based window kernel and its hand-written backward
    assert spy == (["window_fwd_k1", "window_bwd_k1"] if grad else ["crop_inputs", "window_direct"])
    spy.clear()
    conv, x, missing, mfa = _case(C=2, K=2)
    _outputs_and_grads(conv, x, missing, mfa, fast=True, grad=grad)
    assert spy == (["window_fwd", "window_bwd"] if grad else ["crop_inputs", "window_fwd"])
    spy.clear()
    conv, x, missing, mfa = _case(C=2, mask="noise")
    _outputs_and_grads(conv, x, missing, mfa, fast=True, grad=grad)
    assert spy == (["full_fwd", "full_bwd"] if grad else ["full_fwd"])


def test_without_compiler_the_direct_kernel_gives_way_to_convolutions(monkeypatch, spy):
    monkeypatch.setattr(M, "_COMPILE", False)
    conv, x, missing, mfa = _case(C=1)
    with torch.no_grad():
        conv(x, missing, mfa)
    assert spy == ["crop_inputs", "window_direct", "window_fwd_k1"]    # direct declined, then convolutions


def test_nothing_missing_and_fully_observed_images(eager_kernels):
    conv, x, missing, mfa = _case(nan=False)
    none = torch.zeros_like(missing)
    conv.fast = True
    assert torch.equal(conv(x, none, mfa), F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)))
    some = none.clone()
    some[0, :, 4:7, 4:7] = True                  # images 1 and 2 observed, in a batch with a hole
    out = conv(x, some, mfa)
    torch.testing.assert_close(out[1:], F.relu(F.conv2d(x[1:], conv.weight, conv.bias, padding=1)))
    _assert_same(conv, x, some, mfa)


def test_nan_and_inf_at_missing_pixels_change_nothing(eager_kernels):
    conv, x, missing, mfa = _case(C=1, nan=False, dtype=torch.float32)
    conv.fast = True
    clean = conv(x, missing, mfa)
    for poison in (float("nan"), float("inf"), -1e30):
        px = torch.where(missing, torch.full((), poison), x).requires_grad_(True)
        out = conv(px, missing, mfa)
        assert torch.equal(out, clean)
        out.sum().backward()
        assert torch.isfinite(px.grad).all() and (px.grad[missing.expand_as(px)] == 0).all()


def test_float32_matches_float64_reference(eager_kernels):
    """Float32 fast and eager paths both stay within float32 accuracy of the float64 result."""
    for cfg in (dict(C=1), dict(C=3, K=2), dict(C=1, mask="noise")):
        conv64, x64, missing, mfa64 = _case(**cfg)
        conv32 = MisConv2d(conv64.in_channels, 4, conv64.kernel_size, stride=conv64.stride, padding=conv64.padding,
                           dilation=conv64.dilation)
        with torch.no_grad():
            conv32.weight.copy_(conv64.weight)
            conv32.bias.copy_(conv64.bias)
        mfa32 = mfa64.to(torch.float32)
        ref = conv64(x64, missing, mfa64).detach()
        for fast in (False, True):
            conv32.fast = fast
            out = conv32(x64.float(), missing, mfa32).double()
            torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


def test_gradcheck_windowed_paths(monkeypatch):
    # gradcheck's numerical Jacobian evaluates the layer without autograd: uncompiled, the
    # windowed convolution path (the direct kernel's equality is tested above, and is slow uncompiled)
    monkeypatch.setattr(M, "_COMPILE", False)
    torch.manual_seed(0)
    for C, K in ((1, 2), (2, 1)):
        B, H, W = 2, 6, 5
        mfa = random_mfa(B=B, K=K, L=1, C=C, H=H, W=W)
        x = torch.rand(B, C, H, W, dtype=torch.float64)
        missing = torch.zeros(B, 1, H, W, dtype=torch.bool)
        missing[0, :, 1:3, 1:3] = True
        missing[1, :, 4:, 3:] = True            # windows smaller than the image: the windowed path
        layer = MisConv2d(C, 2, 3, padding=1, dtype=torch.float64, fast=True)

        def func(weight, bias, means, factors, log_var, logits):
            m = MFA(torch.softmax(logits, 1), means, factors, log_var.exp(), validate=False)
            return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x, missing, m))

        params = [layer.weight.detach().clone(), layer.bias.detach().clone(), mfa.means.clone(), mfa.factors.clone(),
                  mfa.variances.log(), mfa.weights.log()]
        # fast_mode: random projections of the Jacobian (seconds instead of a full Jacobian)
        assert torch.autograd.gradcheck(func, tuple(p.requires_grad_(True) for p in params), eps=1e-6, atol=1e-6,
                                        rtol=1e-4, fast_mode=True)


# ----------------------------------------------------------------------------- the window's geometry
@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (3, 2, 0, 1), (5, 3, 2, 2), (2, 1, 0, 3), (1, 2, 0, 1)])
def test_window_covers_every_output_that_sees_a_missing_pixel(k, s, p, d):
    """Brute force: convolve the mask with a kernel of ones; every output it reaches must lie in
    the window, and the window must not exceed the bounding box widened by the kernel."""
    g = torch.Generator().manual_seed(k * 100 + s * 10 + p + d)
    n = 17
    for trial in range(20):
        hit = torch.zeros(4, n, dtype=torch.bool)
        for b in range(4):
            if trial % 5 == 0 and b == 0:
                continue                                      # an image with nothing missing
            a, c = sorted(torch.randint(0, n, (2,), generator=g).tolist())
            hit[b, a:c + 1] = torch.rand(c + 1 - a, generator=g) < 0.7
        n_out = (n + 2 * p - d * (k - 1) - 1) // s + 1
        lo, size = M._span(hit.numpy(), n_out, k, s, p, d)
        reached = F.conv1d(hit.double()[:, None], torch.ones(1, 1, k, dtype=torch.float64), stride=s, padding=p,
                           dilation=d)[:, 0] > 0
        for b in range(4):
            idx = torch.nonzero(reached[b]).flatten().tolist()
            if idx:
                assert lo[b] <= min(idx) and max(idx) < lo[b] + size[b], (b, idx, lo[b], size[b])
            else:
                assert size[b] >= 0
        assert (size >= 0).all() and (lo >= 0).all() and (lo + size <= n_out).all()


def test_mills_ratio_fits_against_erfcx():
    u = torch.linspace(0, 14, 20001, dtype=torch.float64)
    R = torch.special.erfcx(u / math.sqrt(2)) * math.sqrt(math.pi / 2)       # Φ(−u)/φ(u)
    g = 1 - u * R
    rel = lambda a, b: ((a - b) / b).abs().max().item()
    assert rel(M._r_fit(u), R) < 1e-7 and rel(M._g_fit(u), g) < 1e-7
    u32 = u.float()
    assert rel(M._r_fit(u32).double(), R) < 2e-6 and rel(M._g_fit(u32).double(), g) < 2e-6


def test_approximate_expected_relu_against_exact_formula():
    """The erfc-free E and its derivatives against the exact formula, deep tails included."""
    mu = torch.linspace(-12, 12, 2001, dtype=torch.float64)[:, None] * torch.tensor([1e-3, 0.1, 1.0, 10.0],
                                                                                     dtype=torch.float64)
    var = torch.tensor([1e-6, 1e-2, 1.0, 100.0], dtype=torch.float64).expand_as(mu)
    e_ex, dmu_ex, dvar_ex = M._normal_parts(mu, var, approx=False)
    e_ap, dmu_ap, dvar_ap = M._normal_parts(mu, var, approx=True)
    assert torch.equal(M._expected_relu_fwd(mu, var, True), e_ap)
    torch.testing.assert_close(e_ap, e_ex, rtol=1e-7, atol=1e-300)          # relative, even at 1e-30
    torch.testing.assert_close(dmu_ap, dmu_ex, rtol=1e-7, atol=1e-15)
    torch.testing.assert_close(dvar_ap, dvar_ex, rtol=1e-7, atol=1e-300)
    zero = torch.zeros(3, dtype=torch.float64)
    m = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    e, d_mu, d_var = M._normal_parts(m, zero, approx=True)
    assert torch.equal(e, F.relu(m)) and torch.equal(d_mu, (m > 0).double()) and torch.equal(d_var, zero)


# ----------------------------------------------------------------------------- switches and fallback
def test_misconv_module_re_exports_the_fast_paths_switches():
    """The public switches are reachable from labkit.misconv, the layer's module, and are the fast
    path's own (one state, not a copy)."""
    assert MC.set_fast_default is M.set_fast_default and MC.fast_default is M.fast_default
    assert MC.compile_enabled is M.compile_enabled and MC.compile_report is M.compile_report
    before = M.fast_default()
    MC.set_fast_default(not before)
    try:
        assert M.fast_default() is (not before)
    finally:
        M.set_fast_default(before)


def test_switches_validate_their_arguments():
    with pytest.raises(TypeError, match="fast must be True, False or None"):
        MisConv2d(1, 2, 3, fast="yes")
    with pytest.raises(TypeError, match="fast must be a bool"):
        M.set_fast_default(1)
    assert "fast=False" in repr(MisConv2d(1, 2, 3, fast=False))


def test_fast_default_switch(eager_kernels, spy):
    conv, x, missing, mfa = _case()
    assert M.fast_default() is True
    try:
        M.set_fast_default(False)
        conv.fast = None
        with torch.no_grad():
            conv(x, missing, mfa)
        assert spy == []                                      # eager: no fast kernel ran
        conv.fast = True
        with torch.no_grad():
            conv(x, missing, mfa)
        assert spy                                            # per-layer choice wins
    finally:
        M.set_fast_default(True)


def test_fast_default_is_the_cpu_path_only(eager_kernels, spy):
    """fast=None takes the fast path for CPU inputs and the eager formula for GPU ones (measured
    faster there); the global switch turns it off everywhere. Decided from the input's device."""
    assert M.fast_default("cpu") is True and M.fast_default(torch.device("cpu")) is True
    assert M.fast_default("cuda") is False and M.fast_default(torch.device("cuda", 1)) is False
    conv, x, missing, mfa = _case()
    conv.fast = None
    with torch.no_grad():
        conv(x, missing, mfa)
    assert spy                                                # a CPU input: the fast kernels ran
    try:
        M.set_fast_default(False)
        assert M.fast_default("cpu") is False and M.fast_default("cuda") is False
    finally:
        M.set_fast_default(True)


def test_the_layer_asks_for_the_default_of_its_inputs_device(monkeypatch, eager_kernels, spy):
    asked = []
    monkeypatch.setattr(MC, "fast_default", lambda device=None: asked.append(device) or False)
    conv, x, missing, mfa = _case()
    conv.fast = None
    with torch.no_grad():
        conv(x, missing, mfa)
    assert asked == [x.device] and spy == []                  # told "eager" for this device: eager ran


def test_compile_failure_falls_back_to_eager_and_logs(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(M, "_COMPILE", True)
    monkeypatch.setattr(M, "_compiled", {})
    monkeypatch.setattr(M, "_compile_seconds", {})
    monkeypatch.setattr(torch, "compile", broken)
    conv, x, missing, mfa = _case(C=1)
    with caplog.at_level(logging.WARNING, logger="labkit.misconv"):
        with torch.no_grad():
            out = conv(x, missing, mfa)
    assert "torch.compile of window_direct failed" in caplog.text and "no C++ compiler here" in caplog.text
    assert M.compile_report()["window_direct"] is None and not M.compile_enabled()
    conv.fast = False
    torch.testing.assert_close(out, conv(x, missing, mfa).detach())


# ----------------------------------------------------------------------------- compiled (Inductor)
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_compiled_fast_path_equals_eager(dtype):
    """The kernels through torch.compile: float64 to rounding, float32 within 1e-5 (the erfc-free
    fits are used there on the CPU). Windowed (K = 1 and K > 1), direct and full-size paths,
    outputs without autograd and outputs plus gradients with it."""
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for cfg in (dict(C=1), dict(C=3, K=2), dict(C=2, mask="noise")):
        conv, x, missing, mfa = _case(dtype=dtype, **cfg)
        for grad in (False, True):
            _assert_same(conv, x, missing, mfa, grad=grad, **tol)
