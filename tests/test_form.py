"""Spawn form / user_options parsing as plain functions."""
import dataclasses
import json
from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from bai_scheduler.contract.options import FormError, Limits, describe_share, parse_options
from bai_scheduler.core.units import FgpuUnits

UNITS = FgpuUnits(2, "0.5")
LIMITS = Limits(max_quanta=4, max_cpu=Decimal(4), max_memory_gib=Decimal(16), default_cpu=Decimal(1),
                default_memory_gib=Decimal(2), max_sessions=8, presets=(), custom=True)


def test_form_lists_and_rest_values_parse_the_same():
    form = {"image": ["bai/sklearn:1.6.1"], "fgpu": ["0.5"], "cpu": ["2"], "memory": ["4"], "sessions": ["3"]}
    rest = {"image": "bai/sklearn:1.6.1", "fgpu": 0.5, "cpu": 2, "memory": 4, "sessions": 3}
    a, b = parse_options(form, UNITS, LIMITS), parse_options(rest, UNITS, LIMITS)
    assert a == b
    assert (a.quanta, a.cpu_millis, a.memory_bytes, a.sessions) == (1, 2000, 4 * 1024**3, 3)


def test_typed_image_name_wins_over_the_picker():
    opts = parse_options({"image": "bai/a:1", "image_name": " bai-private/u:x "}, UNITS, LIMITS)
    assert opts.image == "bai-private/u:x"


def test_round_trip_of_parsed_options():
    opts = parse_options({"image": "i", "fgpu": "1.5", "cpu": "0.5", "memory": "1"}, UNITS, LIMITS)
    assert parse_options(opts.to_user_options(), UNITS, LIMITS) == opts


@pytest.mark.parametrize("field, value, message", [
    ("fgpu", "0.3", "steps of 0.5"),
    ("fgpu", "-0.5", "negative"),
    ("fgpu", "nan", "finite"),
    ("fgpu", "inf", "finite"),
    ("fgpu", "2.5", "at most 2"),
    ("fgpu", "lots", "number"),
    ("cpu", "0", "from 0.1 to 4"),
    ("cpu", "NaN", "CPU"),
    ("memory", "100", "from 0.25 to 16"),
    ("sessions", "0", "from 1 to 8"),
    ("sessions", "1.5", "whole number"),
    ("image", "", "Choose an image"),
    ("image", "a b", "not a valid image"),
    ("surprise", "1", "Unknown field"),
])
def test_bad_values_say_what_is_allowed(field, value, message):
    data = {"image": "bai/sklearn:1.6.1", "fgpu": "1", field: value}
    with pytest.raises(FormError, match=message):
        parse_options(data, UNITS, LIMITS)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.integers(),
                 st.none(), st.booleans(), st.lists(st.integers(), max_size=3)))
def test_any_fgpu_value_is_parsed_or_refused_with_form_error(value):
    try:
        opts = parse_options({"image": "i", "fgpu": value}, UNITS, LIMITS)
    except FormError as e:
        assert str(e)
    else:
        assert 0 <= opts.quanta <= LIMITS.max_quanta


def test_describe_share_mirrors_the_seed():
    assert describe_share(1, UNITS, 8 * 1024**3) == "0.5 fGPU = 2 GiB GPU memory, 25% of SMs"
    assert describe_share(6, UNITS, 8 * 1024**3) == "3 fGPU = 1 whole GPU + 4 GiB GPU memory, 50% of SMs"
    assert describe_share(0, UNITS, 8 * 1024**3) == "0 fGPU = CPU only"


def test_limits_have_one_source_and_travel_as_json():
    # No defaults in the contract: the scheduler's options are the only source of every limit.
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(Limits))
    assert Limits.from_json(json.loads(json.dumps(LIMITS.to_json()))) == LIMITS
    assert LIMITS.to_json()["max_cpu"] == "4"


@pytest.mark.parametrize("field", ["fgpu", "cpu", "memory", "sessions"])
@pytest.mark.parametrize("value", ["1e999999", "1e1000000", "-1e1000000", "1e-1000000", "9" * 5000, 10**4000, 1e308])
def test_huge_numbers_in_any_field_are_form_errors(field, value):
    with pytest.raises(FormError, match={"fgpu": "fGPU", "cpu": "CPU", "memory": "Memory",
                                         "sessions": "Sessions"}[field]):
        parse_options({"image": "i", "fgpu": "0", field: value}, UNITS, LIMITS)


@pytest.mark.parametrize("extra", [{"image_name": "bai/other:1"}, {"fgpu": "1"}, {"cpu": "1"}, {"memory": "1"}])
def test_parsed_options_cannot_be_mixed_with_form_fields(extra):
    parsed = {"image": "i", "quanta": 0, "cpu_millis": 500, "memory_bytes": 1024**3}
    with pytest.raises(FormError, match="not both"):
        parse_options({**parsed, **extra}, UNITS, LIMITS)
    with pytest.raises(FormError, match="non-negative integer"):
        parse_options({**parsed, "quanta": 2**60}, UNITS, LIMITS)


def test_the_form_shown_again_after_a_refusal_survives_huge_values():
    from bai_scheduler.contract.form import chosen_shape

    values = {"fgpu": "1e1000000", "sessions": "9" * 5000, "cpu": "1e999999"}
    assert chosen_shape(values, UNITS, LIMITS) == (1, 1)  # the form's defaults
