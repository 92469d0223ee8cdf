"""The config schema (ablate/schema.py): every field has a rule, and every field refuses wrong values
with exit 2 and its key named, before anything is built or written.

The property-based test draws, for every field of the training schema, random values its rule
refuses (out of range, of the wrong type, of the wrong length, null where null means nothing) and
composes the config with it as `python -m ablate.train` does, then validates it: the error must be
one the command's error path (ablate.errors.explain) turns into exit 2, and name the key. One drawn
value per kind of rule then goes through the real command line (in this process: ablate.train.cli)
beside a finished record that must come through untouched.
"""
from __future__ import annotations

import math
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ablate.cli import explain
from ablate.config import CONF_DIR, DownstreamConfig, MeasureConfig, TrainConfig
from ablate.reliability import QUICK, BadInput, run_bad_input
from ablate.schema import (
    MEASURE_RULES,
    RULES,
    Choice,
    Enumerated,
    Flag,
    FlagOr,
    Mapping,
    Number,
    Numbers,
    Pattern,
    Text,
    Texts,
    _rules_for,
    config_problems,
    validate_config,
)

TRAIN_RULES = _rules_for(TrainConfig, RULES)
WORD = st.text(string.ascii_lowercase, min_size=1, max_size=8)


def _number_text(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else repr(x)


def wrong_number(rule: Number) -> st.SearchStrategy[str]:
    """Override values a Number rule refuses."""
    options = [st.sampled_from(["nan", "inf", "-inf"]), WORD.map(lambda w: f"x{w}")]
    if rule.low is not None:
        below = st.floats(min_value=1e-3, max_value=1e6).map(lambda d: rule.low - d)
        if rule.integer:
            below = st.integers(1, 10**6).map(lambda d: int(rule.low) - d)
        options.append(below.map(_number_text))
        if rule.low_open:
            options.append(st.just(_number_text(rule.low)))
    if rule.high is not None:
        above = st.floats(min_value=1e-3, max_value=1e6).map(lambda d: rule.high + d)
        options.append(above.map(_number_text))
        if rule.high_open:
            options.append(st.just(_number_text(rule.high)))
    if rule.integer:  # a fraction in range
        options.append(st.integers(max(1, int(rule.low or 1)), 1000).map(lambda n: f"{n}.5"))
    if not rule.nullable:
        options.append(st.just("null"))
    return st.one_of(options)


def wrong_value(rule) -> st.SearchStrategy[str]:
    """Override values (Hydra syntax) that `rule` refuses; a new kind of rule must say its own."""
    if isinstance(rule, Number):
        return wrong_number(rule)
    if isinstance(rule, (Choice, Pattern)):
        refused = WORD.filter(lambda w: not rule.accepts(w))
        return st.one_of(refused, st.just("''"), st.just("[a,b]"))
    if isinstance(rule, Enumerated):
        return WORD.filter(lambda w: not rule.accepts(w))
    if isinstance(rule, Text):
        return st.one_of(st.just("''"), st.just("' '"), st.lists(WORD, min_size=1, max_size=3).map(
            lambda ws: "[" + ",".join(ws) + "]"))
    if isinstance(rule, FlagOr):  # a word that is neither a bool nor one of the modes
        return WORD.filter(lambda w: w not in ("true", "false", "yes", "no", "on", "off", "y", "n")
                           and not rule.accepts(w))
    if isinstance(rule, Flag):
        # (OmegaConf reads an integer as a bool; words it does not know it refuses)
        return WORD.filter(lambda w: w not in ("true", "false", "yes", "no", "on", "off", "y", "n"))
    if isinstance(rule, Numbers):
        each = wrong_number(rule.each).filter(lambda v: v != "null")
        bad_member = each.map(lambda v: f"[{v}]" if rule.max_len in (None, 1) or rule.min_len <= 1
                              else "[" + ",".join([v] * rule.min_len) + "]")
        options = [bad_member, st.just("[]") if rule.min_len >= 1 else st.nothing()]
        if rule.max_len is not None:
            options.append(st.just("[" + ",".join(["0.5"] * (rule.max_len + 1)) + "]"))
        if not rule.or_one:
            options.append(st.just("0.5"))
        return st.one_of(options)
    if isinstance(rule, Texts):
        return st.one_of(st.just("['']"), st.just("abc"))
    if isinstance(rule, Mapping):
        return st.one_of(st.integers(0, 9).map(str), st.just("[a,b]"))
    raise AssertionError(f"no wrong values known for {type(rule).__name__}: add them to this test")


# -- the schema is whole ---------------------------------------------------------------------------
def test_every_field_of_both_schemas_has_a_rule():
    assert len(TRAIN_RULES) >= 70
    measure = _rules_for(MeasureConfig, MEASURE_RULES)
    assert {"img_size", "in_chans", "num_classes", "connectivity.kernel_size"} <= set(measure)
    # and no rule names a field the schemas lack (a renamed field leaves no stale rule behind)
    assert set(RULES) <= set(TRAIN_RULES) | set(_rules_for(DownstreamConfig, RULES))


def test_the_default_config_passes_and_a_wrong_one_lists_every_problem():
    from hydra import compose, initialize_config_dir

    from ablate.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert config_problems(compose("train"), TrainConfig, RULES) == []
        cfg = compose("train", overrides=["optim.lr=0", "optim.betas=[0.9,1.5]", "trainer.device=tpu9"])
    problems = config_problems(cfg, TrainConfig, RULES)
    assert [p.split("=")[0] for p in problems] == ["optim.lr", "optim.betas", "trainer.device"]


# -- every field refuses wrong values ----------------------------------------------------------------
def refusal(override: str) -> str | None:
    """What the command says (the message of its exit 2) when `override` is given; None: accepted."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            validate_config(compose("train", overrides=[*QUICK, override]), TrainConfig)
    except Exception as err:  # noqa: BLE001  whatever it is, the error path must explain it
        message = explain(err)
        assert message is not None, f"{override}: {type(err).__name__} is a traceback, not exit 2: {err}"
        return message
    return None


@pytest.mark.parametrize("key", sorted(TRAIN_RULES))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(data=st.data())
def test_a_wrong_value_of_any_field_is_refused_naming_it(key, data):
    value = data.draw(wrong_value(TRAIN_RULES[key]), label=key)
    message = refusal(f"{key}={value}")
    assert message is not None, f"{key}={value} was accepted"
    assert key in message, f"{key}={value}: the key is not named: {message}"


KINDS = {}  # one field of each kind of rule (the first in the schema's order)
for _key, _rule in TRAIN_RULES.items():
    KINDS.setdefault(type(_rule).__name__ + ("?" if getattr(_rule, "nullable", False) else ""), _key)


@pytest.mark.parametrize("key", sorted(KINDS.values()))
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(data=st.data())
def test_through_the_command_line_exit_2_and_nothing_touched(key, data):
    value = data.draw(wrong_value(TRAIN_RULES[key]), label=key)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_bad_input(BadInput(key, (f"{key}={value}",), (key,)), Path(tmp))
    assert outcome.code == 2, f"{key}={value}: exit {outcome.code}\n{outcome.message[-1500:]}"
    assert key in outcome.message and "Traceback" not in outcome.message, outcome.message[-1500:]
    assert not outcome.touched
