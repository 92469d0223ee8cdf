"""Hydra config groups: real composition of conf/, the schema, the presets, the measure app."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

import ablate
from ablate.config import CONF_DIR, build_model, operator_label, spec_from_cfg
from ablate.measure import measure
from ablate.models.backbone import SIZES
from ablate.space.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def composed(*overrides: str, config_name: str = "measure"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_measure(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ablate.measure", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("size", ["tiny", "micro"])
def test_operator_yaml_selects_the_python_preset(name, size):
    """The preset at the size's window: the paper's 7 at tiny, 3 at micro (conf/model)."""
    cfg = composed(f"operator={name}", f"model={size}")
    assert spec_from_cfg(cfg) == PRESETS[name].at_window(SIZES[size].window)
    assert (size != "tiny") or spec_from_cfg(cfg) == PRESETS[name].spec
    assert cfg.block.style.name == PRESETS[name].block
    assert operator_label(cfg) == name


def test_every_preset_has_a_yaml_and_no_yaml_lacks_a_preset():
    names = {p.stem for p in (CONF_DIR / "operator").glob("*.yaml")}
    assert names == set(PRESETS)


def test_operator_yaml_sets_no_axis_field():
    for path in (CONF_DIR / "operator").glob("*.yaml"):
        body = [line for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "-", "defaults:"))]
        assert body == [f"preset: {path.stem}"], f"{path.name} sets fields besides `preset`: {body}"


@pytest.mark.parametrize("size", sorted(SIZES))
def test_model_yaml_matches_sizes(size):
    m = composed(f"model={size}").model
    ref = SIZES[size]
    fields = ("embed_dim", "depths", "patch_size", "img_size", "drop_path_rate", "mlp_ratio", "window")
    composed_values = {f: getattr(m, f) for f in fields} | {"depths": tuple(m.depths)}
    assert composed_values == {f: getattr(ref, f) for f in fields}


def test_command_line_axis_overrides_win_over_the_preset():
    cfg = composed("operator=dwconv", "dynamic=homogeneous", "connectivity.kernel_size=5",
                   "sharing.channels_per_group=4")
    spec = spec_from_cfg(cfg)
    assert spec.dynamic.kind == "homogeneous"
    assert spec.connectivity.kernel_size == 5
    assert spec.sharing.channels_per_group == 4
    assert operator_label(cfg) == "dwconv[kernel_size=5,channels_per_group=4,dynamic=homogeneous]"
    cfg = composed("operator=local_attention", "connectivity=sliding", "block=dwnet")
    assert spec_from_cfg(cfg) == PRESETS["neighborhood_attention"].spec
    assert cfg.block.style.name == "dwnet"


@pytest.mark.parametrize("overrides, label", [
    (["operator=local_attention", "dynamic.position_bias=false"], "local_attention[position_bias=False]"),
    (["operator=dynamic_dwconv", "dynamic.reduction=8"], "dynamic_dwconv[reduction=8]"),
    (["operator=dwconv", "dynamic.bias=false"], "dwconv[bias=False]"),
    (["operator=local_attention", "dynamic.qkv_bias=false", "connectivity.shift=false"],
     "local_attention[shift=False,qkv_bias=False]"),
])
def test_a_setting_of_the_presets_own_dynamic_option_names_the_operator_a_variant(overrides, label):
    """Swin without its position bias is another operator (other parameters, other numbers) than
    Swin: the label that measure prints, the run's folder name and the weights figure's choice of "the
    preset itself" read called it `local_attention`."""
    assert operator_label(composed(*overrides, "model=micro")) == label


def test_channels_per_group_list_and_groups():
    cfg = composed("operator=local_attention", "model=micro", "sharing.channels_per_group=[8,16,32,32]")
    model = build_model(cfg, 28, 1, 10)
    per_stage = [stage.blocks[0].mixer.channels_per_group for stage in model.stages]
    assert per_stage == [8, 16, 32, 32]
    cfg = composed("operator=idynamic_dwconv", "model=tiny")
    with torch.device("meta"):
        model = build_model(cfg, 224, 3, 1000)
    assert [stage.blocks[0].mixer.groups for stage in model.stages] == [32, 32, 32, 32]


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "sharing" / "channels").glob("*.yaml")))
def test_the_overrides_a_channel_sharing_option_names_are_valid(option):
    """Each conf/sharing/channels file says how to override its number; every override it names, as
    written there (N a number that divides the micro widths), gives a valid operator. They named
    `sharing.groups=N` beside a set channels_per_group (and the converse), which is refused: the two
    knobs are exclusive."""
    lines = (CONF_DIR / "sharing" / "channels" / f"{option}.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Override the number:"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    text = " ".join(line.lstrip("# ") for line in lines[start:end])
    ways = [w.strip() for w in text.split(":", 1)[1].split(";")]
    assert len(ways) == 2
    for way in ways:
        overrides = [w.replace("=N", "=8") for w in way.split() if w.startswith("sharing.")]
        assert overrides, way
        cfg = composed("operator=local_mlp", "model=micro", f"sharing/channels={option}", *overrides)
        model = build_model(cfg, 28, 1, 10)
        assert 8 in (model.stage_channels_per_group[0], 32 // model.stage_channels_per_group[0])


@pytest.mark.parametrize("override, error", [
    ("connectivity.kernal_size=3", ConfigAttributeError),  # a misspelt key
    ("connectivity.kind=windw", ValidationError),       # an unknown enum value
    ("sharing.spatial=shared", ValidationError),
    ("block.style=resnet", ValidationError),
    ("connectivity.kernel_size=seven", ValidationError),  # a wrong type
])
def test_schema_rejects_typos_at_composition(override, error):
    with pytest.raises(ConfigCompositionException) as info:
        composed("operator=dwconv", override)
    assert isinstance(info.value.__cause__, error)


def test_unknown_option_file_is_a_composition_error():
    with pytest.raises(ConfigCompositionException, match="dynamic"):
        composed("dynamic=atention")


def test_measure_function_reports_the_paper_models():
    row = measure(composed("operator=dwconv", "model=tiny", "img_size=224", "num_classes=1000"))
    assert row == {"operator": "dwconv", "model": "tiny", "img_size": 224, "num_classes": 1000,
                   "params_m": pytest.approx(24.17, rel=5e-3), "gmac": pytest.approx(3.8, rel=0.05)}


def test_measure_app_prints_one_json_line_per_job():
    out = run_measure("-m", "operator=dwconv,local_attention", "model=micro", "num_classes=10")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["operator"] for r in rows] == ["dwconv", "local_attention"]
    assert all(set(r) == {"operator", "model", "img_size", "num_classes", "params_m", "gmac"} for r in rows)
    assert all(r["model"] == "micro" and r["img_size"] == 28 and r["num_classes"] == 10 for r in rows)


def test_measure_app_invalid_axes_exit_2_with_the_rule():
    out = run_measure("operator=dwconv", "dynamic=attention")
    assert out.returncode == 2
    assert "attention needs spatial: none" in out.stderr
    assert "Nearest valid settings: sharing.spatial=none" in out.stderr


def test_the_readme_shows_the_error_the_measure_app_prints():
    """README's "Composing operators" example of an invalid combination is the app's own message,
    word for word (it listed the nearest dynamic options in another order than the app prints)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("    $ python -m ablate.measure operator=dwconv dynamic=attention")
    shown = []
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        shown.append(line.strip())
    out = run_measure("operator=dwconv", "dynamic=attention")
    printed = next(line for line in out.stderr.splitlines() if line.startswith("error:"))
    assert " ".join(shown) == printed


# -- a user's new option: one Python module + one YAML file -------------------------------------
USER_MODULE = '''
"""A static kernel gated per instance by a sigmoid of pooled features."""
import torch
from torch import nn

from ablate.ops import register_dynamic, register_source
from ablate.ops.sources.base import WeightSource, uniform_

register_dynamic("gated", spatial=("offset",), connectivity=("sliding",),
                 why="the gate scales one kernel per instance")


@register_source("gated", "sliding", "offset")
class GatedKernel(WeightSource):
    def __init__(self, layout, dim, groups, dynamic, context_dim):
        super().__init__(layout, dim, groups, dynamic, context_dim)
        self.kernel = uniform_(nn.Parameter(torch.empty(groups, layout.tokens)), layout.tokens)
        self.gate = nn.Linear(context_dim, groups)
        self.temperature = float(dynamic.params.get("temperature", 1.0))

    def forward(self, context, layout):
        gate = torch.sigmoid(self.gate(context.mean(dim=(2, 3))) / self.temperature)  # (N, G)
        return self.kernel[None] * gate[..., None]                                   # (N, G, K*K)

    def macs(self):
        return self.context_dim * self.groups
'''

USER_YAML = """\
kind: gated
module: user_gated
bias: true
params:
  temperature: 2.0
"""


@pytest.fixture
def user_option(tmp_path, monkeypatch):
    (tmp_path / "user_gated.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "conf" / "dynamic").mkdir(parents=True)
    (tmp_path / "conf" / "dynamic" / "gated.yaml").write_text(USER_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_user_adds_a_dynamic_option(user_option):
    cfg = composed("operator=dwconv", "dynamic=gated", "model=micro",
                   f"hydra.searchpath=[file://{user_option / 'conf'}]")
    model = build_model(cfg, 28, 1, 10)  # `validate` imports dynamic.module, which registers it
    mixer = model.mixers()[0]
    assert type(mixer.weights).__name__ == "GatedKernel"
    assert mixer.weights.temperature == 2.0
    x = torch.randn(2, 1, 28, 28)
    model(x).sum().backward()
    assert mixer.weights.gate.weight.grad is not None
    # the new option takes part in the rules like a built-in one
    with pytest.raises(ablate.InvalidOperatorError, match="gated needs spatial: offset"):
        build_model(composed("operator=dwconv", "dynamic=gated", "sharing=none", "model=micro",
                             f"hydra.searchpath=[file://{user_option / 'conf'}]"), 28, 1, 10)
    with pytest.raises(ablate.InvalidOperatorError, match="gated needs connectivity: sliding"):
        build_model(composed("operator=dwconv", "dynamic=gated", "connectivity=window", "model=micro",
                             f"hydra.searchpath=[file://{user_option / 'conf'}]"), 28, 1, 10)


def test_a_user_option_through_the_measure_app(user_option):
    out = run_measure("operator=dwconv", "dynamic=gated", "model=micro",
                      f"hydra.searchpath=[file://{user_option / 'conf'}]",
                      env={"PYTHONPATH": str(user_option)})
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["operator"] == "dwconv[dynamic=gated]"


@pytest.mark.parametrize("source, error", [
    ("def gate(:\n", "SyntaxError"),
    ('from ablate.ops import register_dynamic\nregister_dynamic("odd", spatial=("diagonal",))\n',
     "unknown settings ['diagonal']"),
])
def test_a_user_module_that_fails_is_bad_input_naming_where(tmp_path, source, error):
    """The user's module is input like a setting: an error in it (or a declaration register_dynamic
    refuses) is exit 2 naming dynamic.module and the line, not a traceback with exit 1."""
    (tmp_path / "broken_option.py").write_text(source)
    out = run_measure("model=micro", "dynamic.module=broken_option", env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert "[dynamic.module]" in out.stderr and error in out.stderr
    assert "broken_option.py, line" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml")))
def test_every_data_set_lives_under_ablate_data(name, monkeypatch, tmp_path):
    """The README's promise, `data under $ABLATE_DATA`, for every data set: one variable moves them
    all (COCO and ADE20K took a relative data/ before, whatever ABLATE_DATA said), and a data set's
    own variable (COCO_ROOT, ADE20K_ROOT), where it has one, still wins."""
    for own in ("COCO_ROOT", "ADE20K_ROOT"):
        monkeypatch.delenv(own, raising=False)
    monkeypatch.setenv("ABLATE_DATA", str(tmp_path))
    root = composed(f"data={name}", config_name="train").data.root
    assert Path(root) == tmp_path or tmp_path in Path(root).parents, f"data={name}: root {root}"
    monkeypatch.setenv("COCO_ROOT", "/coco")
    monkeypatch.setenv("ADE20K_ROOT", "/ade")
    moved = composed(f"data={name}", config_name="train").data.root
    assert moved == {"coco": "/coco", "ade20k": "/ade"}.get(name, root)
