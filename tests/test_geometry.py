"""The default small model keeps Swin-T's geometry: windows smaller than the maps, shifted blocks where
they are, local layers in the majority; so local and global operators really differ on it.

Checked on the model `python -m ablate.train` builds (the Hydra default), from the layers' effective
weights (the derivative of an output position by every input position), not from their settings.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR, build_model
from ablate.models.geometry import geometry_table, layer_views

README = Path(__file__).resolve().parent.parent / "README.md"


def default_model(operator: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"operator={operator}"])
    torch.manual_seed(0)
    model = build_model(cfg, cfg.data.img_size, cfg.data.in_chans, cfg.data.num_classes).double().eval()
    return cfg, model


def mixer_inputs(model, x):
    """Every mixer of the model with the input its block hands it (captured in one forward pass)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach())))
             for m in model.mixers()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def supports(mixer, x, positions):
    """For each output position, the input positions j with a non-zero effective weight (any group)."""
    w = mixer.effective_weights(x, positions)  # (N, G, P, H, W)
    reached = w.abs().sum(dim=(0, 1)) > 0  # (P, H, W)
    return [{tuple(j) for j in reached[p].nonzero().tolist()} for p in range(len(positions))]


def every_position(mixer):
    h, w = mixer.layout.resolution
    return [(i, j) for i in range(h) for j in range(w)]


def stage_of(model, mixer) -> int:
    return next(s for s, stage in enumerate(model.stages, 1) if any(b.mixer is mixer for b in stage.blocks))


def test_local_attention_sees_its_window_and_no_further_in_the_first_two_stages():
    cfg, model = default_model("local_attention")
    k = cfg.model.window
    assert k < 7  # the embedded default scales Swin's window down with its maps
    x = torch.randn(2, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size, dtype=torch.float64)
    checked = {1: 0, 2: 0}
    shifted_seen = {1: False, 2: False}
    for mixer, inp in mixer_inputs(model, x):
        s = stage_of(model, mixer)
        if s not in checked:
            continue
        h, w = mixer.layout.resolution
        assert h >= 2 * k and w >= 2 * k  # at least two windows per side
        shifted = any(mixer.layout.shift)
        positions = [(0, 0), (1, 1), (h // 2, w // 2), (h - 1, w - 1)]
        for position, seen in zip(positions, supports(mixer, inp, positions)):
            rows, cols = [r for r, _ in seen], [c for _, c in seen]
            assert position in seen and len(seen) <= k * k
            assert max(rows) - min(rows) < k and max(cols) - min(cols) < k  # inside one k x k window
            if not shifted:  # the window of the unshifted grid, exactly
                assert all(r // k == position[0] // k and c // k == position[1] // k for r, c in seen)
            else:
                shifted_seen[s] |= any(r // k != position[0] // k or c // k != position[1] // k
                                       for r, c in seen)
        checked[s] += 1
    assert checked == {1: 2, 2: 2}
    assert shifted_seen == {1: True, 2: True}  # each stage has a shifted block, and its windows moved


@pytest.mark.parametrize("operator,local_at_least", [("local_attention", 0.5), ("global_attention", None)])
def test_most_local_layers_see_less_than_the_map_and_global_sees_all_of_it(operator, local_at_least):
    cfg, model = default_model(operator)
    x = torch.randn(1, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size, dtype=torch.float64)
    local = []
    for mixer, inp in mixer_inputs(model, x):
        h, w = mixer.layout.resolution
        seen = [len(s) for s in supports(mixer, inp, every_position(mixer))]
        local.append(max(seen) < h * w)
        if local_at_least is None:
            assert min(seen) == h * w
    if local_at_least is not None:
        assert sum(local) >= local_at_least * len(local)
    assert local == [v.local for v in layer_views(model)]  # the README's table states the same


def test_the_readme_shows_the_geometry_of_the_default_and_tiny():
    assert geometry_table() in README.read_text()


def test_the_geometry_command_takes_sizes_and_refuses_a_size_it_lacks(capsys):
    """`python -m ablate.models.geometry` printed micro and tiny whatever it was given (`--sizes base`
    too, silently): a size is chosen by --sizes, and a size or flag it lacks is argparse's exit 2."""
    from ablate.models import geometry

    assert geometry.main(["--sizes", "small"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == geometry_table(("small",)) and "micro" not in out
    for bad in (["--sizes", "huge"], ["--stages", "1"]):
        with pytest.raises(SystemExit) as stopped:
            geometry.main(bad)
        assert stopped.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
