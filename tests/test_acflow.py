"""labkit.models.acflow: exact invertibility, log-determinants against brute-force Jacobians, the ACFlow
property (only missing coordinates move), normalisation, sampling, input validation, a smoke run."""
from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest
import torch

from labkit.lab.study_cli import build_config
from labkit.models.acflow import ACFlow, AffineCoupling, squeeze2d, unsqueeze2d
from labkit.models.acflow_training import bits_per_dim, evaluate_nll, load_acflow, study_mask_fn, train_acflow

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread is faster than two, and far faster when other
    processes keep the cores busy (OpenMP threads then wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter by N(0, std²) so the (zero-initialised) couplings are not identities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def random_mask(shape, p=0.5, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def tiny_flow(dtype=F64, h=4, w=4, c=1, n_scales=2, alpha=1e-6, seed=0, std=0.3) -> ACFlow:
    model = ACFlow(c, h, w, hidden=6, n_blocks=1, n_scales=n_scales, n_couplings=2, alpha=alpha)
    return randomise(model.to(dtype), std=std, seed=seed)


def coupling_cases():
    # (channels, height, width, partition, parity)
    return [(1, 4, 4, "checkerboard", 0), (1, 4, 4, "checkerboard", 1), (4, 2, 2, "channel", 0),
            (4, 2, 2, "channel", 1), (2, 3, 3, "none", 0)]


def coupling_inputs(c, h, w, dtype, seed=2, batch=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, c, h, w, generator=g, dtype=dtype)
    missing = torch.rand(batch, c, h, w, generator=g) < 0.6
    x = torch.rand(batch, c, h, w, generator=g, dtype=dtype)
    return z, missing, ACFlow.context(x, missing)


# --------------------------------------------------------------------------- squeeze


def test_squeeze_layout_by_hand_and_round_trip():
    t = torch.arange(2 * 4 * 6).view(1, 2, 4, 6)
    s = squeeze2d(t)
    assert s.shape == (1, 8, 2, 3)
    # channel 4c + 2i + j holds pixel (2h + i, 2w + j) of channel c
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(s[0, 4 * c + 2 * i + j], t[0, c, i::2, j::2])
    assert torch.equal(unsqueeze2d(s), t)
    m = random_mask((2, 1, 4, 4))
    assert squeeze2d(m).dtype == torch.bool and torch.equal(unsqueeze2d(squeeze2d(m)), m)
    with pytest.raises(ValueError, match="even height and width"):
        squeeze2d(torch.zeros(1, 1, 3, 4))


# --------------------------------------------------------------------------- single couplings


@pytest.mark.parametrize("c,h,w,partition,parity", coupling_cases())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-10)])
def test_coupling_is_exactly_invertible(c, h, w, partition, parity, dtype, tol):
    layer = randomise(AffineCoupling(c, h, w, partition=partition, parity=parity, hidden=8, n_blocks=1)).to(dtype)
    z, missing, ctx = coupling_inputs(c, h, w, dtype)
    out, logdet = layer(z, missing, ctx)
    assert out.shape == z.shape and logdet.shape == (z.shape[0],)
    assert (out - z).abs().max() > 1e-2, "randomised coupling should move the missing coordinates"
    back = layer.inverse(out, missing, ctx)
    assert torch.allclose(back, z, atol=tol, rtol=tol)
    # observed coordinates pass through bit-identically, both ways
    assert torch.equal(out[~missing], z[~missing])
    assert torch.equal(layer.inverse(z, missing, ctx)[~missing], z[~missing])


@pytest.mark.parametrize("c,h,w,partition,parity", coupling_cases())
def test_coupling_logdet_matches_bruteforce_jacobian(c, h, w, partition, parity):
    layer = randomise(AffineCoupling(c, h, w, partition=partition, parity=parity, hidden=8, n_blocks=1)).to(F64)
    z, missing, ctx = coupling_inputs(c, h, w, F64, batch=2)
    _, logdet = layer(z, missing, ctx)
    for i in range(z.shape[0]):
        zi, mi, ci = z[i:i + 1], missing[i:i + 1], ctx[i:i + 1]

        def f(flat):
            return layer(flat.view_as(zi), mi, ci)[0].flatten()

        jac = torch.autograd.functional.jacobian(f, zi.flatten())
        m = mi.flatten()
        # rows of observed coordinates are unit rows: observed values pass through untouched
        assert torch.equal(jac[~m], torch.eye(m.numel(), dtype=F64)[~m])
        sign, logabs = torch.linalg.slogdet(jac[m][:, m])
        assert sign > 0
        assert torch.allclose(logabs, logdet[i], atol=1e-10, rtol=1e-10)


def test_coupling_never_reads_observed_coordinates_nan_included():
    layer = randomise(AffineCoupling(1, 4, 4, partition="checkerboard", parity=0, hidden=8, n_blocks=1)).to(F64)
    z, missing, ctx = coupling_inputs(1, 4, 4, F64)
    out, ld = layer(z, missing, ctx)
    z_nan = torch.where(missing, z, torch.full_like(z, float("nan")))
    out_nan, ld_nan = layer(z_nan, missing, ctx)
    assert torch.equal(out_nan[missing], out[missing]) and torch.equal(ld_nan, ld)
    assert torch.isnan(out_nan[~missing]).all()  # passed through as they were
    assert torch.equal(layer.inverse(out_nan, missing, ctx)[missing], layer.inverse(out, missing, ctx)[missing])


def test_coupling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="partition"):
        AffineCoupling(1, 4, 4, partition="diagonal", parity=0, hidden=4, n_blocks=1)
    with pytest.raises(ValueError, match="parity"):
        AffineCoupling(1, 4, 4, partition="checkerboard", parity=2, hidden=4, n_blocks=1)
    with pytest.raises(ValueError, match="even channel count.*channels=3"):
        AffineCoupling(3, 4, 4, partition="channel", parity=0, hidden=4, n_blocks=1)


# --------------------------------------------------------------------------- the whole flow


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-10)])
@pytest.mark.parametrize("n_scales", [1, 3])
def test_flow_round_trip_and_observed_pass_through(dtype, tol, n_scales):
    model = tiny_flow(dtype, h=8, w=8, c=1, n_scales=n_scales, std=0.1)  # latents up to ~12
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 8, 8, generator=g, dtype=dtype) * 0.98 + 0.01
    missing = random_mask((4, 1, 8, 8), 0.5, seed=4)
    z, logdet = model.to_latent(x, missing)
    assert torch.equal(z[~missing], x[~missing])  # observed coordinates untouched by the flow
    assert torch.isfinite(logdet).all()
    back = model.from_latent(z, x, missing)
    assert torch.allclose(back, x, atol=tol, rtol=0)
    # the inverse from an arbitrary latent: z -> x -> z
    z2 = torch.where(missing, torch.randn(x.shape, generator=g, dtype=dtype), x)
    x2 = model.from_latent(z2, x, missing)
    assert torch.equal(x2[~missing], x[~missing])
    assert torch.allclose(model.to_latent(x2, missing)[0], z2, atol=1e3 * tol, rtol=1e3 * tol)


@pytest.mark.parametrize("c,h,w,n_scales", [(1, 4, 4, 2), (1, 4, 4, 3), (2, 4, 4, 2)])
def test_flow_logdet_and_log_prob_against_bruteforce(c, h, w, n_scales):
    model = tiny_flow(F64, h=h, w=w, c=c, n_scales=n_scales, alpha=0.05, std=0.25)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, c, h, w, generator=g, dtype=F64)
    missing = random_mask((2, 1, h, w), 0.6, seed=6)
    _, logdet = model.to_latent(x, missing)
    lp = model.log_prob(x, missing)
    normal = torch.distributions.Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64))
    for i in range(2):
        xi, mi = x[i:i + 1], missing[i:i + 1].expand(1, c, h, w)

        def f(values):  # missing values y_m (in [0, 1]) -> latent z_m, observed ones held fixed
            y = xi.masked_scatter(mi, values)
            return model.to_latent(y, mi)[0][mi]

        y_m = xi[mi]
        jac = torch.autograd.functional.jacobian(f, y_m)
        _, logabs = torch.linalg.slogdet(jac)
        assert torch.allclose(logabs, logdet[i], atol=1e-9, rtol=1e-9)
        ref = normal.log_prob(f(y_m)).sum() + logabs  # change of variables, independent of log_prob
        assert torch.allclose(lp[i], ref, atol=1e-9, rtol=1e-9)


def test_identity_flow_matches_torch_distributions():
    # A fresh flow is the identity (zero-initialised couplings): log_prob is the logit-normal
    # density of the preprocessing alone, which torch.distributions computes independently.
    alpha = 0.05
    model = ACFlow(1, 4, 4, hidden=4, n_blocks=1, n_scales=2, n_couplings=1, alpha=alpha).to(F64)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    missing = random_mask((3, 1, 4, 4), 0.5, seed=8)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64)),
        [torch.distributions.SigmoidTransform(),
         torch.distributions.AffineTransform(-alpha / (1 - 2 * alpha), 1 / (1 - 2 * alpha))],
    )
    ref = (dist.log_prob(x) * missing).flatten(1).sum(1)
    assert torch.allclose(model.log_prob(x, missing), ref, atol=1e-10)


def test_log_prob_is_normalised_in_one_and_two_dimensions():
    # A proper conditional density of the missing values integrates to 1 over their support I_α.
    # Mass piles up within e^-10 of the ends of I_α, which no grid in y resolves, so integrate
    # over the logit v instead: ∫ p(y) dy = ∫ p(y(v)) y'(v) dv with y(v) = (σ(v) − α)/(1 − 2α) and
    # y'(v) = σ(v)(1 − σ(v))/(1 − 2α) computed here, independently of the model's log-det code.
    alpha = 0.05
    model = tiny_flow(F64, alpha=alpha, std=0.15, seed=11)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(9), dtype=F64)

    def y_and_dy(v):
        sig = torch.sigmoid(v)
        return (sig - alpha) / (1 - 2 * alpha), sig * (1 - sig) / (1 - 2 * alpha)

    one = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    one[0, 0, 1, 2] = True
    v = torch.linspace(-25, 25, 501, dtype=F64)
    y, dy = y_and_dy(v)
    xs = x.repeat(v.numel(), 1, 1, 1)
    xs[:, 0, 1, 2] = y
    # log_prob checks y ∈ [0, 1]; the slightly wider support I_α goes through the internal path
    dens = torch.exp(_log_prob_unchecked(model, xs, one.expand_as(xs))) * dy
    assert dens[0] < 1e-8 and dens[-1] < 1e-8  # the range holds all the mass
    assert abs(torch.trapezoid(dens, v).item() - 1.0) < 1e-9

    two = one.clone()
    two[0, 0, 2, 2] = True  # opposite checkerboard colours: the two pixels condition each other
    v = torch.linspace(-20, 20, 81, dtype=F64)
    y, dy = y_and_dy(v)
    a, b = torch.meshgrid(torch.arange(v.numel()), torch.arange(v.numel()), indexing="ij")
    xs = x.repeat(a.numel(), 1, 1, 1)
    xs[:, 0, 1, 2], xs[:, 0, 2, 2] = y[a.flatten()], y[b.flatten()]
    dens = torch.exp(_log_prob_unchecked(model, xs, two.expand_as(xs))).view(a.shape) * dy[:, None] * dy[None, :]
    assert dens[[0, -1], :].max() < 1e-8 and dens[:, [0, -1]].max() < 1e-8
    total = torch.trapezoid(torch.trapezoid(dens, v, dim=1), v).item()
    assert abs(total - 1.0) < 1e-3  # ReLU kinks make the 2-D integrand only piecewise smooth


@torch.no_grad()
def _log_prob_unchecked(model, y, missing, chunk=8192):
    """log_prob without input checks (so y may cover all of I_α), in chunks to bound memory."""
    out = []
    for i in range(0, y.shape[0], chunk):
        yi, mi = y[i:i + chunk], missing[i:i + chunk]
        z, logdet = model._to_latent(yi, mi)
        z = torch.where(mi, z, torch.zeros_like(z))
        out.append(((-0.5 * z * z - 0.5 * math.log(2 * math.pi)) * mi).flatten(1).sum(1) + logdet)
    return torch.cat(out)


def test_conditioning_uses_observed_values_but_never_missing_ones():
    model = tiny_flow(F64, h=8, w=8, n_scales=2, alpha=0.05)
    g = torch.Generator().manual_seed(12)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=F64)
    missing = random_mask((2, 1, 8, 8), 0.5, seed=13)
    lp = model.log_prob(x, missing)
    # NaN at missing pixels in the conditioning path changes nothing
    x_nan = torch.where(missing, torch.full_like(x, float("nan")), x)
    ctx_nan = model.context(x_nan, missing)
    assert torch.isfinite(ctx_nan).all() and torch.equal(ctx_nan, model.context(x, missing))
    z, logdet = model._to_latent(x, missing, ctx_nan)
    base = torch.distributions.Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64)).log_prob(z)
    assert torch.allclose((base * missing).flatten(1).sum(1) + logdet, lp, atol=1e-10)
    # changing an observed pixel changes the density of the missing ones (it is conditioning) ...
    obs = (~missing[0, 0]).nonzero()[0]
    x2 = x.clone()
    x2[0, 0, obs[0], obs[1]] = 1.0 - x2[0, 0, obs[0], obs[1]]
    lp2 = model.log_prob(x2, missing)
    assert (lp2[0] - lp[0]).abs() > 1e-6 and torch.allclose(lp2[1], lp[1], atol=1e-12)
    # ... and the latent of the missing pixels depends on them
    m0 = missing[0]
    assert not torch.equal(model.to_latent(x2, missing)[0][0][m0], model.to_latent(x, missing)[0][0][m0])


def test_nothing_missing_gives_zero_and_all_missing_is_finite():
    model = tiny_flow(F64)
    x = torch.rand(2, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.log_prob(x, torch.zeros(2, 1, 4, 4, dtype=torch.bool)), torch.zeros(2, dtype=F64))
    assert torch.isfinite(model.log_prob(x, torch.ones(2, 1, 4, 4, dtype=torch.bool))).all()


def test_extreme_pixels_are_finite_in_float32():
    model = tiny_flow(torch.float32, h=8, w=8, std=0.1)
    x = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()  # only 0 and 1
    missing = random_mask((2, 1, 8, 8), 0.5)
    assert torch.isfinite(model.log_prob(x, missing)).all()
    assert torch.isfinite(model.log_prob(x, missing, dequantize=True, generator=torch.Generator())).all()
    z, _ = model.to_latent(x, missing)
    assert torch.allclose(model.from_latent(z, x, missing), x, atol=1e-5)


# --------------------------------------------------------------------------- sampling / imputation


def test_sample_and_impute():
    model = tiny_flow(torch.float32, h=8, w=8, n_scales=2, std=0.1)
    g = torch.Generator().manual_seed(14)
    x = torch.rand(3, 1, 8, 8, generator=g)
    missing = random_mask((3, 1, 8, 8), 0.5, seed=15)
    x_nan = torch.where(missing, torch.full_like(x, float("nan")), x)
    s = model.sample(x_nan, missing, n_samples=5, generator=torch.Generator().manual_seed(1))
    assert s.shape == (5, 3, 1, 8, 8)
    assert torch.equal(s[:, ~missing], x[~missing].expand(5, -1))  # observed pixels exactly x
    assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    assert s[:, missing].std(0).mean() > 1e-3  # samples differ
    # NaN-ness (or any value) at missing pixels does not change samples; the generator fixes them
    s_clean = model.sample(x, missing, n_samples=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, s_clean)
    # a sample is the inverse flow of N(0, I) noise at the missing coordinates
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(s[0], model.from_latent(z, x, missing), atol=1e-6)
    assert torch.allclose(model.to_latent(s[0], missing)[0][missing], z[missing], atol=1e-3)
    imp = model.impute(x_nan, missing, n_samples=5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(imp, torch.where(missing, s.mean(0), x))
    # temperature 0 is deterministic: the image of z = 0
    t0 = model.sample(x, missing, n_samples=2, temperature=0.0, generator=g)
    assert torch.equal(t0[0], t0[1])
    assert torch.allclose(t0[0], model.from_latent(torch.where(missing, 0.0, x), x, missing))


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    model = tiny_flow(torch.float32, h=8, w=8)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    m = random_mask((2, 1, 8, 8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model.log_prob(x.numpy(), m)
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*uint8"):
        model.log_prob((x * 255).to(torch.uint8), m)
    with pytest.raises(TypeError, match="missing must be a bool tensor.*torch.float32"):
        model.log_prob(x, m.float())
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\), got \(2, 1, 8, 7\)"):
        model.log_prob(x[..., :7], m[..., :7])
    with pytest.raises(ValueError, match=r"missing must have shape.*got \(3, 1, 8, 8\)"):
        model.log_prob(x, random_mask((3, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"x must be in \[0, 1\] at observed pixels, got values in \[1\.\d*, 1\.\d*\]"):
        model.log_prob(torch.where(m, x, x + 1.0), m)
    with pytest.raises(ValueError, match="NaN or inf at observed pixels"):
        model.sample(torch.where(m, x, torch.full_like(x, float("nan"))), m)
    with pytest.raises(ValueError, match="NaN or inf at missing pixels; log_prob needs their values"):
        model.log_prob(torch.where(m, torch.full_like(x, float("nan")), x), m)
    with pytest.raises(ValueError, match=r"x must be in \[0, 1\] at missing pixels"):
        model.log_prob(torch.where(m, -x - 0.1, x), m)
    with pytest.raises(ValueError, match="n_samples must be >= 1, got 0"):
        model.sample(x, m, n_samples=0)
    with pytest.raises(ValueError, match="temperature must be a float >= 0"):
        model.sample(x, m, temperature=-1.0)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(n_scales-1\) = 4, got height=6"):
        ACFlow(1, 6, 8, n_scales=3)
    with pytest.raises(ValueError, match=r"alpha must be a float in \(0, 0.5\), got 0.5"):
        ACFlow(1, 8, 8, alpha=0.5)
    with pytest.raises(TypeError, match="hidden must be an int"):
        ACFlow(1, 8, 8, hidden=3.5)
    with pytest.raises(ValueError, match="images must be in \\[0, 1\\]"):
        train_acflow(x * 3, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"val_missing must have shape \(2, 1 or 1, 8, 8\), got \(1, 1, 8, 8\)"):
        train_acflow(x, epochs=1, progress=False, val_images=x, val_missing=m[:1])
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        study_mask_fn(8, 8, ("circle",))


# --------------------------------------------------------------------------- training


def test_study_mask_fn_mixes_the_three_kinds():
    fn = study_mask_fn(28, 28)
    masks = fn(60, torch.Generator().manual_seed(0))
    assert masks.shape == (60, 1, 28, 28) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    square = counts == 196
    noise = counts == 588
    trapezoid = (counts - 392).abs() <= 0.02 * 784
    assert (square | noise | trapezoid).all()
    assert square.any() and noise.any() and trapezoid.any()
    assert torch.equal(fn(60, torch.Generator().manual_seed(0)), masks)  # reproducible


def _smoke_images(n=160):
    """MNIST digits average-pooled to 14×14 (4× cheaper than 28×28; still digits, still in [0, 1])."""
    try:
        from labkit.data import load_dataset

        images = load_dataset("mnist", "train", limit=n, download=False, quiet=True).images
    except (FileNotFoundError, ImportError):  # no data here: random bars stand in
        g = torch.Generator().manual_seed(0)
        images = torch.zeros(n, 1, 28, 28)
        rows = torch.randint(6, 22, (n,), generator=g)
        for i in range(n):
            images[i, 0, rows[i] - 2:rows[i] + 2, 5:23] = 1.0
    return torch.nn.functional.avg_pool2d(images, 2)


def test_training_smoke_nll_decreases_and_resumes(tmp_path):
    images = _smoke_images()
    train, val = images[:128], images[128:]
    val_missing = study_mask_fn(14, 14)(val.shape[0], torch.Generator().manual_seed(5))
    kwargs = dict(hidden=8, n_blocks=1, n_scales=2, n_couplings=1)
    ckpt = tmp_path / "acflow.partial.pt"

    torch.manual_seed(0)  # the model's initial weights
    before = evaluate_nll(ACFlow(1, 14, 14, **kwargs), val, val_missing, generator=torch.Generator().manual_seed(0))
    model, hist = train_acflow(train, epochs=5, batch_size=16, lr=3e-3, seed=0, checkpoint=ckpt,
                               progress=False, model_kwargs=kwargs, val_images=val, val_missing=val_missing,
                               device="cpu")  # 5 epochs x 8 batches = 40 steps
    assert len(hist) == 5 and all(h["batches"] == 8 for h in hist)
    assert all(h["skipped"] == 0 for h in hist)
    # training NLL goes down, and so does held-out NLL compared with the untrained flow
    assert hist[-1]["nll_per_missing_pixel"] < hist[0]["nll_per_missing_pixel"] - 0.1
    after = evaluate_nll(model, val, val_missing, generator=torch.Generator().manual_seed(0))
    assert after["nll_per_missing_pixel"] < before["nll_per_missing_pixel"] - 0.1
    assert hist[-1]["val_nll_per_missing_pixel"] < hist[0]["val_nll_per_missing_pixel"]
    assert math.isclose(hist[-1]["bits_per_dim"], hist[-1]["nll_per_missing_pixel"] / math.log(2) + 8)
    assert hist[-1]["images_per_second"] > 0

    # rerun with the same checkpoint: nothing left to do, the same weights come back
    again, hist2 = train_acflow(train, epochs=5, batch_size=16, lr=3e-3, seed=0, checkpoint=ckpt,
                                progress=False, model_kwargs=kwargs, val_images=val, val_missing=val_missing,
                                device="cpu")
    assert [h["nll_per_missing_pixel"] for h in hist2] == [h["nll_per_missing_pixel"] for h in hist]
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    loaded, meta = load_acflow(ckpt, device="cpu")
    assert loaded.config == model.config and len(meta["history"]) == 5
    x, m = val[:2], val_missing[:2]
    assert torch.allclose(loaded.log_prob(x, m), model.log_prob(x, m))


def test_bits_per_dim():
    assert bits_per_dim(0.0) == 8.0
    assert math.isclose(bits_per_dim(-math.log(2.0)), 7.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    model = tiny_flow(torch.float32, h=8, w=8).cuda()
    x = torch.rand(2, 1, 8, 8, device="cuda")
    m = random_mask((2, 1, 8, 8)).cuda()
    lp = model.log_prob(x, m, dequantize=True, generator=torch.Generator().manual_seed(0))
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    s = model.sample(x, m, n_samples=2, generator=torch.Generator().manual_seed(0))
    assert s.device.type == "cuda" and torch.equal(s[:, ~m], x[~m].expand(2, -1))
    cpu = model.cpu().log_prob(x.cpu(), m.cpu(), dequantize=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lp.cpu(), cpu, atol=1e-4)


def test_score_holes_on_the_identity_flow_against_closed_forms():
    # A fresh flow is the identity, so every score has a closed form computed here without the
    # model: the logit-normal density (torch.distributions) at exact and at dequantised values,
    # and an imputation whose samples are sigmoid(N(0,1)) with mean 1/2 (so SSE ≈ Σ(1/2 − x)²).
    from labkit.studies.density import score_holes

    alpha = 0.05
    model = ACFlow(1, 4, 4, hidden=4, n_blocks=1, n_scales=2, n_couplings=1, alpha=alpha).to(F64)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    missing = random_mask((5, 1, 4, 4), 0.5, seed=4)
    missing[0] = False                                         # an image with nothing hidden scores 0
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64)),
        [torch.distributions.SigmoidTransform(),
         torch.distributions.AffineTransform(-alpha / (1 - 2 * alpha), 1 / (1 - 2 * alpha))],
    )
    df = score_holes(model, x, missing, n_samples=4000, batch_size=2, seed=0)
    assert list(df.columns) == ["nll", "nll_dequantized", "sse", "n_missing"]
    assert df["n_missing"].tolist() == missing.flatten(1).sum(1).tolist()
    exact = -(dist.log_prob(x) * missing).flatten(1).sum(1)
    assert torch.allclose(torch.tensor(df["nll"].to_numpy()), exact, atol=1e-9)
    # dequantised: y = (255x + u)/256 with the seed's uniforms, drawn in score_holes' batch order
    g = torch.Generator().manual_seed(0)
    y = torch.cat([(255 * x[i:i + 2] + torch.rand(x[i:i + 2].shape, generator=g, dtype=F64)) / 256
                   for i in range(0, 5, 2)])
    deq = -(dist.log_prob(y) * missing).flatten(1).sum(1)
    assert torch.allclose(torch.tensor(df["nll_dequantized"].to_numpy()), deq, atol=1e-9)
    assert not torch.allclose(deq, exact)                      # the two protocols differ
    # E[sigmoid(Z)] = 1/2 for Z ~ N(0,1), mapped through the α-affine map (it keeps 1/2 fixed)
    sse_ref = (((0.5 - x) * missing) ** 2).flatten(1).sum(1)
    assert df["sse"].iloc[0] == 0.0
    assert torch.allclose(torch.tensor(df["sse"].to_numpy()), sse_ref, atol=0.02)


def test_score_holes_rejects_bad_arguments():
    from labkit.studies.density import score_holes

    model = tiny_flow()
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match="differ in N"):
        score_holes(model, x, torch.zeros(3, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_samples"):
        score_holes(model, x, torch.zeros(2, 1, 4, 4, dtype=torch.bool), n_samples=0)


# --------------------------------------------------------------------------------------------
# ./lab study acflow: a stored model is reused only with its settings
def test_the_acflow_study_reuses_only_a_model_of_the_same_settings(tmp_path, capsys):
    from labkit.lab.study_cli import main

    out = tmp_path / "acflow_mnist.pt"
    tiny = ["acflow", "-p", "n_train=16", "-p", "n_val=0", "-p", "epochs=1", "-p", "batch_size=8", "-p", "hidden=4",
            "-p", "n_blocks=0", "-p", "n_scales=2", "-p", "n_couplings=1", "-p", "device=cpu", "--no-progress",
            "--results", str(tmp_path)]
    assert main(tiny) == 0
    first = out.read_bytes()
    _, meta = load_acflow(out, device="cpu")
    assert meta["train_config"]["epochs"] == 1 and meta["train_config"]["precision"] == "32"
    assert meta["resume_command"] == (f"./lab study acflow -p device=cpu -p n_train=16 -p n_val=0 -p batch_size=8 "
                                      f"-p hidden=4 -p n_blocks=0 -p n_scales=2 -p n_couplings=1 -p results_dir={tmp_path}")
    assert "| 1 |" in (tmp_path / "acflow_mnist.md").read_text()      # the report: one row per epoch
    capsys.readouterr()
    assert main(tiny) == 0                                           # same settings: kept, nothing trained
    assert "kept, nothing to train" in capsys.readouterr().out and out.read_bytes() == first
    assert main(tiny + ["-p", "lr=0.002"]) == 0                      # other settings: their own file
    said = [line for line in capsys.readouterr().out.splitlines() if "other settings" in line]
    assert len(said) == 1 and "lr: stored 0.001, requested 0.002" in said[0]
    derived = [p for p in tmp_path.glob("acflow_mnist-*.pt")]
    assert len(derived) == 1 and derived[0].name in said[0] and out.read_bytes() == first
    assert load_acflow(derived[0], device="cpu")[1]["train_config"]["lr"] == 0.002
    assert derived[0].with_suffix(".md").is_file()                   # its report beside it, not over the first's
    # more epochs of the first settings: another file, continuing the first run's progress
    longer_args = list(tiny)
    longer_args[longer_args.index("epochs=1")] = "epochs=2"
    assert main(longer_args) == 0
    longer = [p for p in tmp_path.glob("acflow_mnist-*.pt") if p != derived[0]]
    assert len(longer) == 1 and out.read_bytes() == first
    history = load_acflow(longer[0], device="cpu")[1]["history"]
    assert len(history) == 2 and history[0]["nll_per_missing_pixel"] == meta["history"][0]["nll_per_missing_pixel"]
    # --table-only: the report of the model of these settings, nothing trained
    (tmp_path / "acflow_mnist.md").unlink()
    capsys.readouterr()
    assert main(tiny + ["--table-only"]) == 0
    assert "| 1 |" in (tmp_path / "acflow_mnist.md").read_text() and out.read_bytes() == first
    with pytest.raises(FileNotFoundError, match="no ACFlow trained with these settings.*./lab study acflow"):
        main(tiny + ["-p", "seed=3", "--table-only"])


def test_the_acflow_study_writes_its_history_into_a_marked_block(tmp_path):
    from labkit.studies import acflow_study
    from labkit.studies.configs import ACFlowConfig

    meta = {"config": {"model": {"hidden": 4}, "batch_size": 8, "lr": 0.001, "precision": "32"},
            "setting": {"dataset": "mnist", "n_train": 16, "n_val": 4, "mask_kinds": ["square"]}, "epochs": 1,
            "seed": 0, "history": [{"epoch": 0, "nll_per_missing_pixel": -1.5, "bits_per_dim": 5.8, "seconds": 2.0,
                                    "images_per_second": 8.0, "val_nll_per_missing_pixel": -1.25,
                                    "val_bits_per_dim": 6.2}],
            "checkpoint_path": str(tmp_path / "acflow_mnist.pt")}
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- acflow-training:start -->\nold\n<!-- acflow-training:end -->\n")
    cfg = ACFlowConfig(results_dir=str(tmp_path))
    written = acflow_study.write_report(cfg, meta, doc=doc)
    assert written == [tmp_path / "acflow_mnist.md", doc]
    assert "| 1 | -1.5000 | 5.800 | -1.2500 | 6.200 | 2 | 8.0 |" in doc.read_text() and "old" not in doc.read_text()
    with pytest.raises(ValueError, match="lacks the markers"):
        acflow_study.write_report(cfg, meta, doc=doc, marker="nope")


def test_the_acflow_config_names_its_file_and_its_command():
    from labkit.studies import acflow_study
    from labkit.studies.configs import ACFlowConfig

    cpu = ACFlowConfig.build("cpu")
    assert acflow_study.checkpoint_path(cpu) == Path("results/acflow/acflow_mnist.pt")
    assert acflow_study.results_path(cpu) == Path("results/acflow")
    moved = cpu.replace(results_dir="/tmp/x")
    assert acflow_study.checkpoint_path(moved) == Path("/tmp/x/acflow_mnist.pt") == acflow_study.results_path(moved) / "acflow_mnist.pt"
    assert acflow_study.command_line(cpu.replace(precision="bf16-mixed")) == (
        "./lab study acflow -p n_train=10000 -p n_val=1000 -p 'masks=[square,trapezoid_inside,noise]' -p epochs=10 "
        "-p precision=bf16-mixed")
    # the command's -p values, read back as the shell hands them over, give the same settings
    for cfg in (cpu, cpu.replace(precision="auto", max_batches=3, device="cpu"), ACFlowConfig(precision="16-mixed")):
        texts = shlex.split(acflow_study.command_line(cfg))[4::2]
        again = build_config("acflow", "quick", texts)[1]
        assert {**again.as_dict(), "profile": cfg.profile} == cfg.as_dict()


def test_old_acflow_checkpoints_are_read_in_todays_words():
    from labkit.studies.acflow_study import stored_settings

    old = {"config": {"model": {"hidden": 32}, "batch_size": 64, "lr": 0.001, "max_batches": None},
           "setting": {"dataset": "mnist", "n_train": 10000, "n_val": 1000, "train_source": "s",
                       "mask_kinds": ["square", "trapezoid", "noise"]}, "epochs": 10, "seed": 0}
    view = stored_settings(old)
    assert view["mask_kinds"] == ["square", "trapezoid_inside", "noise"] and "precision" not in view
    assert (view["epochs"], view["lr"], view["batch_size"]) == (10, 0.001, 64)
    recorded = {**old, "config": {**old["config"], "precision": "32"}}   # a file of the half-plane era
    assert stored_settings(recorded)["mask_kinds"] == ["square", "trapezoid", "noise"]


def test_unreadable_acflow_checkpoint_is_reported_as_an_input(tmp_path):
    from labkit.checkpoint import CheckpointError

    bad = tmp_path / "acflow_mnist.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="(?s)ACFlow checkpoint.*acflow_mnist.pt.*input") as info:
        load_acflow(bad, device="cpu")
    assert "delete it" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="ACFlow checkpoint.*input.*./lab study acflow"):
        load_acflow(tmp_path / "nope.pt", device="cpu")
