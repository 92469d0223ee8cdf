"""The grid walk: every cell of the axis grid builds a working model or says why it cannot.

Every (connectivity, shift, spatial, dynamic, channel sharing) cell either builds a micro model in
both block styles that runs forward and backward with finite outputs and gradients, or raises
`InvalidOperatorError` (never another exception) naming the rule and the nearest valid settings.
Then the rules one by one, table-driven.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

import ablate
from ablate.config import CONF_DIR
from ablate.models import AblateNet
from ablate.ops import registry
from ablate.ops.mixer import SpatialMixer
from ablate.ops.sources.static import StaticKernel
from ablate.space import options
from ablate.space.grid import axis_grid
from ablate.space.presets import PRESETS
from ablate.space.rules import InvalidOperatorError, validate
from ablate.space.spec import Connectivity, Dynamic, OperatorSpec, Sharing
from ablate.sweep.plan import check_operator

# the micro geometry at 28 px: patch 2 -> maps of 14, 7, 4, 2
WIDTHS = (32, 64, 128, 256)
SIZES = [(14, 14), (7, 7), (4, 4), (2, 2)]
MICRO = dict(embed_dim=32, depths=(1, 1, 3, 1), patch_size=2, mlp_ratio=4.0, num_classes=10,
             drop_path_rate=0.0)  # no stochastic depth: every parameter must get a gradient


def _cell_id(spec: OperatorSpec) -> str:
    a = spec.axes
    shift = "-shift" if a["shift"] else ""
    channels = f"cpg{a['channels_per_group']}" if a["groups"] is None else f"groups{a['groups']}"
    return f"{a['connectivity']}{shift}-{a['spatial']}-{a['dynamic']}-{channels}"


CELLS = [pytest.param(spec, id=_cell_id(spec)) for spec in axis_grid()]


def _build(spec, block, img_size=28, in_chans=1):
    return AblateNet(spec, block, img_size=img_size, in_chans=in_chans, **MICRO)


def _outcome(spec, block, **kwargs):
    """The model, or the InvalidOperatorError; any other exception fails the test."""
    try:
        return _build(spec, block, **kwargs)
    except InvalidOperatorError as err:
        return err
    except Exception as err:  # noqa: BLE001  (the point: nothing but InvalidOperatorError)
        pytest.fail(f"{type(err).__name__} instead of InvalidOperatorError: {err}")


def _train_step(model, x):
    torch.manual_seed(0)
    model.train()
    y = model(x)
    assert y.shape == (x.shape[0], 10)
    assert torch.isfinite(y).all()
    (y.square().mean() + y.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("spec", CELLS)
def test_grid_cell_builds_and_trains_or_says_why(spec):
    outcomes = {block: _outcome(spec, block) for block in ("swin", "dwnet")}
    errors = [o for o in outcomes.values() if isinstance(o, InvalidOperatorError)]
    if errors:
        # validity is a property of the operator, not of the block it sits in
        assert len(errors) == 2 and str(errors[0]) == str(errors[1])
        assert "Nearest valid settings" in str(errors[0]) and errors[0].nearest
        assert f"[{errors[0].rule}]" in str(errors[0])
        with pytest.raises(InvalidOperatorError):  # and `validate` alone says the same
            validate(spec, WIDTHS, SIZES)
        return
    assert validate(spec, WIDTHS, SIZES)
    torch.manual_seed(0)
    for model in outcomes.values():
        _train_step(model, torch.randn(2, 1, 28, 28))
    # 32 px RGB (CIFAR-like), one block style: maps of 16 and 8 are padded to windows of 7
    model = _outcome(spec, "swin", img_size=32, in_chans=3)
    assert not isinstance(model, InvalidOperatorError), model
    _train_step(model, torch.randn(2, 3, 32, 32))


def test_grid_has_valid_and_invalid_cells():
    # the cells collected at import, with the shipped options only: another test in the same worker
    # (test_config) registers a user's option, which would grow axis_grid() by a whole dynamic column
    shipped = [cell.values[0] for cell in CELLS]
    valid, invalid = [], []
    for spec in shipped:
        try:
            validate(spec, WIDTHS, SIZES)
            valid.append(spec)
        except InvalidOperatorError as err:
            assert "Nearest valid settings" in str(err)
            invalid.append(spec)
    assert len(valid) > 0 and len(invalid) > 0
    assert len(valid) + len(invalid) == len(CELLS)
    # every registered option of every axis appears in some valid cell
    for axis in ("connectivity", "shift", "spatial", "dynamic"):
        assert {s.axes[axis] for s in valid} == {s.axes[axis] for s in shipped}, axis


# ------------------------------------------------------------------------------------------------
# the rules, one by one
# ------------------------------------------------------------------------------------------------

SLIDING, WINDOW, GLOBAL = Connectivity("sliding", 7), Connectivity("window", 7), Connectivity("global", 7)
STATIC = Dynamic("static")


def _op(conn=SLIDING, spatial="offset", cpg=1, groups=None, dyn=STATIC):
    return OperatorSpec(conn, Sharing(spatial, cpg, groups), dyn)


RULES = [  # (id, spec, fixed map sizes?, the rule it breaks)
    ("attention-offset", _op(spatial="offset", dyn=Dynamic("attention")), True,
     "attention needs spatial: none"),
    ("homogeneous-none", _op(spatial="none", dyn=Dynamic("homogeneous")), True,
     "homogeneous needs spatial: offset"),
    ("inhomogeneous-window", _op(WINDOW, spatial="window", dyn=Dynamic("inhomogeneous")), True,
     "inhomogeneous needs spatial: none"),
    ("static-window-sliding", _op(SLIDING, spatial="window"), True,
     "spatial: window needs window or global connectivity"),
    ("shift-sliding", _op(Connectivity("sliding", 7, shift=True)), True,
     "shift needs window connectivity"),
    ("shift-global", _op(Connectivity("global", 7, shift=True), spatial="none", cpg=32,
                         dyn=Dynamic("attention")), True, "shift needs window connectivity"),
    ("even-kernel-sliding", _op(Connectivity("sliding", 6)), True, "sliding needs an odd kernel_size"),
    ("kernel-size-zero", _op(Connectivity("window", 0)), True, "connectivity.kernel_size"),
    ("cpg3", _op(cpg=3), True, "channels_per_group must divide every stage width"),
    ("cpg-per-stage-3", _op(cpg=(1, 2, 3, 4)), True, "channels_per_group must divide every stage width"),
    ("cpg-per-stage-length", _op(cpg=(32, 32)), True, "channels_per_group: one number or one per stage"),
    ("cpg-and-groups", _op(cpg=32, groups=4), True, "one channel-sharing knob"),
    ("neither-cpg-nor-groups", _op(cpg=None, groups=None), True, "one channel-sharing knob"),
    ("groups3", _op(cpg=None, groups=3), True, "groups must divide every stage width"),
    ("unknown-dynamic", _op(dyn=Dynamic("hypernetwork")), True, "dynamic.kind"),
    ("unknown-connectivity", _op(Connectivity("dilated", 7)), True, "connectivity.kind"),
    ("unknown-spatial", _op(spatial="row"), True, "sharing.spatial"),
    ("unimportable-module", _op(dyn=Dynamic("static", module="ablate_no_such_module_xyz")), True,
     "dynamic.module"),
    ("reduction-too-large", _op(dyn=Dynamic("homogeneous", reduction=64)), True, "dynamic.reduction"),
    ("locally-connected-any-size", _op(spatial="none"), False, "needs a fixed input size"),
    ("global-offset-any-size", _op(GLOBAL, spatial="offset"), False, "needs a fixed input size"),
]


def _parse(value: str):
    """A Hydra override value: null, a bool, an int or a string (`none` is a spatial option)."""
    if value == "null":
        return None
    if value in ("true", "false"):
        return value == "true"
    return int(value) if value.lstrip("-").isdigit() else value


def _apply(spec: OperatorSpec, override: str) -> OperatorSpec | None:
    """A suggestion such as `sharing.spatial=none` applied to the spec; None if it is not one."""
    key, sep, value = override.partition("=")
    if not sep or " " in key:
        return None
    value = _parse(value)
    part, _, field = key.partition(".")
    if part not in ("connectivity", "sharing", "dynamic"):
        return None
    field = field or "kind"
    return replace(spec, **{part: replace(getattr(spec, part), **{field: value})})


def _check_error(err: InvalidOperatorError, rule: str) -> None:
    assert err.rule == rule
    text = str(err)
    assert f"[{rule}]" in text and "Nearest valid settings" in text
    assert err.nearest and all(s in text for s in err.nearest)


@pytest.mark.parametrize("spec,fixed,rule", [pytest.param(*r[1:4], id=r[0]) for r in RULES])
def test_rule_names_itself(spec, fixed, rule):
    with pytest.raises(InvalidOperatorError) as info:
        validate(spec, WIDTHS, SIZES if fixed else None)
    _check_error(info.value, rule)


@pytest.mark.parametrize("spec,fixed,rule", [pytest.param(*r[1:], id=r[0]) for r in RULES])
def test_rule_suggestions_are_valid_settings(spec, fixed, rule):
    sizes = SIZES if fixed else None
    with pytest.raises(InvalidOperatorError) as info:
        validate(spec, WIDTHS, sizes)
    # each suggested override, applied alone, gets past this rule (to a valid spec or another rule)
    applied = [s for s in (_apply(spec, o) for o in info.value.nearest) if s is not None]
    assert applied, f"no suggestion is an override: {info.value.nearest}"
    for fixed_spec in applied:
        try:
            validate(fixed_spec, WIDTHS, sizes)
        except InvalidOperatorError as again:
            assert again.rule != rule, (fixed_spec.axes, str(again))
    # at least one suggestion alone gives a valid operator
    assert any(_is_valid(s, sizes) for s in applied), info.value.nearest


def _is_valid(spec, sizes) -> bool:
    try:
        validate(spec, WIDTHS, sizes)
        return True
    except InvalidOperatorError:
        return False


def test_rule_cpg3_suggests_divisors():
    with pytest.raises(InvalidOperatorError, match="channels_per_group must divide") as info:
        validate(_op(cpg=3), WIDTHS, SIZES)
    assert "sharing.channels_per_group=2" in info.value.nearest
    assert "sharing.channels_per_group=4" in info.value.nearest



@pytest.mark.parametrize("widths", [(2, 4, 8, 16), WIDTHS])
def test_rule_reduction_suggests_reductions_valid_at_these_widths(widths):
    """At a stage width of 2 the default reduction 4 is itself invalid: it was the one suggestion."""
    spec = _op(dyn=Dynamic("homogeneous", reduction=64))
    with pytest.raises(InvalidOperatorError, match="dynamic.reduction") as info:
        validate(spec, widths, SIZES)
    applied = [_apply(spec, o) for o in info.value.nearest]
    assert applied and all(validate(s, widths, SIZES) for s in applied), info.value.nearest



def test_a_per_stage_list_from_python_is_one_value_per_stage():
    """YAML's lists reach the spec as tuples (ablate.config); a Python list was read as one value and
    refused as not dividing the stage widths, with 1 or 2 as the nearest settings."""
    spec = _op(WINDOW, spatial="none", cpg=[8, 16, 32, 32], dyn=Dynamic("attention", bias=False))
    assert spec == _op(WINDOW, spatial="none", cpg=(8, 16, 32, 32), dyn=Dynamic("attention", bias=False))
    assert spec.axes["channels_per_group"] == [8, 16, 32, 32]
    assert validate(spec, WIDTHS, SIZES) == [8, 16, 32, 32]


@pytest.fixture
def sliding_only_option(monkeypatch):
    """A user's dynamic option declared for sliding connectivity only, with its one weight source.

    Both tables are swapped for copies for this test, so the option never leaks into the grid."""
    monkeypatch.setattr(options, "_DYNAMIC", dict(options._DYNAMIC))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    options.register_dynamic("sliding_only", spatial=("offset",), connectivity=("sliding",))
    registry.register_source("sliding_only", "sliding", "offset")(StaticKernel)
    yield "sliding_only"


def test_rule_option_declared_for_one_connectivity(sliding_only_option):
    spec = _op(SLIDING, dyn=Dynamic(sliding_only_option))
    assert validate(spec, WIDTHS, SIZES) == [1, 1, 1, 1]
    with pytest.raises(InvalidOperatorError) as info:
        validate(replace(spec, connectivity=WINDOW), WIDTHS, SIZES)
    _check_error(info.value, "sliding_only needs connectivity: sliding")
    assert info.value.nearest == ("connectivity=sliding",)


def test_an_implementation_of_an_undeclared_cell_is_refused(sliding_only_option):
    """The space declares the cells; the ops layer implements only those."""
    with pytest.raises(ValueError, match="no windowed/offset cell"):
        registry.register_source("sliding_only", "windowed", "offset")(StaticKernel)


def test_a_declared_cell_without_implementation_is_bad_input_when_built(monkeypatch):
    """Declared for window connectivity too, implemented for sliding only: the rules (which do not
    ask the implementations) pass it, and building it says what to register, as bad input."""
    from ablate.ops.mixer import SpatialMixer

    monkeypatch.setattr(options, "_DYNAMIC", dict(options._DYNAMIC))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    options.register_dynamic("half_done", spatial=("offset",))
    registry.register_source("half_done", "sliding", "offset")(StaticKernel)
    spec = _op(WINDOW, dyn=Dynamic("half_done"))
    validate(spec, WIDTHS, SIZES)
    with pytest.raises(InvalidOperatorError, match="no weight source implements it") as info:
        SpatialMixer(spec, 32, (14, 14), 1)
    assert info.value.nearest == ("connectivity=sliding",)
    assert ("half_done", "window", "offset") in registry.missing_sources()


def test_every_declared_cell_of_the_built_in_options_is_implemented():
    assert registry.missing_sources() == []


def test_model_level_rules():
    with pytest.raises(InvalidOperatorError) as info:
        AblateNet(_op(), "convnext", img_size=28, in_chans=1, **MICRO)
    _check_error(info.value, "block")
    with pytest.raises(InvalidOperatorError) as info:
        AblateNet(_op(), "dwnet", img_size=27, in_chans=1, **MICRO)
    _check_error(info.value, "img_size must be a multiple of patch_size")
    # and the micro model passes its map sizes on: a locally connected model builds
    assert _build(_op(spatial="none"), "dwnet").mixers()[0].weights.weight.shape[-2:] == (14, 14)



@pytest.mark.parametrize("conn,refused", [
    (Connectivity("window", 13), False),  # 2 windows per side of the 14 x 14 map: local
    (Connectivity("window", 14), True),   # one window per map at every stage: global attention
    (Connectivity("sliding", 15), False),  # reaches 7 each way: a corner of the 14 x 14 map sees 8 x 8
    (Connectivity("sliding", 25), False),
    (Connectivity("sliding", 27), True),  # reaches 13 each way: every position sees the whole map
])
def test_a_kernel_is_refused_exactly_where_it_sees_every_map_whole(conn, refused):
    """The whole-model rule refuses global connectivity under another name: a window that covers the
    largest map (a window of 14 was let through, and suggested for 15), a sliding neighbourhood that
    reaches every position from every other (15 was refused, though a corner sees 8 x 8 of 14 x 14)."""
    spec = _op(conn)
    if not refused:
        assert validate(spec, WIDTHS, SIZES, whole_model=True)
        return
    with pytest.raises(InvalidOperatorError, match="14x14") as info:
        validate(spec, WIDTHS, SIZES, whole_model=True)
    applied = [s for s in (_apply(spec, o.split(" (")[0]) for o in info.value.nearest) if s is not None]
    assert len(applied) == 3  # two kernel sizes and global
    assert all(validate(s, WIDTHS, SIZES, whole_model=True) for s in applied), info.value.nearest


# the presets whose every layer takes any map: a kernel shared over positions, or predicted from the input
SIZE_FREE = {"dwconv", "dynamic_dwconv", "idynamic_dwconv"}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_a_map_of_another_size_is_refused_or_computed_exactly(name, backend):
    """A layer laid out for one map size (windows, shift masks, the neighbourhood's border mask,
    per-position weights) refuses another size by name: the window layout cut a transposed (8, 4) map
    into the (4, 8) map's windows and returned a (4, 8) output, and the native kernels read
    per-position weights laid out for 4 x 8 at a 12 x 12 map's positions, past their end. A sliding
    kernel shared over positions or predicted from the input has no size: there, any map gives what
    a layer built for that map with the same weights gives. timm's config says which is which."""
    spec = PRESETS[name].at_window(2 if PRESETS[name].spec.connectivity.kind == "window" else 3)
    torch.manual_seed(0)
    mixer = SpatialMixer(spec, 32, (4, 8), backend=backend).eval()
    assert mixer(torch.randn(1, 32, 4, 8)).shape == (1, 32, 4, 8)
    assert mixer.size_bound == (name not in SIZE_FREE)
    for shape in ((8, 4), (12, 12)):
        x = torch.randn(2, 32, *shape)
        if mixer.size_bound:
            with pytest.raises(ValueError, match=rf"built for a 4x8 map.*got a {shape[0]}x{shape[1]}"):
                mixer(x)
        else:
            built = SpatialMixer(spec, 32, shape, backend=backend).eval()
            built.load_state_dict(mixer.state_dict())
            torch.testing.assert_close(mixer(x), built(x))
    # and the whole model, through timm's feature extraction too
    net = ablate.create(name, "micro", in_chans=1, num_classes=10).eval()
    features = timm.create_model(f"ablate_{name}_micro", features_only=True, in_chans=1).eval()
    assert net.pretrained_cfg["fixed_input_size"] == (name not in SIZE_FREE)
    for model in (net, features):
        if name in SIZE_FREE:
            model(torch.randn(1, 1, 32, 32))
        else:
            with pytest.raises(ValueError, match=r"img_size"):
                model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("name, dim, cpg", [("dwconv", 10, 4), ("local_attention", 48, 32),
                                            ("local_mlp", 32, 0)])
def test_a_mixer_given_channels_per_group_that_does_not_divide_its_width_is_refused(name, dim, cpg):
    """`SpatialMixer(..., channels_per_group=)` is the rules' business as the spec's own value is:
    4 at width 10 built 2 groups of 5 channels and 32 at width 48 one head of 48, silently, and 0
    divided by zero."""
    spec = PRESETS[name].at_window(3)
    refused = rf"channels_per_group={cpg} does not divide the width {dim}"
    with pytest.raises(InvalidOperatorError, match=refused):
        SpatialMixer(spec, dim, (6, 6), channels_per_group=cpg)
    assert SpatialMixer(spec, 48, (6, 6), channels_per_group=16).groups == 3  # one that divides


@pytest.mark.parametrize("name", list(PRESETS))
def test_effective_weights_of_a_map_of_another_size_are_refused_as_forward_refuses_it(name):
    """The weights a layer laid out for one map would apply to another are no weights it applies:
    `effective_weights` refuses the map as forward does (it failed inside a reshape, or read
    per-position weights of the wrong map), and a layer that takes any map shows its weights there."""
    spec = PRESETS[name].at_window(2 if PRESETS[name].spec.connectivity.kind == "window" else 3)
    mixer = SpatialMixer(spec, 32, (4, 8)).eval()
    x = torch.randn(1, 32, 6, 6)
    if mixer.size_bound:
        with pytest.raises(ValueError, match=r"built for a 4x8 map.*got a 6x6"):
            mixer.effective_weights(x, [(1, 1)])
    else:
        assert mixer.effective_weights(x, [(1, 1)]).shape == (1, mixer.groups, 1, 6, 6)


@pytest.mark.parametrize("operator, kernel, refused", [
    ("global_attention", 5, True),    # would be another experiment of the same model
    ("token_mlp", 7, True),
    ("global_attention", 3, False),   # micro's window: what every global run has
    ("local_attention", 5, False),
    ("dwconv", 5, False),
])
def test_a_kernel_size_given_to_global_connectivity_is_a_skipped_cell(operator, kernel, refused):
    """A grid over kernel sizes builds each global operator once, at the model's window; its other
    cells are invalid (the sweep records them skipped, with this reason) rather than duplicate runs."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"operator={operator}", f"connectivity.kernel_size={kernel}"])
    if not refused:
        check_operator(cfg)
        return
    with pytest.raises(InvalidOperatorError) as info:
        check_operator(cfg)
    _check_error(info.value, "global connectivity has no kernel size")
    assert "connectivity.kernel_size=3" in info.value.nearest
