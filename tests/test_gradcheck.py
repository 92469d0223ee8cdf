"""`torch.autograd.gradcheck` in float64 for every operator: every valid cell of the axis grid (eval
mode), and every preset (train mode), with respect to the input, the context the weights are
computed from, and every parameter. Tiny shapes: N=2, C=4 (2 groups of 2 channels), 6x6 maps, K=3
(so 2x2 windows, and a shift of 1 whose region mask matters).

Cost: the whole Jacobian with respect to x for every distinct operator; the whole Jacobian for
context and parameters where the gradient is hand-written (per-position sliding operators);
gradcheck's fast mode elsewhere (see `_check`).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from ablate.ops.mixer import SpatialMixer
from ablate.space.grid import axis_grid
from ablate.space.presets import PRESETS
from ablate.space.rules import InvalidOperatorError, validate
from ablate.space.spec import OperatorSpec

N, C, RES, K = 2, 4, (6, 6), 3


def _cell_id(spec: OperatorSpec) -> str:
    a = spec.axes
    shift = "-shift" if a["shift"] else ""
    channels = f"cpg{a['channels_per_group']}" if a["groups"] is None else f"groups{a['groups']}"
    return f"{a['connectivity']}{shift}-{a['spatial']}-{a['dynamic']}-{channels}"


def _grid_cells():
    valid, invalid = [], 0
    for spec in axis_grid(kernel_size=K, channel_options=((2, None), (None, 2))):
        try:
            validate(spec, [C], [RES])
        except InvalidOperatorError:
            invalid += 1
            continue
        valid.append(pytest.param(spec, id=_cell_id(spec)))
    assert valid and invalid
    return valid


def _mixer(spec: OperatorSpec, train: bool = False) -> SpatialMixer:
    torch.manual_seed(0)
    mixer = SpatialMixer(spec, C, RES, shifted=spec.connectivity.shift).double()
    with torch.no_grad():  # away from init (zero biases, tiny attention logits): generic weights
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer.train(train)


def _check(mixer: SpatialMixer, full: bool, full_x: bool = True) -> None:
    """gradcheck with respect to x, the context (dynamic weights only) and every parameter.

    The check with respect to x compares the whole Jacobian (unless `full_x=False`). With
    `full=False` the context and the parameters use gradcheck's fast mode (it compares u^T J v for
    random u, v: one Jacobian-vector product instead of a forward pass per element), which catches
    wrong gradients of whole tensors but can miss an error in a single element (a 1% error at one
    position, say).
    """
    torch.manual_seed(1)
    x = torch.randn(N, C, *RES, dtype=torch.float64, requires_grad=True)
    context = torch.randn(N, C, *RES, dtype=torch.float64, requires_grad=True)
    if mixer.spec.dynamic.kind == "static":
        assert gradcheck(mixer, (x,), fast_mode=not full_x)
    else:  # x is only aggregated; the weights come from the context
        assert gradcheck(lambda x: mixer(x, context=context.detach()), (x,), fast_mode=not full_x)
        assert gradcheck(lambda c: mixer(x.detach(), context=c), (context,), fast_mode=not full)
    names, params = zip(*mixer.named_parameters())
    params = tuple(p.detach().clone().requires_grad_(True) for p in params)
    inputs = (x.detach(),) if mixer.spec.dynamic.kind == "static" else (x.detach(), context.detach())
    call = lambda *ps: functional_call(mixer, dict(zip(names, ps)), inputs)  # noqa: E731
    assert gradcheck(call, params, fast_mode=not full)


@pytest.mark.parametrize("spec", _grid_cells())
def test_gradcheck_grid_cell(spec):
    mixer = _mixer(spec)  # eval: BatchNorm in predictors uses its running statistics
    assert (mixer.groups, mixer.channels_per_group) == (2, 2)
    # At C=4, `groups: 2` builds the very operator `channels_per_group: 2` builds (asserted above),
    # whose x-Jacobian its own cell checks in full; this cell checks it in fast mode.
    _check(mixer, full=False, full_x=spec.sharing.groups is None)


def _tiny(spec: OperatorSpec) -> OperatorSpec:
    """The preset at K=3 and 2 groups of 2 channels (by whichever channel knob it uses)."""
    sharing = (replace(spec.sharing, channels_per_group=2) if spec.sharing.groups is None
               else replace(spec.sharing, groups=2))
    return OperatorSpec(replace(spec.connectivity, kernel_size=K), sharing, spec.dynamic)


@pytest.mark.parametrize("name", list(PRESETS))
def test_gradcheck_preset_train_mode(name):
    """Every preset, in train mode: BatchNorm of the predictors normalises with batch statistics
    (over N=2 instances), a different function than in eval mode, and its gradient is right too."""
    spec = _tiny(PRESETS[name].spec)
    validate(spec, [C], [RES])
    mixer = _mixer(spec, train=True)
    # In full where the gradient is written by hand (the per-position sliding shift-and-accumulate,
    # ablate/ops/functional.py); elsewhere autograd derives it, and fast mode keeps the suite fast.
    hand_written = spec.connectivity.kind == "sliding" and spec.sharing.spatial == "none"
    _check(mixer, full=hand_written)
