"""fGPU units: parsing user amounts into integer quanta."""
from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from bai_scheduler.core.units import MAX_MAGNITUDE, FgpuError, FgpuUnits, NumberError, format_bytes, parse_number

U = FgpuUnits(fgpu_per_gpu=2, fgpu_step=Decimal("0.5"))


def test_half_fgpu_is_one_quantum():
    assert U.quanta_per_gpu == 4
    assert U.to_quanta("0.5") == 1
    assert U.to_quanta("1") == 2
    assert U.to_quanta(2) == 4
    assert U.to_quanta(" 1.5 ") == 3


def test_zero_is_cpu_only():
    assert U.to_quanta(0) == 0
    assert U.to_quanta("0") == 0


@pytest.mark.parametrize(
    "amount, words",
    [
        ("-1", "negative"),
        (-0.5, "negative"),
        ("NaN", "finite"),
        ("nan", "finite"),
        ("inf", "finite"),
        ("-Infinity", "finite"),
        ("0.3", "not a whole number of steps"),
        ("0.25", "not a whole number of steps"),
        ("abc", "must be a number"),
        ("", "must be a number"),
        (None, "must be a number"),
        (True, "must be a number"),
        ([1], "must be a number"),
    ],
)
def test_refusals_say_why_and_state_the_step(amount, words):
    with pytest.raises(FgpuError) as e:
        U.to_quanta(amount, max_quanta=4)
    msg = str(e.value)
    assert words in msg
    assert "steps of 0.5 fGPU" in msg
    assert "at most 2 fGPU" in msg


def test_too_large_states_max():
    with pytest.raises(FgpuError, match=r"more than allowed \(steps of 0.5 fGPU, at most 2 fGPU\)"):
        U.to_quanta("2.5", max_quanta=4)
    assert U.to_quanta("2", max_quanta=4) == 4


def test_fgpu_error_is_value_error():
    assert issubclass(FgpuError, ValueError)


def test_bad_unit_config():
    with pytest.raises(ValueError):
        FgpuUnits(fgpu_per_gpu=0)
    with pytest.raises(ValueError):
        FgpuUnits(fgpu_per_gpu=1, fgpu_step=Decimal("0.3"))
    with pytest.raises(ValueError):
        FgpuUnits(fgpu_per_gpu=1, fgpu_step=Decimal("-0.5"))


def test_to_fgpu_and_helpers():
    assert U.to_fgpu(1) == "0.5"
    assert U.to_fgpu(4) == "2"
    assert U.to_fgpu(0) == "0"
    assert U.memory_bytes(1, 8 * 1024**3) == 2 * 1024**3
    assert U.sm_percent(1) == 25
    assert U.gpu_fraction(6) == 1.5
    assert format_bytes(2 * 1024**3) == "2 GiB"
    assert format_bytes(3 * 1024**3 // 2) == "1.5 GiB"


def test_tenth_steps_are_exact():
    u = FgpuUnits(fgpu_per_gpu=10, fgpu_step=Decimal(1))
    assert u.quanta_per_gpu == 10
    u = FgpuUnits(fgpu_per_gpu=1, fgpu_step=Decimal("0.1"))
    assert u.to_quanta("0.3") == 3  # exact in Decimal, 0.30000000000000004 in float
    assert u.to_quanta(0.3) == 3


@given(st.integers(min_value=0, max_value=10_000))
def test_round_trip(quanta):
    assert U.to_quanta(U.to_fgpu(quanta)) == quanta


@given(st.integers(min_value=0, max_value=100), st.integers(min_value=0, max_value=100))
def test_max_quanta_is_enforced(quanta, limit):
    text = U.to_fgpu(quanta)
    if quanta <= limit:
        assert U.to_quanta(text, max_quanta=limit) == quanta
    else:
        with pytest.raises(FgpuError):
            U.to_quanta(text, max_quanta=limit)


@given(st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=0, max_value=100))
def test_non_multiples_are_refused(value):
    steps = value / U.fgpu_step
    if steps == steps.to_integral_value():
        assert U.to_quanta(str(value)) == int(steps)
    else:
        with pytest.raises(FgpuError, match="whole number of steps"):
            U.to_quanta(str(value))


# Values that once cost seconds (int() of a Decimal with a huge exponent) or raised
# decimal.Overflow / went through as 0 (an underflow): each is refused by its text.
HOSTILE = ["1e300000", "1e999999", "1e1000000", "-1e1000000", "1e-1000000", "9" * 5000, "0." + "0" * 5000 + "1",
           "1e19", "1e-19", 10**4000, 10**19, 1e308, 1e-300]


@pytest.mark.parametrize("amount", HOSTILE, ids=lambda a: str(a)[:12])
def test_huge_and_tiny_amounts_are_refused_as_out_of_range(amount):
    with pytest.raises(FgpuError) as e:
        U.to_quanta(amount, max_quanta=4)
    assert "negative" in str(e.value) or "out of range" in str(e.value)
    assert len(str(e.value)) < 200  # the value is quoted cut short


@pytest.mark.parametrize("text", ["\u0661", "1_0", "0x1", "1e", ".", "+", "1.2.3", " ", "1e+", "١٫٥", "½", "1 0"])
def test_only_plain_ascii_decimals_are_numbers(text):
    with pytest.raises(NumberError) as e:
        parse_number(text)
    assert e.value.kind == "number"


def test_plain_numbers_parse_exactly():
    assert parse_number(" 0.5 ") == Decimal("0.5")
    assert parse_number("-2.50e1") == Decimal(-25)
    assert parse_number("0e999999") == 0
    assert parse_number(3) == 3 and parse_number(0.25) == Decimal("0.25") and parse_number(Decimal(2)) == 2
    assert parse_number("1e18") == Decimal("1e18") and parse_number(".5") == Decimal("0.5")
    for kind, raw in (("finite", "-Infinity"), ("finite", "sNaN"), ("finite", float("inf")),
                      ("number", None), ("number", True), ("number", [1]), ("range", "1" * 41)):
        with pytest.raises(NumberError) as e:
            parse_number(raw)
        assert e.value.kind == kind, raw


@given(st.one_of(st.text(max_size=60), st.integers(), st.floats(), st.decimals()))
def test_every_number_is_bounded_or_refused(raw):
    try:
        value = parse_number(raw)
    except NumberError as e:
        assert e.kind in ("number", "finite", "range")
    else:
        assert value.is_finite()
        assert value == 0 or -MAX_MAGNITUDE <= value.adjusted() <= MAX_MAGNITUDE


@pytest.mark.parametrize("amount, shown", [("1e9", "1000000000"), (1e9, "1000000000"), ("200", "200"),
                                           ("1E+2", "100"), ("2.50", "2.5")])
def test_amounts_in_messages_are_in_plain_notation(amount, shown):
    """Review finding 5: '1E+9 fGPU is more than allowed', '2E+2 fGPU ...'."""
    with pytest.raises(FgpuError) as e:
        U.to_quanta(amount, max_quanta=4)
    assert str(e.value).startswith(f"{shown} fGPU is more than allowed")
    assert "E+" not in str(e.value)
