"""Small, dependency-free statistics for accuracy reporting.

Wilson score intervals for accuracies, the exact (binomial) McNemar test for comparing two classifiers evaluated on
the same samples, and a compact '0'/'1' string encoding of per-sample correctness vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence

__all__ = [
    "McNemarResult",
    "Proportion",
    "confidence_z",
    "correct_string",
    "mcnemar",
    "normal_ppf",
    "parse_correct_string",
    "wilson_interval",
]

# Coefficients of Acklam's rational approximation to the inverse normal CDF (relative error < 1.15e-9).
_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549671010139868e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
_P_LOW = 0.02425


def normal_ppf(p: float) -> float:
    """Inverse standard normal CDF: Acklam's approximation refined by one Halley step (error well below 1e-9)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_ppf needs 0 < p < 1, got {p!r}")
    if p < _P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        x = (((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]) / (
            (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        )
    elif p <= 1.0 - _P_LOW:
        q = p - 0.5
        r = q * q
        x = (
            (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5])
            * q
            / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0)
        )
    else:
        q = math.sqrt(-2.0 * math.log1p(-p))
        x = -(((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]) / (
            (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        )
    # One Halley step on Phi(x) - p = 0; the upper tail is handled through its complement for precision.
    if p > 0.5:
        err = -(0.5 * math.erfc(x / math.sqrt(2.0)) - (1.0 - p))
    else:
        err = 0.5 * math.erfc(-x / math.sqrt(2.0)) - p
    u = err * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


def confidence_z(confidence: float = 0.95) -> float:
    """Two-sided normal quantile for a confidence level, e.g. 1.959963984540054 for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return normal_ppf(0.5 + 0.5 * confidence)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, clamped to [0, 1]; (0.0, 1.0) when n == 0."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if successes < 0 or n < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = confidence_z(confidence)
    z2 = z * z
    p = successes / n
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return (low, high)


@dataclass(frozen=True)
class Proportion:
    """An observed proportion (e.g. an accuracy) with its Wilson confidence interval."""

    successes: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        """successes / n (0.0 when n == 0)."""
        return self.successes / self.n if self.n else 0.0

    @classmethod
    def of(cls, successes: int, n: int, confidence: float = 0.95) -> Proportion:
        """Build from counts, computing the Wilson interval at the given confidence."""
        low, high = wilson_interval(successes, n, confidence)
        return cls(int(successes), int(n), low, high)

    def to_dict(self) -> dict:
        """JSON-friendly form: {"acc", "correct", "n", "ci95"}."""
        return {"acc": self.value, "correct": self.successes, "n": self.n, "ci95": [self.low, self.high]}

    def format(self, digits: int = 1) -> str:
        """Human form in percent, e.g. '41.2% [38.2, 44.3] (n=1000)'."""
        d = digits
        return f"{100 * self.value:.{d}f}% [{100 * self.low:.{d}f}, {100 * self.high:.{d}f}] (n={self.n})"


def _binom_half_cdf(k: int, n: int) -> Fraction:
    """Exact P(X <= k) for X ~ Binomial(n, 1/2)."""
    return Fraction(sum(math.comb(n, i) for i in range(k + 1)), 1 << n)


@dataclass(frozen=True)
class McNemarResult:
    """Paired comparison of two classifiers on the same samples (a_only: A right & B wrong; b_only: the reverse)."""

    n: int
    a_correct: int
    b_correct: int
    a_only: int
    b_only: int
    p_value: float
    chi2: float

    @property
    def difference(self) -> float:
        """Accuracy difference (B - A) as a fraction (0.0 when n == 0)."""
        return (self.b_correct - self.a_correct) / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        """JSON-friendly form of all fields plus the difference."""
        return {
            "n": self.n,
            "a_correct": self.a_correct,
            "b_correct": self.b_correct,
            "a_only": self.a_only,
            "b_only": self.b_only,
            "difference": self.difference,
            "p_value": self.p_value,
            "chi2": self.chi2,
        }

    def summary(self, name_a: str = "A", name_b: str = "B") -> str:
        """One line, e.g. 'B - A = +1.2 points (A only 30, B only 42; exact McNemar p = 0.194, n = 1000)'."""
        p = f"{self.p_value:.3f}" if self.p_value >= 0.001 else f"{self.p_value:.2e}"
        return (
            f"{name_b} - {name_a} = {100 * self.difference:+.1f} points "
            f"({name_a} only {self.a_only}, {name_b} only {self.b_only}; exact McNemar p = {p}, n = {self.n})"
        )


def mcnemar(a: Sequence[bool | int], b: Sequence[bool | int]) -> McNemarResult:
    """Exact two-sided McNemar test on two per-sample correctness vectors of equal length.

    p = min(1, 2 * P(X <= min(b01, b10))), X ~ Binomial(b01 + b10, 1/2), computed exactly; chi2 is the
    continuity-corrected statistic (|b01 - b10| - 1)^2 / (b01 + b10).
    """
    a = [bool(x) for x in a]
    b = [bool(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"mcnemar needs correctness vectors of equal length, got {len(a)} and {len(b)}")
    b10 = sum(1 for x, y in zip(a, b) if x and not y)
    b01 = sum(1 for x, y in zip(a, b) if y and not x)
    m = b01 + b10
    if m == 0:
        p_value, chi2 = 1.0, 0.0
    else:
        p_value = float(min(Fraction(1), 2 * _binom_half_cdf(min(b01, b10), m)))
        chi2 = max(0, abs(b01 - b10) - 1) ** 2 / m
    return McNemarResult(
        n=len(a), a_correct=sum(a), b_correct=sum(b), a_only=b10, b_only=b01, p_value=p_value, chi2=float(chi2)
    )


def correct_string(values: Iterable[bool | int]) -> str:
    """Encode a per-sample correctness vector as a string of '0'/'1' characters (by truthiness)."""
    return "".join("1" if v else "0" for v in values)


def parse_correct_string(s: str) -> list[bool]:
    """Decode a '0'/'1' string back to a list of bools; ValueError on any other character."""
    out = []
    for i, ch in enumerate(s):
        if ch == "1":
            out.append(True)
        elif ch == "0":
            out.append(False)
        else:
            raise ValueError(f"bad character {ch!r} at position {i} in correctness string (only '0' and '1')")
    return out
