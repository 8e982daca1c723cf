r"""ACFlow: an arbitrary-conditional normalizing flow imputer (baseline of the MisConv studies).

Paper: Li, Akbar, Oliva, *ACFlow: Flow Models for Arbitrary Conditional Likelihoods*, ICML 2020,
https://arxiv.org/abs/1909.06319.

After Li, Akbar and Oliva, "ACFlow: Flow Models for Arbitrary Conditional Likelihoods" (ICML 2020),
written from the paper's description in PyTorch (no code taken from the authors' TF1 release).

What is modelled
----------------
For an image ``x`` (B, C, H, W) in [0, 1] and a bool mask ``missing`` (True = missing), the model
is a density of the missing pixels given the observed ones, ``p(x_m | x_o, m)``, for *any* mask.
Only the missing coordinates are transformed; observed coordinates are never touched (they pass
through every layer unchanged and contribute no log-determinant) and enter only as conditioning.

Precisely, :meth:`ACFlow.log_prob` returns ``log p(y_m | x_o, m)`` in nats, the **continuous density
of the dequantised missing values** ``y_m ∈ [0, 1]^{|m|}`` (Lebesgue measure on [0, 1] per missing
pixel), evaluated at ``y = x`` (or at ``y = (255·x + u)/256, u ~ U[0, 1)``, with ``dequantize=True``;
this is how training sees 8-bit images). The chain of maps is

    y  --(logit preprocessing)-->  v = logit(α + (1−2α)·y)          per missing pixel, α = 1e-6
    v  --(conditional flow f)-->   z = f(v; x_o, m)                  only missing coordinates move
    z  ~  N(0, I) over the missing coordinates only

    log p(y_m | x_o, m) = Σ_m log N(z; 0, 1) + log|det ∂f/∂v|_m + Σ_m [log(1−2α) − log p − log(1−p)]

with ``p = α + (1−2α)·y``. Strictly, this is a normalised density of ``y_m`` on the box
``I_α^{|m|}``, ``I_α = (−α/(1−2α), 1 + α/(1−2α))`` (the logit maps I_α onto R), so on [0, 1] it is
a density up to the mass the model puts within ``α/(1−2α)`` (1e-6 by default) outside [0, 1]:
negligible, and it only makes reported NLLs conservative. The discrete 8-bit likelihood is
bounded by it (uniform dequantisation, Theis et al. 2016):
``log P(x_m | x_o) ≥ E_u log p(y_m | x_o) − |m|·log 256``, hence the reported
``bits/dim = −E_u log p / (|m|·ln 2) + 8`` per missing pixel (:func:`bits_per_dim`).

Architecture (RealNVP multi-scale, Dinh et al. 2017, made conditional)
---------------------------------------------------------------------
Scale k works at (C·4^k, H/2^k, W/2^k). Every scale but the last: ``n_couplings`` checkerboard
couplings, a squeeze (each 2×2 block -> 4 channels), ``n_couplings`` channel-half couplings. The last
scale: ``n_couplings + 1`` checkerboard couplings, then one *conditional affine* layer whose scale
and shift depend on the observed pixels only (the role of ACFlow's conditional base). Nothing is
factored out between scales (all dimensions go through every layer; they are few at 28×28).

An affine coupling with partition ``b`` (True = "conditioning half") transforms the coordinates
``a = missing ∧ ¬b``:

    z'_a = z_a · exp(s) + t,      z'_rest = z_rest,      log|det| = Σ_a s,
    (s, t) = NN([z ⊙ (missing ∧ b),  2·x_o − 1 (0 where missing),  missing,  pattern])

so s and t never depend on the coordinates they move (triangular Jacobian), are forced to 0 on
observed and conditioning coordinates, and see the observed values. ``missing`` and the observed
values are squeezed exactly like ``z`` at every squeeze. ``s = σ·tanh(raw)`` with a learned σ per
channel keeps scales bounded; the last conv of each coupling net is zero-initialised, so a fresh
flow is the identity (a stable start).

Coupling nets: conv3×3 -> ``n_blocks`` residual blocks (ReLU, conv3×3, ReLU, conv3×3) -> ReLU ->
conv3×3, all ``hidden`` channels, no normalisation layers (train and eval behave the same).

Size for the CPU
----------------
Defaults for MNIST 28×28 (``hidden=32, n_blocks=1, n_scales=3, n_couplings=3``): 17 couplings
(3 at 28×28, 6 at 14×14, 8 at 7×7), 0.54 M parameters. Measured with
``./lab study acflow -p n_train=10000`` on 10,000 MNIST images, batch 64, one torch thread on a 2-core AMD
EPYC that four other training runs were sharing: 310 s of optimisation per epoch (32 images/s);
after one epoch the held-out NLL on mixed square/trapezoid/noise masks was 2.17 bits per missing
pixel. So about 10 epochs fit in an hour even on a busy machine. Bigger models (``hidden=64,
n_blocks=2``) are for a GPU.

Training and evaluation (``train_acflow``, ``load_acflow``, ``evaluate_nll``, ``bits_per_dim``,
``study_mask_fn``) live in :mod:`labkit.models.acflow_training`, which imports this module.

Shapes: ``x`` (B, C, H, W) float in [0, 1]; ``missing`` bool (B, 1, H, W) or (B, C, H, W).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.checks import check_int
from labkit.precision import to_float32

__all__ = [
    "ACFlow",
    "AffineCoupling",
    "squeeze2d",
    "unsqueeze2d",
]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# squeeze


def squeeze2d(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2×2 block becomes 4 channels.

    Output channel ``4c + 2i + j`` holds pixel ``(2h + i, 2w + j)`` of input channel ``c``.
    Works for any dtype (bool masks included), so masks are squeezed exactly like the data.
    """
    b, c, h, w = t.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze2d needs even height and width, got shape {tuple(t.shape)}")
    t = t.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return t.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2d(t: Tensor) -> Tensor:
    """Inverse of :func:`squeeze2d`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c4, h, w = t.shape
    if c4 % 4:
        raise ValueError(f"unsqueeze2d needs a channel count divisible by 4, got shape {tuple(t.shape)}")
    c = c4 // 4
    t = t.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(b, c, 2 * h, 2 * w)


# --------------------------------------------------------------------------------------------
# coupling layers


class _ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv2(F.relu(self.conv1(F.relu(h))))


class _CouplingNet(nn.Module):
    """conv3×3 -> residual blocks -> ReLU -> zero-initialised conv3×3 giving (raw_s, t)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, n_blocks: int):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(n_blocks))
        self.out = nn.Conv2d(hidden, 2 * out_channels, 3, padding=1)
        # Zero init: s = t = 0, the coupling starts as the identity (stable start of training).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, inp: Tensor) -> tuple[Tensor, Tensor]:
        h = self.inp(inp)
        for block in self.blocks:
            h = block(h)
        raw_s, t = self.out(F.relu(h)).chunk(2, dim=1)
        return raw_s, t


class AffineCoupling(nn.Module):
    """Conditional affine coupling that moves only missing coordinates.

    Args:
        channels, height, width: shape of the tensor it acts on (C, H, W) (after squeezes).
        partition: ``"checkerboard"`` (spatial parity pattern), ``"channel"`` (first/second half of
            the channels; needs an even channel count) or ``"none"`` (nothing is conditioning: s and
            t depend on the observed pixels only, a conditional elementwise affine map).
        parity: 0 or 1, which half is the conditioning half ``b``.
        hidden, n_blocks: width and depth of the coupling net.

    ``forward(z, missing, context) -> (z', logdet)`` and ``inverse(z', missing, context) -> z``
    with ``z`` (B, C, H, W), ``missing`` bool (B, C, H, W), ``context`` (B, 2C, H, W) (see
    :meth:`ACFlow.context`), ``logdet`` (B,) summed over the moved (missing) coordinates only.
    Values of ``z`` at observed coordinates are never read and are returned unchanged (NaN too).
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        *,
        partition: str,
        parity: int,
        hidden: int,
        n_blocks: int,
    ):
        super().__init__()
        if partition not in ("checkerboard", "channel", "none"):
            raise ValueError(f"partition must be 'checkerboard', 'channel' or 'none', got {partition!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        if partition == "channel" and channels % 2:
            raise ValueError(f"a channel partition needs an even channel count, got channels={channels}")
        self.partition, self.parity = partition, parity
        self.channels, self.height, self.width = channels, height, width
        if partition == "checkerboard":
            ij = torch.arange(height).view(-1, 1) + torch.arange(width).view(1, -1)
            b = ((ij % 2) == parity).view(1, 1, height, width).expand(1, channels, height, width)
        elif partition == "channel":
            half = torch.arange(channels) < channels // 2
            b = (half if parity == 0 else ~half).view(1, channels, 1, 1).expand(1, channels, height, width)
        else:
            b = torch.zeros(1, channels, height, width, dtype=torch.bool)
        self.register_buffer("cond_half", b.contiguous(), persistent=False)
        # The checkerboard pattern is an input channel: convolutions are translation-equivariant
        # and would not otherwise know which pixels they are meant to move.
        extra = 1 if partition == "checkerboard" else 0
        self.net = _CouplingNet(channels + 2 * channels + extra, channels, hidden, n_blocks)
        self.log_scale_bound = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def _scale_shift(self, z: Tensor, missing: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = self.cond_half
        # torch.where, not multiplication: NaN/inf at unused coordinates must not leak into the net.
        z_in = torch.where(missing & b, z, torch.zeros((), dtype=z.dtype, device=z.device))
        parts = [z_in, context]
        if self.partition == "checkerboard":
            parts.append(b[:, :1].to(z.dtype).expand(z.shape[0], 1, -1, -1))
        # under mixed precision the coupling net runs in bfloat16/float16; the flow itself (z, s,
        # t, the log-determinant) stays float32
        raw_s, t = to_float32(*self.net(torch.cat(parts, dim=1)))
        s = torch.exp(self.log_scale_bound) * torch.tanh(raw_s)
        active = missing & ~b
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        return torch.where(active, s, zero), torch.where(active, t, zero), active

    def forward(self, z: Tensor, missing: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        s, t, active = self._scale_shift(z, missing, context)
        out = torch.where(active, z * torch.exp(s) + t, z)
        return out, s.flatten(1).sum(1)

    def inverse(self, z: Tensor, missing: Tensor, context: Tensor) -> Tensor:
        # The net reads only coordinates in missing ∧ b, which forward left unchanged.
        s, t, active = self._scale_shift(z, missing, context)
        return torch.where(active, (z - t) * torch.exp(-s), z)


class _Squeeze(nn.Module):
    """Marker step: squeeze data, mask and context together."""


# --------------------------------------------------------------------------------------------
# the model


class ACFlow(nn.Module):
    """Arbitrary-conditional RealNVP flow over the missing pixels (see the module docstring).

    Args:
        channels, height, width: image shape (C, H, W); H and W must be divisible by
            ``2**(n_scales - 1)``.
        hidden: channels of the coupling nets (default 32).
        n_blocks: residual blocks per coupling net (default 1).
        n_scales: number of resolutions (default 3: 28 -> 14 -> 7 for MNIST).
        n_couplings: couplings per stage (default 3, as RealNVP).
        alpha: logit preprocessing margin in (0, 0.5), v = logit(α + (1−2α)·y) (default 1e-6, as the
            MNIST flows of MAF; RealNVP used 0.05 on natural images). It keeps ``y = 0`` and
            ``y = 1`` (common in MNIST) at finite ``v``.

    Methods: :meth:`log_prob`, :meth:`sample`, :meth:`impute`, :meth:`to_latent`,
    :meth:`from_latent`. ``forward(x, missing)`` is ``log_prob(x, missing)``.
    ``config`` holds the constructor arguments (stored in checkpoints).
    """

    def __init__(
        self,
        channels: int = 1,
        height: int = 28,
        width: int = 28,
        *,
        hidden: int = 32,
        n_blocks: int = 1,
        n_scales: int = 3,
        n_couplings: int = 3,
        alpha: float = 1e-6,
    ):
        super().__init__()
        for name, value in (("channels", channels), ("height", height), ("width", width),
                            ("hidden", hidden), ("n_scales", n_scales), ("n_couplings", n_couplings)):
            check_int(value, name)
        check_int(n_blocks, "n_blocks", 0)
        factor = 2 ** (n_scales - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be divisible by 2**(n_scales-1) = {factor}, "
                f"got height={height}, width={width}, n_scales={n_scales}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must be a float in (0, 0.5), got {alpha!r}")
        self.channels, self.height, self.width = channels, height, width
        self.n_scales = n_scales
        self.alpha = float(alpha)
        self.config = dict(channels=channels, height=height, width=width, hidden=hidden,
                           n_blocks=n_blocks, n_scales=n_scales, n_couplings=n_couplings,
                           alpha=self.alpha)

        steps: list[nn.Module] = []
        c, h, w = channels, height, width
        kw = dict(hidden=hidden, n_blocks=n_blocks)
        for scale in range(n_scales):
            last = scale == n_scales - 1
            for i in range(n_couplings + (1 if last else 0)):
                steps.append(AffineCoupling(c, h, w, partition="checkerboard", parity=i % 2, **kw))
            if last:
                steps.append(AffineCoupling(c, h, w, partition="none", parity=0, **kw))
            else:
                steps.append(_Squeeze())
                c, h, w = 4 * c, h // 2, w // 2
                for i in range(n_couplings):
                    steps.append(AffineCoupling(c, h, w, partition="channel", parity=i % 2, **kw))
        self.steps = nn.ModuleList(steps)

    # ---------------------------------------------------------------- input checks / helpers

    def _param(self) -> Tensor:
        return next(self.parameters())

    def _check(self, x: Any, missing: Any, *, values_at_missing: bool) -> tuple[Tensor, Tensor]:
        """Validate and return (x in the model's dtype, missing expanded to (B, C, H, W))."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not isinstance(missing, Tensor):
            raise TypeError(f"missing must be a torch.Tensor, got {type(missing).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if missing.dtype != torch.bool:
            raise TypeError(f"missing must be a bool tensor (True = missing), got dtype {missing.dtype}")
        chw = (self.channels, self.height, self.width)
        if x.dim() != 4 or tuple(x.shape[1:]) != chw:
            raise ValueError(f"x must have shape (B, {chw[0]}, {chw[1]}, {chw[2]}), got {tuple(x.shape)}")
        if missing.dim() != 4 or missing.shape[0] != x.shape[0] or missing.shape[1] not in (1, self.channels) \
                or tuple(missing.shape[2:]) != chw[1:]:
            raise ValueError(
                f"missing must have shape ({x.shape[0]}, 1 or {chw[0]}, {chw[1]}, {chw[2]}) to match x "
                f"{tuple(x.shape)}, got {tuple(missing.shape)}"
            )
        param = self._param()
        if x.device != param.device or missing.device != param.device:
            raise ValueError(
                f"x ({x.device}) and missing ({missing.device}) must be on the model's device ({param.device})"
            )
        missing = missing.expand_as(x)
        x = x.to(param.dtype)
        observed = ~missing
        obs_vals = x[observed]
        if obs_vals.numel():
            if not torch.isfinite(obs_vals).all():
                raise ValueError("x has NaN or inf at observed pixels; only missing pixels may hold them")
            lo, hi = obs_vals.min().item(), obs_vals.max().item()
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"x must be in [0, 1] at observed pixels, got values in [{lo:.4g}, {hi:.4g}]")
        if values_at_missing:
            miss_vals = x[missing]
            if miss_vals.numel():
                if not torch.isfinite(miss_vals).all():
                    raise ValueError(
                        "x has NaN or inf at missing pixels; log_prob needs their values (it is their density)"
                    )
                lo, hi = miss_vals.min().item(), miss_vals.max().item()
                if lo < 0.0 or hi > 1.0:
                    raise ValueError(
                        f"x must be in [0, 1] at missing pixels for log_prob, got values in [{lo:.4g}, {hi:.4g}]"
                    )
        return x, missing

    @staticmethod
    def context(x: Tensor, missing: Tensor) -> Tensor:
        """Conditioning input (B, 2C, H, W): ``[2·x − 1 where observed else 0, missing as 0/1]``.

        Values of ``x`` at missing pixels (NaN included) never reach it (``torch.where``).
        ``missing`` must already have ``x``'s shape.
        """
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.cat([torch.where(missing, zero, 2.0 * x - 1.0), missing.to(x.dtype)], dim=1)

    def _logit(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """v = logit(α + (1−2α)y) and log dv/dy, elementwise."""
        a = self.alpha
        # 1 − p computed from 1 − y (exact in floating point near y = 1), not as 1 − p: with
        # α = 1e-6 in float32 the latter would lose ~6% of 1 − p at white pixels.
        log_p = torch.log(a + (1.0 - 2.0 * a) * y)
        log_1mp = torch.log(a + (1.0 - 2.0 * a) * (1.0 - y))
        return log_p - log_1mp, math.log(1.0 - 2.0 * a) - log_p - log_1mp

    def _unlogit(self, v: Tensor) -> Tensor:
        return (torch.sigmoid(v) - self.alpha) / (1.0 - 2.0 * self.alpha)

    # ---------------------------------------------------------------- the flow proper

    def _flow(self, v: Tensor, missing: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """v (B,C,H,W) -> z (B,C,H,W) and log|det| (B,) over missing coordinates."""
        logdet = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        squeezes = 0
        for step in self.steps:
            if isinstance(step, _Squeeze):
                v, missing, context = squeeze2d(v), squeeze2d(missing), squeeze2d(context)
                squeezes += 1
            else:
                v, ld = step(v, missing, context)
                logdet = logdet + ld
        for _ in range(squeezes):
            v = unsqueeze2d(v)
        return v, logdet

    def _flow_inverse(self, z: Tensor, missing: Tensor, context: Tensor) -> Tensor:
        levels = [(missing, context)]
        for step in self.steps:
            if isinstance(step, _Squeeze):
                z = squeeze2d(z)
                levels.append((squeeze2d(levels[-1][0]), squeeze2d(levels[-1][1])))
        for step in reversed(self.steps):
            if isinstance(step, _Squeeze):
                z = unsqueeze2d(z)
                levels.pop()
            else:
                z = step.inverse(z, *levels[-1])
        return z

    def to_latent(self, x: Tensor, missing: Tensor) -> tuple[Tensor, Tensor]:
        """Map the missing values ``y = x[missing]`` (in [0, 1]) to the latent.

        Returns ``z`` (B, C, H, W), equal to ``x`` at observed pixels (untouched), and
        ``log|det ∂z_m/∂y_m|`` (B,) including the logit preprocessing, over missing pixels only.
        """
        x, missing = self._check(x, missing, values_at_missing=True)
        return self._to_latent(x, missing)

    def _to_latent(self, y: Tensor, missing: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if context is None:
            context = self.context(y, missing)
        # Preprocess missing pixels only; observed ones keep their value (never used by the flow).
        y_safe = torch.where(missing, y, torch.full((), 0.5, dtype=y.dtype, device=y.device))
        v, ld_pre = self._logit(y_safe)
        v = torch.where(missing, v, y)
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        ld_pre = torch.where(missing, ld_pre, zero).flatten(1).sum(1)
        z, ld_flow = self._flow(v, missing, context)
        return z, ld_pre + ld_flow

    def from_latent(self, z: Tensor, x: Tensor, missing: Tensor) -> Tensor:
        """Inverse of :meth:`to_latent`: missing pixels from ``z`` (B, C, H, W), observed ones from ``x``.

        The result is clamped to [0, 1] (the logit margin α lets the inverse leave [0, 1] slightly).
        """
        x, missing = self._check(x, missing, values_at_missing=False)
        if not isinstance(z, Tensor) or z.shape != x.shape:
            raise ValueError(f"z must be a tensor of x's shape {tuple(x.shape)}, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        return self._from_latent(z.to(x.dtype), x, missing)

    def _from_latent(self, z: Tensor, x: Tensor, missing: Tensor) -> Tensor:
        z = torch.where(missing, z, torch.zeros((), dtype=z.dtype, device=z.device))
        v = self._flow_inverse(z, missing, self.context(x, missing))
        y = self._unlogit(v).clamp(0.0, 1.0)
        return torch.where(missing, y, x)

    # ---------------------------------------------------------------- public API

    def log_prob(
        self,
        x: Tensor,
        missing: Tensor,
        *,
        dequantize: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``log p(y_m | x_o, m)`` (B,) in nats: continuous density of the dequantised missing values.

        Args:
            x: (B, C, H, W) in [0, 1]; its missing pixels are the values whose density is returned.
            missing: bool (B, 1, H, W) or (B, C, H, W), True = missing. An image with nothing
                missing gets log-probability 0.
            dequantize: evaluate at ``y = (255·x + u)/256`` with ``u ~ U[0, 1)`` at missing pixels
                (what training does; its mean over u bounds the 8-bit likelihood, see
                :func:`bits_per_dim`) instead of at ``y = x``.
            generator: randomness of ``u``.
        """
        x, missing = self._check(x, missing, values_at_missing=True)
        context = self.context(x, missing)  # conditioning on the clean observed values
        y = x
        if dequantize:
            u = _rand_like(x, generator)
            y = torch.where(missing, (255.0 * x + u) / 256.0, x)
        z, logdet = self._to_latent(y, missing, context)
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        z = torch.where(missing, z, zero)
        base = (-0.5 * z * z - 0.5 * _LOG_2PI) * missing.to(z.dtype)
        return base.flatten(1).sum(1) + logdet

    def forward(self, x: Tensor, missing: Tensor) -> Tensor:
        """Same as :meth:`log_prob` with ``y = x``."""
        return self.log_prob(x, missing)

    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        missing: Tensor,
        *,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Draw the missing pixels from ``p(· | x_o, m)``: (n_samples, B, C, H, W).

        Observed pixels equal ``x`` exactly; missing ones are continuous values in [0, 1]
        (clamped). ``x`` at missing pixels may hold anything, NaN included. ``temperature`` scales
        the base noise (z ~ N(0, T²I)); T < 1 gives smoother, more typical fills.
        """
        check_int(n_samples, "n_samples")
        if not isinstance(temperature, (int, float)) or not temperature >= 0.0:
            raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
        x, missing = self._check(x, missing, values_at_missing=False)
        x = torch.where(missing, torch.zeros((), dtype=x.dtype, device=x.device), x)
        out = []
        for _ in range(n_samples):  # one image batch at a time keeps memory at B images
            z = _randn_like(x, generator) * temperature
            out.append(self._from_latent(z, x, missing))
        return torch.stack(out)

    @torch.no_grad()
    def impute(
        self,
        x: Tensor,
        missing: Tensor,
        *,
        n_samples: int = 8,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Imputed images (B, C, H, W): the **mean of ``n_samples`` samples** at missing pixels
        (a Monte Carlo estimate of the conditional mean), ``x`` at observed pixels."""
        samples = self.sample(x, missing, n_samples=n_samples, generator=generator, temperature=temperature)
        x, missing = self._check(x, missing, values_at_missing=False)
        return torch.where(missing, samples.mean(0), x)


def _rand_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Draw on the generator's device (a CPU generator works for a CUDA model), then move.
    dev = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
