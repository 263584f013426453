"""Tests for robustdeq.stats against hand-computed values."""

from __future__ import annotations

from fractions import Fraction

import pytest

from robustdeq.stats import (
    McNemarResult,
    Proportion,
    confidence_z,
    correct_string,
    mcnemar,
    normal_ppf,
    parse_correct_string,
    wilson_interval,
)

Z95 = 1.959963984540054  # Phi^-1(0.975)
Z99 = 2.5758293035489004  # Phi^-1(0.995)


def test_z_quantiles():
    assert confidence_z(0.95) == pytest.approx(Z95, abs=1e-12)
    assert confidence_z(0.99) == pytest.approx(Z99, abs=1e-12)
    assert normal_ppf(0.5) == pytest.approx(0.0, abs=1e-15)
    # symmetry, and the tails (Acklam's low/high branches)
    assert normal_ppf(0.025) == pytest.approx(-Z95, abs=1e-12)
    assert normal_ppf(1e-10) == pytest.approx(-6.361340902404056, abs=1e-9)
    assert normal_ppf(1 - 1e-10) == pytest.approx(6.361340902404056, abs=1e-6)  # 1 - 1e-10 itself is rounded
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            normal_ppf(bad)


def test_wilson_41_of_100():
    # z^2 = 3.8414588206941254, p = 0.41, n = 100
    # denom  = 1 + z^2/n                                  = 1.0384145882069413
    # center = (p + z^2/(2n)) / denom = 0.4292072941 / denom = 0.4133294148386286
    # half   = z/denom * sqrt(p(1-p)/n + z^2/(4n^2)) = z/denom * sqrt(0.0025150364705) = 0.0946562846272635
    # -> (0.4133294148 - 0.0946562846, 0.4133294148 + 0.0946562846)
    low, high = wilson_interval(41, 100)
    assert low == pytest.approx(0.3186731302113651, abs=1e-6)
    assert high == pytest.approx(0.5079856994658921, abs=1e-6)


def test_wilson_edges():
    # 0/10: low = 0 exactly; high = (z^2/20 + z*sqrt(z^2/400)) / (1 + z^2/10) = (z^2/10) / 1.38414588 = 0.27753280
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775327998628892, abs=1e-6)
    # 10/10 mirrors it: high = 1 exactly, low = 1 - 0.27753280
    low, high = wilson_interval(10, 10)
    assert high == 1.0
    assert low == pytest.approx(1 - 0.2775327998628892, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("args", [(-1, 10), (11, 10), (5, 10, 0.0), (5, 10, 1.0), (5, 10, 1.5)])
def test_wilson_rejects_bad_input(args):
    with pytest.raises(ValueError):
        wilson_interval(*args)


def test_proportion():
    p = Proportion.of(412, 1000)
    assert p.value == 0.412
    assert (p.low, p.high) == wilson_interval(412, 1000)
    assert p.format() == "41.2% [38.2, 44.3] (n=1000)"
    assert p.format(2).startswith("41.20% [")
    d = p.to_dict()
    assert d == {"acc": 0.412, "correct": 412, "n": 1000, "ci95": [p.low, p.high]}
    assert Proportion.of(0, 0).value == 0.0
    with pytest.raises(AttributeError):
        p.n = 5  # frozen


def test_mcnemar_small_exact():
    # a right & b wrong on 8 samples (b10 = 8), a wrong & b right on 2 (b01 = 2), both right on 5
    a = [1] * 8 + [0] * 2 + [1] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5
    r = mcnemar(a, b)
    assert isinstance(r, McNemarResult)
    assert (r.n, r.a_correct, r.b_correct, r.a_only, r.b_only) == (15, 13, 7, 8, 2)
    # p = 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 1024 = 0.109375
    assert r.p_value == pytest.approx(0.109375, abs=1e-12)
    # chi2 = (|2 - 8| - 1)^2 / 10 = 25 / 10 = 2.5
    assert r.chi2 == pytest.approx(2.5)
    # difference = (7 - 13) / 15 = -0.4
    assert r.difference == pytest.approx(-0.4)
    assert r.to_dict()["p_value"] == r.p_value
    assert r.summary("clean", "tte") == (
        "tte - clean = -40.0 points (clean only 8, tte only 2; exact McNemar p = 0.109, n = 15)"
    )


def test_mcnemar_symmetric_and_no_discordant():
    # b01 = b10 = 3: 2 * P(X <= 3), X ~ Bin(6, 1/2) = 2 * 42/64 > 1 -> 1; chi2 = max(0, 0 - 1)^2 / 6 = 0
    r = mcnemar([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])
    assert r.p_value == 1.0
    assert r.chi2 == 0.0
    r = mcnemar([True, False, True], [True, False, True])
    assert (r.a_only, r.b_only, r.p_value, r.chi2) == (0, 0, 1.0, 0.0)


def test_mcnemar_large_matches_fraction_reference():
    # n = 2000: b01 = 120 (only b right), b10 = 80 (only a right), 1800 both right
    a = [0] * 120 + [1] * 80 + [1] * 1800
    b = [1] * 120 + [0] * 80 + [1] * 1800
    r = mcnemar(a, b)
    assert (r.n, r.a_only, r.b_only) == (2000, 80, 120)
    # reference: P(X <= 80), X ~ Bin(200, 1/2), built from the pmf recursion pmf(k+1) = pmf(k) * (m - k) / (k + 1)
    m, pmf, tail = 200, Fraction(1, 2**200), Fraction(0)
    for k in range(81):
        tail += pmf
        pmf = pmf * (m - k) / (k + 1)
    assert r.p_value == pytest.approx(float(min(Fraction(1), 2 * tail)), abs=1e-6)
    assert r.p_value == pytest.approx(0.0056851559967503, rel=1e-9)
    # chi2 = (40 - 1)^2 / 200 = 7.605
    assert r.chi2 == pytest.approx(7.605)


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError, match="equal length"):
        mcnemar([1, 0, 1], [1, 0])


def test_correct_string_round_trip():
    values = [True, False, 1, 0, 0, True]
    s = correct_string(values)
    assert s == "101001"
    assert parse_correct_string(s) == [True, False, True, False, False, True]
    assert correct_string([]) == "" and parse_correct_string("") == []


def test_parse_correct_string_bad_character():
    with pytest.raises(ValueError, match="'x'"):
        parse_correct_string("10x1")
