"""Variant identity: every preset proves the defining properties of its axes.

Each property is read off the operator's effective weights w[n, g, i, j]
(`SpatialMixer.effective_weights`, computed from the operator's own aggregation) and, where it is a
statement about the output, off the forward pass. Each test is parametrized over every preset the
property applies to, so a preset whose axes are wired wrong (the official DWNet's "dynamic" model
that built a static convolution) fails here.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ablate.ops.mixer import SpatialMixer
from ablate.space.presets import PRESETS
from ablate.space.rules import validate
from ablate.space.spec import Connectivity, Dynamic, OperatorSpec, Sharing

DIM = 64          # 2 groups of 32 for the attention presets, 32 groups of 2 for I-D-DWNet
RES = (14, 14)    # two 7x7 windows per side: window borders and Swin's shift mask both matter
SOME_POSITIONS = [(0, 0), (3, 4), (6, 6), (7, 7), (6, 7), (10, 2), (13, 13), (11, 12)]
ALL_POSITIONS = list(itertools.product(range(RES[0]), range(RES[1])))


def _spec(name):
    return PRESETS[name].spec


def _presets(predicate):
    names = [name for name, p in PRESETS.items() if predicate(p.spec)]
    assert names, "no preset has this property: the test would check nothing"
    return names


def _cases(predicate):
    """(preset, shifted) pairs: window presets with shift are checked shifted and unshifted."""
    cases = []
    for name in _presets(predicate):
        for shifted in ((False, True) if _spec(name).connectivity.shift else (False,)):
            cases.append(pytest.param(name, shifted, id=f"{name}-{'shifted' if shifted else 'plain'}"))
    return cases


def build(spec: OperatorSpec, dim=DIM, res=RES, shifted=False, seed=0) -> SpatialMixer:
    """The mixer in eval mode (BatchNorm in predictors), its weights moved away from init."""
    torch.manual_seed(seed)
    (cpg,) = validate(spec, [dim], [tuple(res)])
    mixer = SpatialMixer(spec, dim, res, cpg, shifted=shifted).eval()
    with torch.no_grad():  # every weight generic: no accidental zeros, no near-uniform softmax
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mixer


def _bias(mixer: SpatialMixer):
    return 0 if mixer.bias is None else mixer.bias.view(1, -1, 1, 1)


def grid_maps(w: torch.Tensor) -> torch.Tensor:
    """(N, G, P, H, W) with P = all positions -> (N, G, Hi, Wi, Hj, Wj)."""
    n, g, _, h, wd = w.shape
    return w.reshape(n, g, h, wd, h, wd)


def window_support(res, k, shift, regions=True):
    """(Hi, Wi, Hj, Wj) bool: i sees j, written from Swin's definition independently of the code.

    The map is zero-padded to whole windows, rolled by -shift and cut into k x k windows; with a
    shift, the rolled map is split into regions by the row slices (0, -k), (-k, -shift), (-shift,
    None) (and the same for columns), and a position sees only its own region inside its window
    (Swin's attention mask). Padding before the roll is the official Swin's order for maps that
    windows do not tile (its detection code); the mask's regions are drawn on the padded map.
    """
    h, w = res
    hp, wp = -(-h // k) * k, -(-w // k) * k
    r = (torch.arange(h) - shift) % hp  # the row of each original position in the rolled map
    c = (torch.arange(w) - shift) % wp

    def region(t, size):
        if not (shift and regions):
            return torch.zeros_like(t)
        return (t >= size - k).long() + (t >= size - shift).long()

    row_key = (r // k) * 3 + region(r, hp)
    col_key = (c // k) * 3 + region(c, wp)
    same_row = row_key[:, None] == row_key[None, :]
    same_col = col_key[:, None] == col_key[None, :]
    return same_row[:, None, :, None] & same_col[None, :, None, :]


def sliding_support(res, k):
    """(Hi, Wi, Hj, Wj) bool: j lies in the k x k neighbourhood of i (and on the map)."""
    h, w = res
    dr = (torch.arange(h)[:, None] - torch.arange(h)[None, :]).abs() <= k // 2
    dc = (torch.arange(w)[:, None] - torch.arange(w)[None, :]).abs() <= k // 2
    return dr[:, None, :, None] & dc[None, :, None, :]


# ------------------------------------------------------------------------------------------------
# effective weights are what forward applies
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shifted", _cases(lambda s: True))
def test_effective_weights_reproduce_forward(name, shifted):
    mixer = build(_spec(name), shifted=shifted)
    x = torch.randn(2, DIM, *RES)
    w = mixer.effective_weights(x, SOME_POSITIONS, per_channel=True)  # (N, C, P, H, W)
    assert w.shape == (2, DIM, len(SOME_POSITIONS), *RES)
    y_from_weights = torch.einsum("ncphw,nchw->ncp", w, x)
    if mixer.bias is not None:
        y_from_weights = y_from_weights + mixer.bias.detach()[None, :, None]
    with torch.no_grad():
        y = mixer(x)
    rows, cols = zip(*SOME_POSITIONS)
    torch.testing.assert_close(y_from_weights, y[:, :, list(rows), list(cols)], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# spatial: offset is translation-equivariant
# ------------------------------------------------------------------------------------------------

def _centre_input(res=(20, 20), border=6):
    """Zero within `border` of every edge: a roll by less than border - K//2 is a true shift."""
    x = torch.zeros(2, DIM, *res)
    x[:, :, border:-border, border:-border] = torch.randn(2, DIM, res[0] - 2 * border, res[1] - 2 * border)
    return x


@pytest.mark.parametrize("name", _presets(lambda s: s.sharing.spatial == "offset"))
def test_offset_sharing_is_translation_equivariant(name):
    assert _spec(name).connectivity.kind == "sliding"
    mixer = build(_spec(name), res=(20, 20))
    x, shift = _centre_input(), (2, 3)
    with torch.no_grad():
        y = mixer(x)
        y_of_shifted = mixer(torch.roll(x, shift, dims=(2, 3)))
    # the interior (3 = K // 2 away from the border) and, since the input is zero near the
    # borders, the whole map
    torch.testing.assert_close(y_of_shifted[..., 5:-3, 6:-3], y[..., 3:-5, 3:-6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_of_shifted, torch.roll(y, shift, dims=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", _presets(lambda s: s.sharing.spatial == "none"
                                          and s.dynamic.kind == "static"
                                          and s.connectivity.kind == "sliding"))
def test_static_without_spatial_sharing_is_not_translation_equivariant(name):
    """The control: the same check fails for a learned weight per position (locally connected).

    (Not for every `spatial: none`: an inhomogeneous weight predicted pointwise from x moves with x.)
    """
    mixer = build(_spec(name), res=(20, 20))
    x, shift = _centre_input(), (2, 3)
    with torch.no_grad():
        y = mixer(x)
        y_of_shifted = mixer(torch.roll(x, shift, dims=(2, 3)))
    assert not torch.allclose(y_of_shifted, torch.roll(y, shift, dims=(2, 3)), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["static", "homogeneous"])
def test_window_offset_sharing(kind):
    """Window connectivity with offset sharing: w[i, j] == w[i+s, j+s] whenever i, j share one window
    and i+s, j+s share one window; equivariant to shifts by a multiple of the window size."""
    k, res = 4, (12, 12)
    spec = OperatorSpec(Connectivity("window", k, shift=False), Sharing("offset", 1), Dynamic(kind))
    mixer = build(spec, dim=4, res=res)
    x = torch.randn(2, 4, *res)
    w = grid_maps(mixer.effective_weights(x, list(itertools.product(range(12), range(12)))))
    support = window_support(res, k, 0)
    assert ((w != 0) == support).all()
    # group the entries w[i, j] of all windows by their offset j - i: one value per offset
    hi, wi, hj, wj = torch.nonzero(support, as_tuple=True)
    offset = (hj - hi + k - 1) * (2 * k - 1) + (wj - wi + k - 1)
    values = w[..., hi, wi, hj, wj]  # (N, G, pairs)
    for o in offset.unique():
        same = values[..., offset == o]
        torch.testing.assert_close(same, same[..., :1].expand_as(same), rtol=0, atol=1e-7)
    assert len(offset.unique()) == (2 * k - 1) ** 2
    assert values.std(dim=-1).min() > 1e-3  # and not one value for every offset

    with torch.no_grad():
        y = mixer(x)
        assert torch.allclose(mixer(torch.roll(x, (k, 2 * k), dims=(2, 3))),
                              torch.roll(y, (k, 2 * k), dims=(2, 3)), rtol=1e-5, atol=1e-6)
        # the control: a shift that is not a multiple of the window size moves the window borders
        assert not torch.allclose(mixer(torch.roll(x, (1, 0), dims=(2, 3))),
                                  torch.roll(y, (1, 0), dims=(2, 3)), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", _presets(lambda s: s.sharing.spatial == "window"
                                          and s.connectivity.kind == "window"))
def test_window_sharing_is_shared_across_windows_not_by_offset(name):
    """spatial: window: the same weights in every window, but position-specific inside it."""
    mixer = build(_spec(name))
    k = _spec(name).connectivity.kernel_size
    w = grid_maps(mixer.effective_weights(torch.randn(2, DIM, *RES), ALL_POSITIONS))
    blocks = w.reshape(*w.shape[:2], 2, k, 2, k, 2, k, 2, k)  # (N, G, Wr, r, Wc, c, Wr', r', Wc', c')
    inside = torch.stack([blocks[:, :, a, :, b, :, a, :, b, :] for a in range(2) for b in range(2)])
    torch.testing.assert_close(inside, inside[:1].expand_as(inside), rtol=0, atol=0)
    # not offset-shared: w[i, j] != w[i+1, j+1] for a pair inside one window
    assert (inside[0, ..., 0, 0, 1, 1] - inside[0, ..., 1, 1, 2, 2]).abs().min() > 1e-6


# ------------------------------------------------------------------------------------------------
# static weights do not depend on the input; dynamic ones do, per instance
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shifted", _cases(lambda s: s.dynamic.kind == "static"))
def test_static_weights_do_not_change_with_input(name, shifted):
    mixer = build(_spec(name), shifted=shifted)
    x1, x2 = torch.randn(2, 2, DIM, *RES)
    w1 = mixer.effective_weights(x1, SOME_POSITIONS)
    w2 = mixer.effective_weights(x2 * 3 + 1, SOME_POSITIONS)
    assert torch.equal(w1, w2)
    assert torch.equal(w1[0], w1[1])
    # the forward pass is linear in x (plus the bias): nothing in it depends on the input
    bias = _bias(mixer)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x1 + 2 * x2) - bias, (mixer(x1) - bias) + 2 * (mixer(x2) - bias),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,shifted", _cases(lambda s: s.dynamic.kind != "static"))
def test_dynamic_weights_change_with_input_per_instance(name, shifted):
    mixer = build(_spec(name), shifted=shifted)
    x1, x2 = torch.randn(2, 2, DIM, *RES)
    w1 = mixer.effective_weights(x1, SOME_POSITIONS)
    w2 = mixer.effective_weights(x2, SOME_POSITIONS)
    assert not torch.allclose(w1, w2, rtol=0, atol=1e-5)          # another input, other weights
    assert not torch.allclose(w1[0], w1[1], rtol=0, atol=1e-5)    # per instance of one batch
    # computed from the context alone: the same context gives the same weights whatever x is
    context = torch.randn(2, DIM, *RES)
    torch.testing.assert_close(mixer.effective_weights(x1, SOME_POSITIONS, context=context),
                               mixer.effective_weights(x2, SOME_POSITIONS, context=context),
                               rtol=0, atol=1e-7)
    with torch.no_grad():  # and the forward pass is not linear in x
        assert not torch.allclose(mixer(x1 + x2), mixer(x1) + mixer(x2) - _bias(mixer),
                                  rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# channel sharing: one weight set per group
# ------------------------------------------------------------------------------------------------

# every preset as it is; the depth-wise ones (1 channel per group) also with 4; local_mlp along the
# Figure 2 axis
GROUP_CASES = (
    [pytest.param(*c.values, None, id=c.id) for c in _cases(lambda s: True)]
    + [pytest.param(name, False, 4, id=f"{name}-cpg4")
       for name in _presets(lambda s: s.sharing.channels_per_group == 1)]
    + [pytest.param("local_mlp", False, cpg, id=f"local_mlp-cpg{cpg}") for cpg in (1, 4, 16, 64)]
)


@pytest.mark.parametrize("name,shifted,cpg", GROUP_CASES)
def test_channels_of_a_group_share_weights(name, shifted, cpg):
    spec = _spec(name) if cpg is None else _spec(name).with_axes(channels_per_group=cpg, groups=None)
    mixer = build(spec, shifted=shifted)
    cpg, groups = mixer.channels_per_group, mixer.groups
    w = mixer.effective_weights(torch.randn(2, DIM, *RES), SOME_POSITIONS, per_channel=True)
    w = w.reshape(2, groups, cpg, -1)  # (N, G, channels of the group, everything else)
    torch.testing.assert_close(w, w[:, :, :1].expand_as(w), rtol=0, atol=1e-7)
    if groups > 1:  # different groups have different weights: no two groups are the same
        per_group = w[:, :, 0].transpose(0, 1).reshape(groups, -1)
        distance = torch.cdist(per_group, per_group) + torch.eye(groups)
        assert distance.min() > 1e-4


# ------------------------------------------------------------------------------------------------
# connectivity: which j each i sees
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shifted", _cases(lambda s: s.connectivity.kind == "window"))
def test_window_connectivity_support(name, shifted):
    """Unshifted: nothing crosses a window border. Shifted: also nothing crosses a shift region
    (Swin's mask). Inside that, every weight is nonzero: the support is exactly the window."""
    mixer = build(_spec(name), shifted=shifted)
    k = _spec(name).connectivity.kernel_size
    w = grid_maps(mixer.effective_weights(torch.randn(2, DIM, *RES), ALL_POSITIONS))
    support = window_support(RES, k, k // 2 if shifted else 0)
    assert (w[..., ~support] == 0).all()
    assert (w[..., support] != 0).all()
    if shifted:  # the shift moved the windows, and the mask removed pairs inside rolled windows
        assert (support != window_support(RES, k, 0)).any()
        assert (window_support(RES, k, k // 2, regions=False) & ~support).any()


@pytest.mark.parametrize("name,shifted", _cases(lambda s: s.connectivity.kind == "window"))
def test_window_connectivity_support_on_a_padded_map(name, shifted):
    """Window 3 on a 14x14 map (micro's first stage): padded to 15, then shifted by 1. Opposite
    borders of the map never see each other (rolling before padding, timm's order, lets them)."""
    spec = _spec(name).with_axes(kernel_size=3)
    mixer = build(spec, shifted=shifted)
    w = grid_maps(mixer.effective_weights(torch.randn(2, DIM, *RES), ALL_POSITIONS))
    support = window_support(RES, 3, 1 if shifted else 0)
    assert (w[..., ~support] == 0).all()
    assert (w[..., support] != 0).all()
    assert not support[0, 0, 13, 13] and not support[0, 0, 0, 13] and not support[13, 0, 0, 0]
    if shifted:
        assert support[0, 0, 0, 0] and support.sum(dim=(2, 3))[0, 0] == 1  # (0, 0) is alone in its region
        assert (support != window_support(RES, 3, 0)).any()


def test_window_support_helper_matches_swin_regions():
    """The independent mask above, by hand: 14x14, window 7, shift 3: the rolled map's last window
    holds rows of regions 4 and 3 wide: (0, 0) sees 3x3, (13, 13) sees 4x4, (5, 5) a whole window."""
    support = window_support((14, 14), 7, 3)
    assert support[0, 0].sum() == 9 and support[13, 13].sum() == 16 and support[5, 5].sum() == 49
    assert window_support((14, 14), 7, 0)[0, 0].sum() == 49


@pytest.mark.parametrize("name", _presets(lambda s: s.connectivity.kind == "sliding"))
def test_sliding_receptive_field_is_exactly_k_by_k(name):
    mixer = build(_spec(name))
    k = _spec(name).connectivity.kernel_size
    w = grid_maps(mixer.effective_weights(torch.randn(2, DIM, *RES), ALL_POSITIONS))
    support = sliding_support(RES, k)
    assert (w[..., ~support] == 0).all()
    assert (w[..., support] != 0).all()
    assert (w[:, :, 7, 7] != 0).sum(dim=(-1, -2)).eq(k * k).all()  # interior: all K*K entries


def test_dwconv_effective_weights_are_its_kernel():
    """At an interior position the map is the kernel itself, unflipped (cross-correlation)."""
    mixer = build(_spec("dwconv"))
    k = mixer.layout.kernel_size
    w = mixer.effective_weights(torch.randn(2, DIM, *RES), [(7, 6)])  # (N, G, 1, H, W)
    kernel = mixer.weights.weight.detach().reshape(DIM, k, k)
    torch.testing.assert_close(w[:, :, 0, 4:11, 3:10], kernel.expand(2, -1, -1, -1), rtol=0, atol=0)


@pytest.mark.parametrize("name", _presets(lambda s: s.connectivity.kind == "global"))
def test_global_connectivity_sees_everything(name):
    mixer = build(_spec(name))
    w = mixer.effective_weights(torch.randn(2, DIM, *RES), ALL_POSITIONS)
    assert (w != 0).all()


# ------------------------------------------------------------------------------------------------
# attention: a distribution over N(i)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shifted", _cases(lambda s: s.dynamic.kind == "attention"))
def test_attention_weights_are_a_distribution(name, shifted):
    mixer = build(_spec(name), shifted=shifted)
    w = mixer.effective_weights(torch.randn(2, DIM, *RES), ALL_POSITIONS)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=(-1, -2)), torch.ones(w.shape[:3]), rtol=0, atol=1e-5)
    assert (w.amax(dim=(-1, -2)) < 0.5).any()  # not one-hot everywhere: it spreads over N(i)
