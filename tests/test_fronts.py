"""The missing-data fronts (labkit.models.fronts): shapes, NaN safety, hand-computed cases, equivalences."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labkit.mfa import MFA
from labkit.models.fronts import (FRONTS, ACFlowFront, AuthorsMisConvFront, GroundTruthFront, ImputationFront, KNNFront, MaskFront,
                                  MFAMeanFront, MisConvFront, PartialConvFront, ZeroFront, make_front)

pytestmark = pytest.mark.usefixtures("eager_misconv")  # see tests/conftest.py


ALL_CLASSES = sorted({cls for cls in FRONTS.values()}, key=lambda c: c.__name__)


def _batch(B=3, C=2, H=7, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g)
    missing = torch.rand(B, 1, H, W, generator=g) < 0.4
    missing[0] = False                      # one image complete
    missing[1, :, :3, :3] = True            # one with a full hole
    return x, missing, g


def _mfa(B, C, H, W, g, K=2, L=2):
    w = torch.softmax(torch.randn(B, K, generator=g), 1)
    return MFA(w, torch.rand(B, K, C, H, W, generator=g), 0.2 * torch.randn(B, K, L, C, H, W, generator=g),
               0.05 + 0.1 * torch.rand(B, K, C, H, W, generator=g))


def _aux(cls, x, missing, g):
    if cls.aux_kind == "images":
        return x.clone() if cls is GroundTruthFront else torch.rand(x.shape, generator=g)
    if cls.aux_kind == "mfa":
        return _mfa(*x.shape, g)
    return None


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_every_front_shape_and_finite_with_nan_at_missing(cls, stride, padding):
    if cls is AuthorsMisConvFront and (stride, padding) != (1, 1):
        with pytest.raises(ValueError, match="stride"):      # the authors' layer exists for stride 1, "same" only
            cls(2, 5, kernel_size=3, stride=stride, padding=padding)
        return
    torch.manual_seed(0)
    x, missing, g = _batch()
    aux = _aux(cls, x, missing, g)
    front = cls(2, 5, kernel_size=3, stride=stride, padding=padding)
    x_nan = torch.where(missing.expand_as(x), torch.tensor(float("nan")), x)
    out = front(x_nan, missing, aux)
    ref = F.conv2d(x, front.conv.weight[:, :2], None, stride, padding)
    assert out.shape == (3, 5, *ref.shape[-2:])
    assert torch.isfinite(out).all()
    if cls is AuthorsMisConvFront:
        # their halved sigma*phi term makes E[ReLU] slightly negative where mu << 0 (as in their code)
        assert (out >= -0.05).all()
    else:
        assert (out >= 0).all()  # a ReLU ends every front
    # the values at missing pixels do not matter at all: NaN, 0 and 1e6 give the same output
    for fill in (0.0, 1e6):
        x_other = torch.where(missing.expand_as(x), torch.tensor(fill), x)
        torch.testing.assert_close(front(x_other, missing, aux), out)
    # gradients reach the weights and stay finite despite the NaN
    out.sum().backward()
    assert torch.isfinite(front.conv.weight.grad).all() and front.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_per_channel_missing_mask_is_accepted(cls):
    x, _, g = _batch(C=3)
    missing = torch.rand(x.shape, generator=g) < 0.3
    out = cls(3, 4)(x, missing, _aux(cls, x, missing, g))
    assert out.shape == (3, 4, 7, 6) and torch.isfinite(out).all()


def test_zero_front_is_conv_relu_of_zero_filled():
    x, missing, _ = _batch()
    f = ZeroFront(2, 4)
    filled = x.masked_fill(missing.expand_as(x), 0.0)
    torch.testing.assert_close(f(x, missing), F.relu(f.conv(filled)))


def test_mask_front_hand_computed():
    # x = [[1, 2], [3, 4]] with the 2 missing; a 2x2 kernel without padding gives one output.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    missing = torch.tensor([[[[False, True], [False, False]]]])
    f = MaskFront(1, 2, kernel_size=2, padding=0)
    assert f.conv.in_channels == 2  # image channel + mask channel
    with torch.no_grad():
        f.conv.weight[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])      # on the zero-filled image
        f.conv.weight[0, 1] = torch.tensor([[10.0, 20.0], [30.0, 40.0]])  # on the mask (1 = missing)
        f.conv.weight[1] = -f.conv.weight[0]
        f.conv.bias[:] = torch.tensor([-1.0, 0.5])
    out = f(x, missing)
    # filter 0: 1*1 + 2*0 + 3*3 + 4*4 (image) + 20*1 (mask at the missing pixel) - 1 = 45
    # filter 1: the negation, -46 + 0.5 < 0 -> ReLU gives 0
    torch.testing.assert_close(out, torch.tensor([[[[45.0]], [[0.0]]]]))


def test_partial_convolution_hand_computed():
    # x = [[1, 2], [3, 4]] with the 2 missing, kernel [[1, 2], [3, 4]], bias 0.5, padding 1 -> 3x3 output.
    # Output (i, j) sees input rows i-1..i, cols j-1..j; kernel (r, c) meets input (i-1+r, j-1+c);
    # padding counts as unobserved; window size sum(1) = 4.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    missing = torch.tensor([[[[False, True], [False, False]]]])
    f = PartialConvFront(1, 1, kernel_size=2, padding=1)
    with torch.no_grad():
        f.conv.weight[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        f.conv.bias[:] = 0.5
    out = f(x, missing)[0, 0]
    expected = torch.tensor([
        # (0,0): only x00=1 under k11=4 -> 4*4/1+.5 ; (0,1): x00=1 under k10=3 (x01 missing) -> 3*4/1+.5 ;
        # (0,2): only the missing x01 -> empty window -> 0
        [16.5, 12.5, 0.0],
        # (1,0): x00 under k01=2, x10=3 under k11=4 -> (2+12)*4/2+.5 ; (1,1): 1*1+3*3+4*4=26 over 3 observed
        # -> 26*4/3+.5 ; (1,2): x11=4 under k10=3 (x01 missing) -> 12*4/1+.5
        [28.5, 26 * 4 / 3 + 0.5, 48.5],
        # (2,0): x10=3 under k01=2 -> 6*4+.5 ; (2,1): x10 under k00=1, x11 under k01=2 -> (3+8)*4/2+.5 ;
        # (2,2): x11=4 under k00=1 -> 16.5
        [24.5, 22.5, 16.5],
    ])
    torch.testing.assert_close(out, expected)
    # a negative bias shows the ReLU and that empty windows give 0, not relu(bias)
    with torch.no_grad():
        f.conv.bias[:] = 5.0
        f.conv.weight.zero_()
    assert f(x, missing)[0, 0, 0, 2] == 0.0 and f(x, missing)[0, 0, 0, 0] == 5.0


def test_partial_convolution_without_missing_is_plain_conv_inside():
    # No missing pixel: interior windows are full, so PC is the plain conv there.
    x, _, _ = _batch()
    none = torch.zeros(3, 1, 7, 6, dtype=torch.bool)
    f = PartialConvFront(2, 4)
    torch.testing.assert_close(f(x, none)[..., 1:-1, 1:-1], F.relu(f.conv(x))[..., 1:-1, 1:-1])


@pytest.mark.parametrize("cls", [ImputationFront, KNNFront, MFAMeanFront, ACFlowFront])
def test_imputation_fronts_use_aux_only_at_missing_pixels(cls):
    x, missing, g = _batch()
    aux = torch.rand(x.shape, generator=g)
    f = cls(2, 4)
    out = f(x, missing, aux)
    torch.testing.assert_close(out, F.relu(f.conv(torch.where(missing.expand_as(x), aux, x))))
    # changing aux at observed pixels changes nothing
    aux2 = torch.where(missing.expand_as(x), aux, torch.full_like(aux, 7.0))
    torch.testing.assert_close(f(x, missing, aux2), out)


def test_ground_truth_front_uses_the_complete_images():
    x, missing, _ = _batch()
    f = GroundTruthFront(2, 4)
    x_nan = x.masked_fill(missing.expand_as(x), float("nan"))
    torch.testing.assert_close(f(x_nan, missing, x), F.relu(f.conv(x)))


def test_misconv_front_equals_conv_relu_when_nothing_is_missing():
    x, _, g = _batch()
    none = torch.zeros(3, 1, 7, 6, dtype=torch.bool)
    f = MisConvFront(2, 4)
    ref = F.relu(F.conv2d(x, f.conv.weight, f.conv.bias, padding=1))
    torch.testing.assert_close(f(x, none, _mfa(3, 2, 7, 6, g)), ref)
    torch.testing.assert_close(f(x, none), ref)
    # with missing pixels and zero variance it is conv+ReLU of the mean-filled image
    _, missing, _ = _batch()
    m = _mfa(3, 2, 7, 6, g, K=1, L=1)
    m = MFA(m.weights, m.means, torch.zeros_like(m.factors), torch.full_like(m.variances, 1e-12))
    filled = torch.where(missing.expand_as(x), m.means[:, 0], x)
    torch.testing.assert_close(f(x, missing, m), F.relu(F.conv2d(filled, f.conv.weight, f.conv.bias, padding=1)),
                               atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_naming_the_argument():
    x, missing, g = _batch()
    f = ZeroFront(2, 4)
    with pytest.raises(TypeError, match="missing must be a bool"):
        f(x, missing.to(torch.uint8))
    with pytest.raises(ValueError, match=r"missing must have shape \(3, 1, 7, 6\)"):
        f(x, missing[:, :, :5])
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, H, W\)"):
        f(x[:, :1], missing)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        f((x * 255).to(torch.uint8), missing)
    with pytest.raises(ValueError, match="needs aux"):
        KNNFront(2, 4)(x, missing)
    with pytest.raises(ValueError, match=r"aux \(imputed images\) must have the shape"):
        KNNFront(2, 4)(x, missing, x[:, :1])
    with pytest.raises(ValueError, match="MisConvFront needs aux"):
        MisConvFront(2, 4)(x, missing)
    with pytest.raises(TypeError, match="aux must be a labkit.mfa.MFA"):
        MisConvFront(2, 4)(x, missing, x)
    with pytest.raises(ValueError, match="complete images\\) contains NaN"):
        GroundTruthFront(2, 4)(x, missing, x.masked_fill(missing.expand_as(x), float("nan")))
    with pytest.raises(ValueError, match="unknown front 'nope'"):
        make_front("nope", 1, 2)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        ZeroFront(1, 0)


def test_registry_builds_every_method():
    for name, cls in FRONTS.items():
        f = make_front(name, 1, 3)
        assert type(f) is cls and f.out_channels == 3
