r"""Mixtures of factor analyzers (MFA) over images: the density of missing pixels MisConv integrates over.

Papers: M. Przewięźlikowski, M. Śmieja, Ł. Struski, *Estimating conditional density of missing
values using deep Gaussian mixture model*, ICONIP 2020, https://arxiv.org/abs/2010.02183 (the DMFA:
a network that predicts, per image, an MFA of its missing pixels; :mod:`labkit.models.dmfa`), used by
*MisConv: Convolutional Neural Networks for Missing Data*, https://arxiv.org/abs/2110.14010
(:mod:`labkit.misconv`). The model itself is Ghahramani & Hinton's mixture of factor analyzers
(1996); its training by EM is :func:`fit_mfa`.

An MFA with K components and L factors per component is the density

    p(x) = Σ_k p_k · N(x; m_k, A_k A_kᵀ + diag(d_k))

over flattened images x ∈ R^N (N = C·H·W). ``A_k`` holds L factor vectors, each shaped like the
image; ``d_k > 0`` are per-pixel noise variances. Its log-density is a log-sum-exp over
components, ``log p(x) = logsumexp_k(log p_k + log N_k(x))`` (not the weighted sum of the
components' log-densities). A batch of MFAs (one per image, as a DMFA predicts them) is stored
with shapes

    weights   (B, K)
    means     (B, K, C, H, W)
    factors   (B, K, L, C, H, W)
    variances (B, K, C, H, W)

Everything here works on a *subset* S of the coordinates (a bool mask per sample) without ever
forming an |S|×|S| matrix. With r = x_S − m_S, D = diag(d_S) and the small L×L matrix
M = I + A_Sᵀ D⁻¹ A_S (Cholesky-factorised):

    rᵀ Σ⁻¹ r = rᵀ D⁻¹ r − uᵀ M⁻¹ u,   u = A_Sᵀ D⁻¹ r      (Woodbury identity:
               Σ⁻¹ = (D + A Aᵀ)⁻¹ = D⁻¹ − D⁻¹ A M⁻¹ Aᵀ D⁻¹)
    log|Σ|   = log|M| + Σ_S log d                          (matrix determinant lemma:
               |D + A Aᵀ| = |I + Aᵀ D⁻¹ A|·|D|)

so the cost is O(|S|·L²) time and O(|S|·L) memory. Coordinates outside S are neutralised by
masking (zero residual, zero factor rows, unit variance), never by gathering/padding.

:class:`ClassicalMFA` is the non-deep baseline: one MFA for the whole data set, fitted by EM
(Ghahramani & Hinton, 1996) and conditioned on each image's observed pixels with
:meth:`ClassicalMFA.condition`, which returns the exact conditional MFA of the missing pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from labkit.device import resolve_device

_LOG_2PI = math.log(2.0 * math.pi)

__all__ = ["MFA", "ClassicalMFA", "fit_mfa"]


def _check_finite_at(x: Tensor, where: Tensor, name: str) -> None:
    """Values at selected coordinates must be finite: NaN or inf there would make every density NaN."""
    bad = where & ~torch.isfinite(x)
    if bool(bad.any()):
        b = int(bad.flatten(1).any(1).nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) at coordinates it must use "
                         f"(first in sample {b}); NaN/inf are allowed only where the coordinate is not used")


def _where_mask(where: Tensor, batch: int, image_shape: tuple[int, int, int], name: str = "where") -> Tensor:
    """Validate a bool coordinate mask (B,1,H,W) or (B,C,H,W) and expand it to (B,C,H,W)."""
    if not isinstance(where, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(where).__name__}")
    if where.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = coordinate selected), got {where.dtype}")
    C, H, W = image_shape
    if where.dim() != 4 or where.shape[0] != batch or where.shape[2:] != (H, W) or where.shape[1] not in (1, C):
        raise ValueError(
            f"{name} must have shape ({batch}, 1, {H}, {W}) or ({batch}, {C}, {H}, {W}), got {tuple(where.shape)}"
        )
    return where.expand(batch, C, H, W)


@dataclass(eq=False)
class MFA:
    """A batch of mixtures of factor analyzers, one per image.

    Args:
        weights: ``(B, K)`` mixing weights, ≥ 0, each row summing to 1.
        means: ``(B, K, C, H, W)``.
        factors: ``(B, K, L, C, H, W)``; ``L`` may be 0.
        variances: ``(B, K, C, H, W)``, strictly positive.
        validate: check shapes and values on construction (default True). Training loops that
            build MFAs from a network's softmax/softplus outputs may switch it off.
        log_weights: optional ``(B, K)`` natural log of ``weights``, kept exactly. A posterior
            responsibility can be far below the smallest float32 (about 1e-45, e^-103) and
            still decide a log-density: a component whose observed-pixel likelihood is e^-200
            below the best one may explain the hidden pixels e^1000 better. ``weights`` then
            underflows to 0, ``log_weights`` does not, and :meth:`log_prob` uses it. Made by
            :meth:`from_log_weights` (and by :meth:`ClassicalMFA.condition`); when absent it
            is ``log(weights)``.

    Raises:
        ValueError: naming the field and the shapes when they disagree, when a variance is not
            > 0, or when weights are negative or do not sum to 1 (relative tolerance 1e-4 in
            float32, 1e-8 in float64); also for non-finite values.
    """

    weights: Tensor
    means: Tensor
    factors: Tensor
    variances: Tensor
    validate: bool = True
    log_weights: Tensor | None = None

    def __post_init__(self) -> None:
        if self.validate:
            self.check()

    @classmethod
    def from_log_weights(cls, log_weights: Tensor, means: Tensor, factors: Tensor, variances: Tensor,
                         validate: bool = True) -> "MFA":
        """An MFA given its mixing weights in log space, ``(B, K)``; ``weights = exp(log_weights)``."""
        return cls(torch.exp(log_weights), means, factors, variances, validate=validate, log_weights=log_weights)

    def log_mixture_weights(self) -> Tensor:
        """``(B, K)`` log mixing weights: ``log_weights`` when kept, else ``log(weights)``."""
        return self.log_weights if self.log_weights is not None else torch.log(self.weights)

    def _fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        return self.weights, self.means, self.factors, self.variances, self.log_weights

    @staticmethod
    def _rebuild(fn, fields) -> "MFA":
        w, m, a, d, lw = fields
        return MFA(fn(w), fn(m), fn(a), fn(d), validate=False, log_weights=None if lw is None else fn(lw))

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise TypeError or ValueError unless the fields are float tensors of one MFA's shapes
        (run on construction unless ``validate=False``)."""
        fields = {"weights": self.weights, "means": self.means, "factors": self.factors, "variances": self.variances}
        for name, t in fields.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"MFA {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"MFA {name} must be a floating-point tensor, got {t.dtype}")
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in fields.items())
        if self.weights.dim() != 2:
            raise ValueError(f"MFA weights must have shape (B, K); got {shapes}")
        B, K = self.weights.shape
        if self.means.dim() != 5 or self.means.shape[:2] != (B, K):
            raise ValueError(f"MFA means must have shape (B, K, C, H, W) = ({B}, {K}, C, H, W); got {shapes}")
        img = tuple(self.means.shape[2:])
        if self.variances.shape != self.means.shape:
            raise ValueError(f"MFA variances must have the shape of means {tuple(self.means.shape)}; got {shapes}")
        if self.factors.dim() != 6 or self.factors.shape[:2] != (B, K) or tuple(self.factors.shape[3:]) != img:
            raise ValueError(f"MFA factors must have shape (B, K, L, C, H, W) = ({B}, {K}, L, {img[0]}, {img[1]}, {img[2]}); got {shapes}")
        dtypes = {t.dtype for t in fields.values()}
        if len(dtypes) != 1:
            raise TypeError("MFA fields must share one dtype, got " + ", ".join(f"{n}={t.dtype}" for n, t in fields.items()))
        devices = {t.device for t in fields.values()}
        if len(devices) != 1:
            raise ValueError(f"MFA fields must live on one device, got {sorted(map(str, devices))}")
        for name, t in fields.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"MFA {name} contains NaN or infinite values")
        if not bool((self.variances > 0).all()):
            raise ValueError(f"MFA variances must be > 0; smallest is {self.variances.min().item():.3g}")
        if not bool((self.weights >= 0).all()):
            raise ValueError(f"MFA weights must be >= 0; smallest is {self.weights.min().item():.3g}")
        if self.log_weights is not None:
            lw = self.log_weights
            if not isinstance(lw, Tensor) or lw.shape != self.weights.shape or lw.dtype != self.weights.dtype:
                raise ValueError(f"MFA log_weights must be a {self.weights.dtype} tensor of shape "
                                 f"{tuple(self.weights.shape)} like weights, got {getattr(lw, 'shape', type(lw))}")
            if bool(torch.isnan(lw).any()) or bool((lw == float("inf")).any()):
                raise ValueError("MFA log_weights contains NaN or +inf")
            if not bool((torch.logsumexp(lw, dim=1).abs() <= (1e-8 if lw.dtype == torch.float64 else 1e-4) * K).all()):
                raise ValueError("MFA log_weights must satisfy logsumexp over K = 0 for every sample")
            # weights is derived from log_weights (from_log_weights); two disagreeing copies would make
            # log_prob and the mixture mean describe different mixtures
            if not torch.allclose(torch.exp(lw), self.weights, rtol=1e-5, atol=1e-12):
                raise ValueError("MFA weights must equal exp(log_weights); build it with MFA.from_log_weights")
        tol = 1e-8 if self.weights.dtype == torch.float64 else 1e-4
        sums = self.weights.sum(dim=1)
        if not bool(((sums - 1).abs() <= tol * K).all()):
            worst = sums[(sums - 1).abs().argmax()].item()
            raise ValueError(f"MFA weights must sum to 1 over K for every sample; a row sums to {worst:.6g}")

    # ------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return self.weights.shape[0]

    @property
    def n_components(self) -> int:
        return self.weights.shape[1]

    @property
    def n_factors(self) -> int:
        return self.factors.shape[2]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``"""
        return tuple(self.means.shape[2:])  # type: ignore[return-value]

    def to(self, *args, **kwargs) -> "MFA":
        return self._rebuild(lambda t: t.to(*args, **kwargs), self._fields())

    def detach(self) -> "MFA":
        return self._rebuild(Tensor.detach, self._fields())

    def __getitem__(self, index) -> "MFA":
        """Select samples of the batch (an index, a slice, or an index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._rebuild(lambda t: t[index], self._fields())

    @staticmethod
    def cat(parts: "list[MFA]") -> "MFA":
        """Concatenate MFAs along the batch (``log_weights`` kept when every part has them)."""
        if not parts:
            raise ValueError("MFA.cat needs at least one MFA")
        keep_log = all(p.log_weights is not None for p in parts)
        w, m, a, d = (torch.cat([getattr(p, f) for p in parts]) for f in ("weights", "means", "factors", "variances"))
        lw = torch.cat([p.log_weights for p in parts]) if keep_log else None
        return MFA(w, m, a, d, validate=False, log_weights=lw)

    # ------------------------------------------------------------------ densities
    def _factorise(self, where: Tensor):
        """Shared part of log-density and conditioning on the coordinate set ``where`` (B,C,H,W bool).

        Returns per component (flattened N = C·H·W):
            w      (B, 1, N)        1.0 inside S, 0.0 outside
            inv_d  (B, K, N)        1/d inside S, 0 outside
            A      (B, K, L, N)     factors with rows outside S zeroed
            chol   (B, K, L, L)     Cholesky factor of M = I + A_Sᵀ D⁻¹ A_S
            logdet (B, K)           log|Σ_S| = log|M| + Σ_S log d, float64
        """
        B, K = self.weights.shape
        L = self.n_factors
        w = where.reshape(B, 1, -1).to(self.means.dtype)
        d = self.variances.reshape(B, K, -1)
        inv_d = w / d
        A = self.factors.reshape(B, K, L, w.shape[-1]) * w.unsqueeze(1)   # explicit N: L may be 0
        # M = I + A D^{-1} A^T (L x L): the only matrix ever factorised.
        M = torch.einsum("bkln,bkn,bkmn->bklm", A, inv_d, A)
        M = M + torch.eye(L, dtype=M.dtype, device=M.device)
        chol = torch.linalg.cholesky(M)
        # Summed in float64: Σ_S log d runs over thousands of pixels (about −9,500 nats for CIFAR-10).
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1, dtype=torch.float64)
        logdet = logdet + (torch.log(d) * w).sum(-1, dtype=torch.float64)
        return w, inv_d, A, chol, logdet

    def component_log_prob(self, x: Tensor, where: Tensor) -> Tensor:
        """Per-component log-density of the coordinates of ``x`` selected by ``where``.

        Args:
            x: ``(B, C, H, W)``; values outside ``where`` are ignored (NaN allowed there), values
                inside must be finite.
            where: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``; True = coordinate in S. S may differ
                per sample; an empty S gives log-density 0.

        Returns:
            ``(B, K)`` tensor of ``log N(x_S; m_kS, Σ_kS)``, in the MFA's dtype.
        """
        return self._component_log_prob(x, where).to(self.means.dtype)

    def _component_log_prob(self, x: Tensor, where: Tensor) -> Tensor:
        """:meth:`component_log_prob` with its sums kept in float64 (for conditioning), ``(B, K)``.

        The Mahalanobis term is computed without cancellation. The textbook Woodbury form
        ``rᵀD⁻¹r − uᵀM⁻¹u`` subtracts two large numbers (for the lab's CIFAR-10 MFA, 8,800 − 6,700
        nats per component, with M's condition number in the thousands), and in float32 it was off
        by up to 0.03 nats per component, enough to move the responsibilities. The same quantity is

            rᵀ Σ⁻¹ r = min_z  (r − A z)ᵀ D⁻¹ (r − A z) + zᵀ z,     z* = M⁻¹ u,

        a sum of two non-negative terms; an error δ in the solved z changes it by δᵀMδ only (second
        order), and each sum is accumulated in float64.
        """
        return self._posterior(x, where)[0]

    def _posterior(self, x: Tensor, where: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log N_k(x_S) (B, K) float64, z = M⁻¹Aᵀ D⁻¹ r (B, K, L), chol (B, K, L, L))``."""
        B = self.batch_size
        x = self._check_x(x)
        where = _where_mask(where, B, self.image_shape)
        _check_finite_at(x, where, "x")
        w, inv_d, A, chol, logdet = self._factorise(where)
        K = self.n_components
        # torch.where rather than multiplication: NaN * 0 would still be NaN.
        xs = torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device))
        r = (xs.reshape(B, 1, -1) - self.means.reshape(B, K, -1)) * w          # (B, K, N), 0 outside S
        u = torch.einsum("bkln,bkn->bkl", A, r * inv_d)                         # Aᵀ D⁻¹ r
        z = torch.cholesky_solve(u.unsqueeze(-1), chol).squeeze(-1)             # M⁻¹ u, (B, K, L)
        e = r - torch.einsum("bkl,bkln->bkn", z, A)                             # r − A z, 0 outside S
        acc = torch.float64
        maha = (e * e * inv_d).sum(-1, dtype=acc) + (z * z).sum(-1, dtype=acc)
        n = w.sum(-1, dtype=acc)                                                # |S|, (B, 1)
        return -0.5 * (maha + logdet + n * _LOG_2PI), z, chol

    def log_prob(self, x: Tensor, where: Tensor) -> Tensor:
        """Log-density of ``x`` on the coordinates ``where``, marginalising the rest.

        Args:
            x: ``(B, C, H, W)``; values outside ``where`` are ignored (NaN allowed there).
            where: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``.

        Returns:
            ``(B,)``: ``logsumexp_k(log p_k + log N_k(x_S))``. Time O(|S|·L²), memory O(|S|·L).
        """
        comp = self._component_log_prob(x, where)
        return torch.logsumexp(self.log_mixture_weights().to(comp.dtype) + comp, dim=1).to(self.means.dtype)

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        want = (self.batch_size, *self.image_shape)
        if tuple(x.shape) != want:
            raise ValueError(f"x must have shape {want} to match the MFA, got {tuple(x.shape)}")
        return x.to(self.means.dtype)

    # ------------------------------------------------------------------ summaries and samples
    def mean(self) -> Tensor:
        """Mixture mean ``Σ_k p_k m_k``, shape ``(B, C, H, W)``."""
        return torch.einsum("bk,bkchw->bchw", self.weights, self.means)

    def variance(self) -> Tensor:
        """Per-pixel marginal variance of the mixture, ``(B, C, H, W)``.

        Var = Σ_k p_k (d_k + Σ_j a_kj² + m_k²) − (Σ_k p_k m_k)².
        """
        second = self.variances + (self.factors ** 2).sum(2) + self.means ** 2
        mean = self.mean()
        return (torch.einsum("bk,bkchw->bchw", self.weights, second) - mean ** 2).clamp_min(0)

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """Draw samples.

        Args:
            generator: a ``torch.Generator`` on the MFA's device, for reproducibility.
            n: number of samples per MFA; ``None`` gives one sample, shape ``(B, C, H, W)``.

        Returns:
            ``(B, C, H, W)`` if ``n`` is None else ``(n, B, C, H, W)``.
        """
        reps = 1 if n is None else int(n)
        if reps < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        B, K = self.weights.shape
        L = self.n_factors
        dev, dt = self.means.device, self.means.dtype
        comp = torch.multinomial(self.weights, reps, replacement=True, generator=generator).T  # (reps, B)
        idx = torch.arange(B, device=dev)
        m = self.means[idx, comp]                      # (reps, B, C, H, W)
        A = self.factors[idx, comp]                    # (reps, B, L, C, H, W)
        d = self.variances[idx, comp]
        z = torch.randn((reps, B, L), generator=generator, device=dev, dtype=dt)
        eps = torch.randn(m.shape, generator=generator, device=dev, dtype=dt)
        out = m + torch.einsum("rbl,rblchw->rbchw", z, A) + eps * d.sqrt()
        return out[0] if n is None else out


# ====================================================================== classical MFA
class ClassicalMFA(torch.nn.Module):
    """One MFA for a whole data set (the classical-MFA baseline).

    Parameters (buffers), for images ``(C, H, W)``:
        weights (K,), means (K, C, H, W), factors (K, L, C, H, W), variances (K, C, H, W).

    Fit it with :func:`fit_mfa`; use :meth:`condition` to get, for a batch of incomplete images,
    the exact conditional MFA of their missing pixels (usable by MisConv2d).
    """

    def __init__(self, weights: Tensor, means: Tensor, factors: Tensor, variances: Tensor):
        super().__init__()
        MFA(weights[None], means[None], factors[None], variances[None])  # validates shapes/values
        self.register_buffer("weights", weights)
        self.register_buffer("means", means)
        self.register_buffer("factors", factors)
        self.register_buffer("variances", variances)

    @classmethod
    def empty(cls, n_components: int, n_factors: int, image_shape: tuple[int, int, int], dtype=torch.float32) -> "ClassicalMFA":
        """A placeholder of the right shapes, e.g. to ``load_state_dict`` into."""
        K, L = n_components, n_factors
        return cls(
            torch.full((K,), 1.0 / K, dtype=dtype),
            torch.zeros((K, *image_shape), dtype=dtype),
            torch.zeros((K, L, *image_shape), dtype=dtype),
            torch.ones((K, *image_shape), dtype=dtype),
        )

    def as_mfa(self, batch_size: int = 1) -> MFA:
        """The same mixture for every one of ``batch_size`` images (expanded views, no copies)."""
        B = batch_size
        return MFA(
            self.weights.expand(B, -1),
            self.means.expand(B, *self.means.shape),
            self.factors.expand(B, *self.factors.shape),
            self.variances.expand(B, *self.variances.shape),
            validate=False,
        )

    def log_prob(self, x: Tensor, where: Tensor | None = None) -> Tensor:
        """``(B,)`` log-density of images ``x (B,C,H,W)`` on ``where`` (default: every pixel)."""
        if where is None:
            where = torch.ones((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
        return self.as_mfa(x.shape[0]).log_prob(x, where)

    def condition(self, x: Tensor, observed: Tensor) -> MFA:
        """Exact conditional MFA of the unobserved pixels given the observed ones.

        For component k with observed coordinates o (per sample):
            M_k = I + A_koᵀ D_ko⁻¹ A_ko,     z_k = M_k⁻¹ A_koᵀ D_ko⁻¹ (x_o − m_ko)
            mean    m_k + A_k z_k,            factors A_k M_k^{-1/2} (= A_k L_k⁻ᵀ, M_k = L_k L_kᵀ)
            variances d_k,                    weights ∝ p_k N(x_o; m_ko, A_ko A_koᵀ + D_ko)

        Args:
            x: ``(B, C, H, W)``; values at unobserved pixels ignored (NaN allowed).
            observed: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``, True = observed.

        Returns:
            An :class:`MFA` with batch B. At missing coordinates it is the conditional
            distribution; at observed coordinates its means equal ``x``, its factors are 0 and its
            variances are the model's (those coordinates are known and should be ignored).
        """
        B = x.shape[0]
        full = self.as_mfa(B)
        x = full._check_x(x)
        obs = _where_mask(observed, B, full.image_shape, name="observed")
        comp_lp, z, chol = full._posterior(x, obs)             # log N_k(x_o) (float64 sums), M⁻¹u, chol(M)
        K, L = full.n_components, full.n_factors
        xs = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))
        A_full = full.factors.reshape(B, K, L, xs[0].numel())
        cmean = full.means.reshape(B, K, -1) + torch.einsum("bkl,bkln->bkn", z, A_full)
        # A L^{-T}: solve L Yᵀ = Aᵀ... i.e. Y = A L⁻ᵀ  <=>  Yᵀ = L⁻¹ A (rows are factors).
        cfac = torch.linalg.solve_triangular(chol, A_full, upper=False)              # (B,K,L,N) = L⁻¹ A
        keep = (~obs).reshape(B, 1, -1).to(x.dtype)
        cfac = cfac * keep.unsqueeze(1)
        cmean = torch.where(obs.reshape(B, 1, -1).expand_as(cmean), xs.reshape(B, 1, -1).expand_as(cmean), cmean)
        # Responsibilities in log space: for a sharp mixture most of them are below float32's
        # smallest number, and the hidden pixels' log-density needs them anyway (see MFA.log_weights).
        clog = torch.log_softmax(torch.log(self.weights).to(comp_lp.dtype)[None] + comp_lp, dim=1).to(x.dtype)
        C, H, W = full.image_shape
        return MFA.from_log_weights(
            clog,
            cmean.reshape(B, K, C, H, W),
            cfac.reshape(B, K, L, C, H, W),
            full.variances.contiguous(),
            validate=False,
        )


def fit_mfa(
    images: Tensor,
    n_components: int,
    n_factors: int,
    *,
    iterations: int = 30,
    min_variance: float = 1e-3,
    seed: int = 0,
    chunk_size: int = 2048,
    device: str | torch.device | None = None,
    progress: bool = True,
    tol: float = 1e-4,
) -> tuple[ClassicalMFA, list[float]]:
    """Fit a :class:`ClassicalMFA` to complete images by EM (Ghahramani & Hinton, 1996).

    The M-step updates means and factors jointly (augmented factor matrix [A m]) and floors the
    variances at ``min_variance`` (constant border pixels of MNIST would otherwise collapse to 0).
    Initialisation: means at K random images (seeded), factors from the top principal directions
    of the data scaled small, variances = per-pixel data variance.

    Args:
        images: ``(N, C, H, W)`` complete images in [0, 1].
        n_components: K ≥ 1. n_factors: L ≥ 0.
        iterations: EM iterations (stops early when the mean log-likelihood gains < ``tol`` nats/pixel).
        chunk_size: images per chunk in the E-step (bounds memory to O(chunk·K·(N+L²))).

    Returns:
        (model, history of the mean log-likelihood per image after each iteration).
    """

    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if n_components < 1 or n_factors < 0:
        raise ValueError(f"need n_components >= 1 and n_factors >= 0, got K={n_components}, L={n_factors}")
    N = images.shape[0]
    if N < n_components:
        raise ValueError(f"need at least K={n_components} images to fit, got {N}")
    dev = resolve_device(device) if device is not None else images.device
    X = images.reshape(N, -1).to(dev, torch.float64)
    D = X.shape[1]
    K, L = n_components, n_factors
    gen = torch.Generator(device="cpu").manual_seed(seed)

    # --- initialisation
    means = X[torch.randperm(N, generator=gen)[:K].to(dev)].clone()            # (K, D)
    var = X.var(0).clamp_min(min_variance)
    if L > 0:
        centred = X[torch.randperm(N, generator=gen)[: min(N, 2000)].to(dev)]
        centred = centred - centred.mean(0)
        _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
        base = (Vh[:L] * (S[:L, None] / math.sqrt(centred.shape[0]))) * 0.5        # (L, D)
        noise = 0.01 * torch.randn((K, L, D), generator=gen, dtype=torch.float64).to(dev)
        factors = base[None] + noise
    else:
        factors = torch.zeros((K, 0, D), dtype=torch.float64, device=dev)
    variances = var[None].repeat(K, 1)
    weights = torch.full((K,), 1.0 / K, dtype=torch.float64, device=dev)

    history: list[float] = []
    try:
        from tqdm.auto import tqdm
        bar = tqdm(range(iterations), desc=f"EM K={K} L={L}", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = range(iterations)
    eye = torch.eye(L, dtype=torch.float64, device=dev)
    for it in bar:
        inv_d = 1.0 / variances                                                   # (K, D)
        Ad = factors * inv_d[:, None, :]                                          # (K, L, D)
        M = eye + torch.einsum("kld,kmd->klm", Ad, factors)
        chol = torch.linalg.cholesky(M)
        Minv = torch.cholesky_inverse(chol)                                       # (K, L, L)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) + torch.log(variances).sum(-1)
        # sufficient statistics
        s0 = torch.zeros(K, dtype=torch.float64, device=dev)
        sxz = torch.zeros((K, D, L + 1), dtype=torch.float64, device=dev)         # Σ γ x z̃ᵀ
        szz = torch.zeros((K, L + 1, L + 1), dtype=torch.float64, device=dev)     # Σ γ E[z̃ z̃ᵀ]
        sxx = torch.zeros((K, D), dtype=torch.float64, device=dev)                # Σ γ x²
        total_ll = 0.0
        for start in range(0, N, chunk_size):
            xb = X[start:start + chunk_size]                                      # (n, D)
            # Mahalanobis via expansions so no (n, K, D) tensor is formed.
            quad = (xb * xb) @ inv_d.T - 2 * xb @ (means * inv_d).T + (means * means * inv_d).sum(-1)   # (n,K)
            u = torch.einsum("nd,kld->nkl", xb, Ad) - torch.einsum("kd,kld->kl", means, Ad)[None]      # (n,K,L)
            Ez = torch.einsum("klm,nkm->nkl", Minv, u)                                                   # (n,K,L)
            maha = quad - (u * Ez).sum(-1)
            lp = -0.5 * (maha + logdet + D * _LOG_2PI) + torch.log(weights)
            ll = torch.logsumexp(lp, dim=1)
            total_ll += ll.sum().item()
            g = torch.exp(lp - ll[:, None])                                       # (n, K) responsibilities
            Ezt = torch.cat([Ez, torch.ones_like(Ez[..., :1])], dim=-1)          # (n, K, L+1)
            s0 += g.sum(0)
            sxz += torch.einsum("nk,nd,nkl->kdl", g, xb, Ezt)
            Ezz = torch.einsum("nkl,nkm->nklm", Ezt, Ezt)
            Ezz[..., :L, :L] += Minv[None]
            szz += torch.einsum("nk,nklm->klm", g, Ezz)
            sxx += g.T @ (xb * xb)
        history.append(total_ll / N)
        # M-step: Ã = Σγ x z̃ᵀ (Σγ E[z̃z̃ᵀ])⁻¹ ; d = (Σγ x² − Σ_l Ã_l ⊙ Σγ x z̃_l) / Σγ
        s0c = s0.clamp_min(1e-8)
        Atil = torch.linalg.solve(szz + 1e-8 * torch.eye(L + 1, dtype=torch.float64, device=dev), sxz.transpose(1, 2)).transpose(1, 2)
        factors = Atil[..., :L].transpose(1, 2).contiguous()                     # (K, L, D)
        means = Atil[..., L].contiguous()
        variances = ((sxx - (Atil * sxz).sum(-1)) / s0c[:, None]).clamp_min(min_variance)
        weights = s0c / s0c.sum()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loglik=f"{history[-1]:.1f}")
        if it > 0 and abs(history[-1] - history[-2]) < tol * D:
            break
    shape = images.shape[1:]
    dt = images.dtype if images.is_floating_point() else torch.float32
    model = ClassicalMFA(
        weights.to(dt), means.reshape(K, *shape).to(dt), factors.reshape(K, L, *shape).to(dt),
        variances.reshape(K, *shape).to(dt),
    )
    return model, history
