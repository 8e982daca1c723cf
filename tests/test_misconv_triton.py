"""MisConv2d's Triton path (labkit/misconv_triton.py) against the float64 eager formula, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set per test: the module wraps
its kernels on first use, after the variable is set) on small shapes: outputs and the gradients of
every input (x, the MFA, weight, bias) against autograd through ``misconv_reference`` in float64
(K = 1 and 2, L = 0, 1 and 4, shared and per-channel masks, stride / padding / dilation /
rectangular kernels, NaN at missing pixels), the expected ReLU's tails against mpmath, the launch
count, the dispatch of ``MisConv2d(fast=None/"triton")``, and the kernels compiled ahead of time for
an H100/H200 (sm_90) with triton's own compiler. The last test runs the GPU benchmark's dry run.
A CUDA test (skipped here) holds the compiled kernels on a GPU to the same reference.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import labkit.misconv as MC  # noqa: E402
import labkit.misconv_fast as MF  # noqa: E402
import labkit.misconv_triton as MT  # noqa: E402
from labkit.mfa import MFA  # noqa: E402
from labkit.misconv import MisConv2d, misconv_reference  # noqa: E402
from tests.conftest import random_mfa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Triton's interpreter for this test's kernel calls (read when the kernels are wrapped and at
    every call), and the backward's loop over pixel blocks at its default."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(MT, "BACKWARD_ITERS", None)


def _case(C=2, K=1, L=2, k=3, s=1, p=1, d=1, B=2, H=7, W=6, O=3, per_channel=False, bias=True,
          dtype=torch.float64, seed=0, nan=True):
    """Inputs ``(x, missing, mfa, weight, bias, stride, padding, dilation)`` with NaN at missing pixels."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    mfa = random_mfa(B=B, K=K, L=L, C=C, H=H, W=W, dtype=dtype, seed=seed + 1)
    x = torch.rand(B, C, H, W, dtype=dtype, generator=g)
    missing = torch.rand(B, C if per_channel else 1, H, W, generator=g) < 0.4
    missing[0, :, :2, :2] = True                      # a corner: windows reach into the padding
    if nan:
        x = torch.where(missing, torch.full((), float("nan"), dtype=dtype), x)
    weight = torch.randn(O, C, kh, kw, dtype=dtype, generator=g) / math.sqrt(C * kh * kw)
    b = torch.randn(O, dtype=dtype, generator=g) if bias else None
    return x, missing, mfa, weight, b, pair(s), pair(p), pair(d)


def _leaves(x, mfa, weight, bias):
    leaves = [x, weight, mfa.weights, mfa.means, mfa.factors, mfa.variances] + ([bias] if bias is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    return leaves


def _run(fn, x, missing, mfa, weight, bias, stride, padding, dilation, leaves=None):
    """``fn``'s output and the gradients of a fixed projection of it w.r.t. ``leaves``."""
    out = fn(x, missing, mfa, weight, bias, stride, padding, dilation)
    if leaves is None:
        return out.detach(), None
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    return out.detach(), torch.autograd.grad((out * probe).sum(), leaves)


NAMES = ["x", "weight", "mfa.weights", "mfa.means", "mfa.factors", "mfa.variances", "bias"]


def _assert_same(got, ref, rtol, atol, what=""):
    out, grads = got
    ref_out, ref_grads = ref
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol, msg=lambda m: f"output{what}: {m}")
    for name, a, b in zip(NAMES, grads or (), ref_grads or ()):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=rtol * 10, atol=atol * 10,
                                   msg=lambda m, n=name: f"gradient of {n}{what}: {m}")


# ----------------------------------------------------------------------------- the kernels vs the formula
CONFIGS = {
    "C1-K1-L1": dict(C=1, K=1, L=1),
    "C2-K2-L4-per-channel-stride2": dict(C=2, K=2, L=4, s=2, per_channel=True),
    "C2-K2-L1-dilated-rectangular": dict(C=2, K=2, L=1, k=(3, 2), s=(2, 1), p=(2, 1), d=(2, 3), O=5, H=9, W=8),
    "C3-K1-L4-no-bias-no-padding": dict(C=3, K=1, L=4, p=0, bias=False, H=8, W=9, O=17),
    "C1-K2-L0": dict(C=1, K=2, L=0, O=2),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_kernels_equal_the_float64_eager_formula(cfg):
    """Output and the gradients of x, every MFA tensor, weight and bias, float64, to rounding."""
    x, missing, mfa, weight, bias, s, p, d = _case(**cfg)
    leaves = _leaves(x, mfa, weight, bias)
    ref = _run(misconv_reference, x, missing, mfa, weight, bias, s, p, d, leaves)
    got = _run(MT.misconv_triton, x, missing, mfa, weight, bias, s, p, d, leaves)
    _assert_same(got, ref, rtol=1e-11, atol=1e-12)
    # a missing pixel's value never reaches x's gradient: exactly zero there
    assert torch.equal(got[1][0][missing.expand_as(x)], torch.zeros(int(missing.expand_as(x).sum()), dtype=x.dtype))


@pytest.mark.parametrize("iters", [2, 3])
def test_backward_loops_over_pixel_blocks(monkeypatch, iters):
    """Several pixel blocks per program (the backward's loop, partial last group): same gradients."""
    monkeypatch.setattr(MT, "BACKWARD_ITERS", iters)
    x, missing, mfa, weight, bias, s, p, d = _case(C=1, K=2, L=1, H=11, W=10, B=2)   # 110 pixels: 4 blocks of 32
    leaves = [weight, bias, mfa.weights]
    for t in leaves:
        t.requires_grad_(True)
    ref = _run(misconv_reference, x, missing, mfa, weight, bias, s, p, d, leaves)
    got = _run(MT.misconv_triton, x, missing, mfa, weight, bias, s, p, d, leaves)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_layer_equals_the_float64_formula():
    """The layer in float32 (fast='triton', under the interpreter) within float32 tolerances."""
    x, missing, mfa, weight, bias, s, p, d = _case(C=2, K=2, L=4, per_channel=True)
    leaves = _leaves(x, mfa, weight, bias)
    ref = _run(misconv_reference, x, missing, mfa, weight, bias, s, p, d, leaves)
    conv = MisConv2d(2, 3, 3, padding=1, fast="triton", dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    x32 = x.detach().float().requires_grad_(True)
    mfa32 = MFA(*(t.detach().float().requires_grad_(True) for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances)))
    out = conv(x32, missing, mfa32)
    assert out.dtype == torch.float32
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).float()
    grads = torch.autograd.grad((out * probe).sum(), [x32, conv.weight, mfa32.weights, mfa32.means, mfa32.factors,
                                                      mfa32.variances, conv.bias])
    _assert_same((out.detach(), grads), ref, rtol=2e-5, atol=2e-6)


def test_nothing_missing_equals_conv_relu():
    x, missing, mfa, weight, bias, s, p, d = _case(C=2, K=2, L=2, nan=False)
    none = torch.zeros_like(missing)
    out = MT.misconv_triton(x, none, mfa, weight, bias, s, p, d)
    torch.testing.assert_close(out, F.relu(F.conv2d(x, weight, bias, s, p, d)), rtol=1e-13, atol=1e-14)


def test_values_at_missing_pixels_are_never_read():
    """NaN or huge values at missing pixels: identical outputs and gradients, all finite."""
    x, missing, mfa, weight, bias, s, p, d = _case(C=2, K=2, L=1, per_channel=True)
    results = []
    for fill in (float("nan"), 1e30, -7.0):
        xf = torch.where(missing, torch.full((), fill, dtype=x.dtype), x).requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out, grads = _run(MT.misconv_triton, xf, missing, mfa, w, bias, s, p, d, [xf, w])
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        results.append((out, grads))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


# ----------------------------------------------------------------------------- the expected ReLU's tails
def _tail_case(dtype):
    """One row of missing pixels seen through a 1x1 filter of weight 1: output i is E[ReLU(N(μ_i, σ_i²))]
    with μ_i = m_i, σ_i² = a_i² + d_i, so that t = μ/σ runs from -38 to 38 (both tails, the switch
    points 2 and 3, zero) at several σ."""
    ts = [-38.0, -30.0, -20.0, -12.0, -8.0, -5.0, -3.5, -3.0, -2.999, -2.5, -2.0, -1.999, -1.0, -1e-3, 0.0, 1e-3,
          0.7, 1.999, 2.0, 2.001, 3.0, 3.001, 4.5, 9.0, 25.0, 38.0]
    sig = [0.1, 1.0, 7.0]
    t = torch.tensor([a for a in ts for _ in sig], dtype=torch.float64)
    sigma = torch.tensor([s for _ in ts for s in sig], dtype=torch.float64)
    n = t.numel()
    a = sigma * 0.6
    dvar = sigma ** 2 - a ** 2
    mfa = MFA(torch.ones(1, 1, dtype=dtype), (t * sigma).reshape(1, 1, 1, 1, n).to(dtype),
              a.reshape(1, 1, 1, 1, 1, n).to(dtype), dvar.reshape(1, 1, 1, 1, n).to(dtype))
    x = torch.full((1, 1, 1, n), float("nan"), dtype=dtype)
    missing = torch.ones(1, 1, 1, n, dtype=torch.bool)
    weight = torch.ones(1, 1, 1, 1, dtype=dtype)
    return t, sigma, x, missing, mfa, weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_expected_relu_tails_against_mpmath(dtype):
    """E, ∂E/∂μ = Φ(t) and ∂E/∂σ² = φ(t)/(2σ) against mpmath (40 digits, at the inputs as stored), from
    t = -38 to 38: relative error ≤ c·(1 + t²) (the tails' own conditioning: E ∝ exp(−t²/2)), c = 5e-14
    in float64 and 1e-6 in float32, wherever the value is a normal float; below that, within 1e-37 / 1e-300."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    t, sigma, x, missing, mfa, weight = _tail_case(dtype)
    leaves = [mfa.means, mfa.variances]
    for leaf in leaves:
        leaf.requires_grad_(True)
    out = MT.misconv_triton(x, missing, mfa, weight, None, (1, 1), (0, 0), (1, 1))
    g_mean, g_var = torch.autograd.grad(out.sum(), leaves)
    want_e, want_cdf, want_dvar = [], [], []
    means, factors, variances = (v.detach().double().flatten().tolist() for v in (mfa.means, mfa.factors, mfa.variances))
    for m, a, d in zip(means, factors, variances):
        ss = mp.sqrt(mp.mpf(a) ** 2 + mp.mpf(d))
        tt = mp.mpf(m) / ss
        want_e.append(float(ss * (mp.npdf(tt) + tt * mp.ncdf(tt))))
        want_cdf.append(float(mp.ncdf(tt)))
        want_dvar.append(float(mp.npdf(tt) / (2 * ss)))
    c, tiny = (5e-14, 1e-300) if dtype == torch.float64 else (1e-6, 1e-37)
    for name, got, want in (("E", out.flatten(), want_e), ("Phi", g_mean.flatten(), want_cdf),
                            ("phi/2sigma", g_var.flatten(), want_dvar)):
        want = torch.tensor(want, dtype=torch.float64)
        got = got.detach().double()
        assert torch.isfinite(got).all() and (got >= 0).all(), name
        normal = want.abs() > tiny
        excess = ((got - want).abs() / want.abs() / (c * (1 + t * t)))[normal]
        worst = int(excess.argmax())
        assert float(excess.max()) <= 1, f"{name}: error {float(excess.max()):.2f}x the bound at t={t[normal][worst]:.3f}"
        assert all(float(v) <= tiny for v in (got - want).abs()[~normal]), name


def test_zero_variance_is_relu_with_its_gradient():
    """Where nothing in the window is missing: ReLU(μ), ∂/∂μ = 1[μ > 0], as autograd gives the formula."""
    x, missing, mfa, weight, bias, s, p, d = _case(C=1, K=1, L=1, nan=False, H=9, W=9)
    missing[:] = False
    missing[:, :, 0, 0] = True                         # far corner: most windows see nothing missing
    leaves = _leaves(x, mfa, weight, bias)
    ref = _run(misconv_reference, x, missing, mfa, weight, bias, s, p, d, leaves)
    got = _run(MT.misconv_triton, x, missing, mfa, weight, bias, s, p, d, leaves)
    _assert_same(got, ref, rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------- launches and dispatch
ALLOC_OR_VIEW = {"empty", "empty_like", "new_empty", "zeros_like", "ones_like", "view", "_unsafe_view", "expand",
                 "as_strided", "detach", "alias", "t", "transpose", "permute", "slice", "select", "unsqueeze", "lift_fresh"}


def _count(fn, monkeypatch):
    """``(triton launches, aten ops)`` made by ``fn()``. The kernels are not run (their launches are
    recorded; outputs are left uninitialised): what is counted is what a GPU would be asked to launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launches, ops = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def record(kernel, plan):
        constexprs = plan[2]
        if "BACKWARD" not in constexprs:
            launches.append("inputs")
        else:
            launches.append("backward" if constexprs["BACKWARD"] else "forward")

    with monkeypatch.context() as mp:
        mp.setattr(MT, "_launch", record)
        with Record():
            out = fn()
    return launches, ops, out


def test_launches_one_kernel_forward_and_one_backward(monkeypatch):
    """The paper's layer in float32: the forward is one kernel and nothing else (no copy, no
    stacking, no elementwise pass); the backward one kernel and a sum per gradient."""
    x, missing, mfa, weight, bias, s, p, d = _case(C=3, K=1, L=4, dtype=torch.float32)
    launches, ops, _ = _count(lambda: MT.misconv_triton(x, missing, mfa, weight, bias, s, p, d), monkeypatch)
    assert launches == ["forward"]
    assert [op for op in ops if op not in ALLOC_OR_VIEW] == [], ops
    # training a classifier: gradients of weight and bias only -> one kernel and one sum each
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    _, _, out = _count(lambda: MT.misconv_triton(x, missing, mfa, weight, bias, s, p, d), monkeypatch)
    grad = torch.ones_like(out)
    launches, ops, _ = _count(lambda: torch.autograd.grad(out, [weight, bias], grad), monkeypatch)
    assert launches == ["backward"]
    assert sorted(op for op in ops if op not in ALLOC_OR_VIEW) == ["sum", "sum"], ops
    # the MFA's means as well: two conv2d_input calls (W and W⊙W) and the routing kernel
    mfa.means.requires_grad_(True)
    _, _, out = _count(lambda: MT.misconv_triton(x, missing, mfa, weight, bias, s, p, d), monkeypatch)
    launches, ops, _ = _count(lambda: torch.autograd.grad(out, [weight, mfa.means], grad), monkeypatch)
    assert launches == ["backward", "inputs"]
    assert sorted(op for op in ops if op not in ALLOC_OR_VIEW) == ["convolution_backward", "convolution_backward",
                                                                    "mul", "sum", "sum"], ops


def test_eager_formula_launches_many_more(monkeypatch):
    """What the design saves: the eager formula makes a dozen and more compute calls for the same forward."""
    x, missing, mfa, weight, bias, s, p, d = _case(C=3, K=1, L=4)
    _, ops, _ = _count(lambda: misconv_reference(x, missing, mfa, weight, bias, s, p, d), monkeypatch)
    assert len([op for op in ops if op not in ALLOC_OR_VIEW]) >= 12, ops


def test_layer_dispatch(monkeypatch):
    """fast='triton' runs this path (here under the interpreter); fast=None takes it wherever
    triton_default says so for the input's device (CUDA), and the CPU paths otherwise."""
    monkeypatch.setattr(MF, "_COMPILE", False)            # the CPU fast path uncompiled: seconds, not minutes
    calls = []
    real = MT.misconv_triton
    monkeypatch.setattr(MT, "misconv_triton", lambda *a: calls.append(1) or real(*a))
    x, missing, mfa, weight, bias, s, p, d = _case(C=2, K=1, L=1)
    conv = MisConv2d(2, 3, 3, padding=1, fast="triton", dtype=torch.float64)
    assert "fast='triton'" in repr(conv)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        out = conv(x, missing, mfa)
        assert calls == [1]
        conv.fast = False
        torch.testing.assert_close(out, conv(x, missing, mfa), rtol=1e-12, atol=1e-13)
        conv.fast = None
        conv(x, missing, mfa)                            # a CPU input: not this path
        assert calls == [1]
        monkeypatch.setattr(MT, "triton_default", lambda device: True)   # as for a CUDA input
        torch.testing.assert_close(conv(x, missing, mfa), out, rtol=1e-12, atol=1e-13)
        assert calls == [1, 1]
        conv.half()                                      # a dtype the kernels do not take: fast=None moves on
        conv(x.half(), missing, MFA(*(t.half() for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances))))
        assert calls == [1, 1]


def test_default_is_opt_in_and_the_gpu_path_only(monkeypatch):
    """Off until measured (fast=None takes the fastest measured path: the eager formula on a GPU);
    once chosen, only for CUDA inputs."""
    assert MT.available() is True
    monkeypatch.setattr(MT, "_PREFER", False)
    assert MT.triton_default("cuda") is False
    MT.set_triton_default(True)
    assert MT.triton_default("cuda") is True and MT.triton_default(torch.device("cuda", 1)) is True
    assert MT.triton_default("cpu") is False and MT.triton_default(None) is False
    try:
        MC.set_fast_default(False)                        # "the eager formula everywhere"
        assert MT.triton_default("cuda") is False
    finally:
        MC.set_fast_default(True)
    monkeypatch.setattr(MT, "_IMPORT_ERROR", "triton is not importable (ImportError: test)")
    assert MT.triton_default("cuda") is False and MT.available() is False


def test_what_it_cannot_run_is_named(monkeypatch):
    x, missing, mfa, weight, bias, s, p, d = _case(C=1, K=1, L=1)
    cases = [(dict(weight=weight.half()), "float32 or float64"),
             (dict(padding="same"), "numeric padding"),
             (dict(weight=torch.zeros(2, 15, 3, 3, dtype=torch.float64)), "C·kh·kw <= 128")]
    for change, text in cases:
        args = dict(device="cpu", weight=weight, padding=p) | change
        assert text in MT.unsupported(**args)
    assert MT.unsupported("cpu", weight, p) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in MT.unsupported("cpu", weight, p)
    with pytest.raises(ValueError, match="Triton path cannot run this call: .*TRITON_INTERPRET=1"):
        MisConv2d(1, 3, 3, padding=1, fast="triton", dtype=torch.float64)(x, missing, mfa)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="too small"):
        MT.misconv_triton(x[..., :2, :2], missing[..., :2, :2], random_mfa(B=2, K=1, L=1, C=1, H=2, W=2),
                          weight, bias, (1, 1), (0, 0), (1, 1))
    with pytest.raises(TypeError, match="fast must be True, False or None"):
        MisConv2d(1, 2, 3, fast="cuda")
    with pytest.raises(ValueError, match=r"every input on x's device \(cpu\), got \{'missing': 'meta'\}"):
        MT.misconv_triton(x, missing.to("meta"), mfa, weight, None, s, p, d)


def test_module_imports_without_triton(monkeypatch):
    """With triton unimportable, the module loads (a fresh copy of it here), says why the path is
    unavailable and is never the default; labkit.misconv imports it unconditionally."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("misconv_triton_without_triton", MT.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.available() is False and module.triton_default("cuda") is False
    assert "triton is not importable" in module.unsupported("cuda", torch.zeros(1, 1, 3, 3), (1, 1))
    with pytest.raises(ValueError, match="triton is not importable"):
        x, missing, mfa, weight, bias, s, p, d = _case(C=1, K=1, L=1)
        module.misconv_triton(x, missing, mfa, weight, bias, s, p, d)


# ----------------------------------------------------------------------------- compiled for a GPU
def _compile_sm90(kernel, plan):
    import triton
    from triton.backends.compiler import GPUTarget

    grid, args, constexprs, options = plan
    ptr = {torch.float32: "*fp32", torch.float64: "*fp64", torch.uint8: "*u8", torch.int32: "*i32"}
    sig = {n: (ptr[v.dtype] if isinstance(v, torch.Tensor) else "i32") for n, v in args.items()}
    sig.update({n: "constexpr" for n in constexprs})
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def test_tf32_products_exactly_where_cudnn_uses_them(monkeypatch):
    """float32 on a GPU: TF32 in tl.dot iff cuDNN's convolutions use it (what the eager formula gets);
    float64 and the interpreter: exact products."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert MT._precision(torch.float32, interpret=False) == "tf32"
    assert MT._precision(torch.float64, interpret=False) == "ieee"
    assert MT._precision(torch.float32, interpret=True) == "ieee"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert MT._precision(torch.float32, interpret=False) == "ieee"


@pytest.mark.slow
def test_kernels_compile_for_an_h100(monkeypatch):
    """The interpreter does not check what a GPU compiler rejects (operand layouts, tl.dot shapes);
    triton's compiler does, without a GPU: the paper's layer (float32, C = 3, K = 1, L = 4, 32
    filters), forward, backward and the input-gradient kernel, for sm_90 (H100/H200)."""
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    main, route = triton.jit(MT._misconv_kernel), triton.jit(MT._input_grad_kernel)
    dt = torch.float32
    x = torch.rand(2, 3, 8, 8, dtype=dt)
    j = MT._mask(torch.zeros(2, 1, 8, 8, dtype=torch.bool), dt)
    geo = MT._Geometry(x, j, 1, 4, torch.zeros(32, 3, 3, 3, dtype=dt), (1, 1), (1, 1), (1, 1))
    tensors = {n: x for n in ("x", "m", "a", "d", "w", "bias", "p", "io", "pw", "pb", "pp", "g1", "g2")} | {"j": j}
    for backward in (False, True):
        plan = MT._main_plan(geo, MT._Tiling(geo, backward, torch.device("cpu")), tensors, backward=backward,
                             store_g=backward, has_bias=True, interpret=False)
        assert plan[2]["PREC"] == ("tf32" if torch.backends.cudnn.allow_tf32 else "ieee")
        compiled = _compile_sm90(main, plan)
        assert len(compiled.asm["cubin"]) > 1000 and "mma" in compiled.asm["ptx"]
    _compile_sm90(route, MT._input_grad_plan(geo, dict(gs1=x, gs2=x, j=j, gx=x, gm=x, ga=x, gd=x)))


# ----------------------------------------------------------------------------- the GPU benchmark
def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/bench_misconv_gpu.py --dry-run: a tiny grid on the CPU (interpreter), every section
    of the GPU run, its CSV and its markdown table with the targets."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_misconv_gpu.py"), "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import pandas as pd

    raw = pd.read_csv(tmp_path / "timings.csv")
    assert {"forward", "backward", "end_to_end", "training"} <= set(raw.study)
    assert {"conv", "eager", "fast", "triton"} <= set(raw[raw.study == "forward"].layer)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"ratio", "paper_ratio", "target_paper", "launch_bound"} <= set(summary.columns)
    table = (tmp_path / "table.md").read_text()
    assert "| I | C | B |" in table and "dry run" in table


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_misconv_gpu", REPO / "benchmarks" / "bench_misconv_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_checks_its_targets():
    """The targets on made-up timings: the paper's ratio per cell, and 3x where the CUDA graph keeps
    the GPU busy at least half of a call (not launch-bound)."""
    import pandas as pd

    from labkit.studies.timing import paper_table

    bench = _bench_module()
    ms = {(28, 1, 16): dict(conv=0.1, triton=0.56, triton_graph=0.3, conv_graph=0.05),   # 5.6 ≤ 5.75; busy 0.54
          (32, 3, 32): dict(conv=0.1, triton=0.35, triton_graph=0.1, conv_graph=0.05),   # 3.5 > 3.0; busy 0.29
          (64, 3, 64): dict(conv=1.0, triton=2.5, triton_graph=2.0, conv_graph=0.9)}     # 2.5 ≤ 3.76; busy 0.8
    rows = [dict(study="forward", size=s, channels=c, batch=b, K=1, L=4, layer=layer, round=i,
                 seconds=v * 1e-3 * (1 + 0.01 * i), per_image=math.nan)
            for (s, c, b), layers in ms.items() for layer, v in layers.items() for i in range(3)]
    summary = bench.summarize(pd.DataFrame(rows), paper_table()).set_index(["size", "layer"])
    t = summary.xs("triton", level="layer")
    assert t.loc[28, "ratio"] == pytest.approx(5.6) and t.loc[32, "ratio"] == pytest.approx(3.5)
    assert t.loc[28, "paper_ratio"] == pytest.approx(0.00092 / 0.00016)
    assert [t.loc[s, "target_paper"] for s in (28, 32, 64)] == [True, False, True]
    assert [t.loc[s, "launch_bound"] for s in (28, 32, 64)] == [False, True, False]
    assert t.loc[28, "target_3x"] is False and t.loc[32, "target_3x"] is None and t.loc[64, "target_3x"] is True
    assert t.loc[28, "graph_ratio"] == pytest.approx(6.0) and t.loc[28, "busy"] == pytest.approx(0.3 / 0.56)
    table = bench.markdown(summary.reset_index(), ["## test"], [])
    assert "at or below the paper's ratio: 2 of 3 cells" in table
    assert "where not launch-bound (busy ≥ 0.5): 1 of 2 such settings" in table


def test_gpu_benchmark_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    bench = _bench_module()
    assert bench.main(["--sections", "forward"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", [dict(C=1, K=1, L=4), dict(C=3, K=2, L=3, per_channel=True, s=2),
                                 dict(C=2, K=2, L=1, k=(3, 2), p=2, d=2, bias=False)], ids=["C1", "C3-K2", "dilated"])
def test_compiled_kernels_on_cuda_equal_the_float64_formula(monkeypatch, cfg):
    """On a GPU: the compiled kernels (float32, TF32 off) against the float64 eager formula on the CPU,
    outputs and all gradients; and fast=None on a CUDA input takes this path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(MT, "_PREFER", True)                  # fast=None takes it once chosen
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, missing, mfa, weight, bias, s, p, d = _case(B=3, H=12, W=11, O=32, **cfg)
    leaves = _leaves(x, mfa, weight, bias)
    ref = _run(misconv_reference, x, missing, mfa, weight, bias, s, p, d, leaves)
    cuda = lambda t: t.detach().to("cuda", torch.float32).requires_grad_(True)  # noqa: E731
    xc, wc, bc = cuda(x), cuda(weight), (cuda(bias) if bias is not None else None)
    mfac = MFA(*(cuda(t) for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances)))
    leaves_c = [xc, wc, mfac.weights, mfac.means, mfac.factors, mfac.variances] + ([bc] if bc is not None else [])
    out, grads = _run(MT.misconv_triton, xc, missing.cuda(), mfac, wc, bc, s, p, d, leaves_c)
    assert out.device.type == "cuda"
    _assert_same((out.cpu(), [g.cpu() for g in grads]), ref, rtol=1e-5, atol=1e-5)
    conv = MisConv2d(x.shape[1], 32, weight.shape[2:], stride=s, padding=p, dilation=d, bias=bias is not None,
                     device="cuda")
    calls = []
    monkeypatch.setattr(MT, "misconv_triton", lambda *a: calls.append(1) or out)
    conv(xc, missing.cuda(), mfac)
    assert calls == [1]
