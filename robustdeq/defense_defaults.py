"""Paper 1's defaults of Algorithm 1 (test-time entropy reduction), defined once.

Every T_f steps of the solver the input takes R sign-gradient steps of size beta that lower
the prediction entropy, inside the eps-box around the original input (paper 1, Sec. 3.2,
Eq. 8, Algorithm 1; Appendix A gives T_f = 2, R = 10, beta = 2/255, eps = 8/255). The defense
itself (``defense.py``), the serving options and limits (``serving/options.py``) and the
robustness card's setting names (``card.py``) all take their defaults from here. Torch-free.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Union

__all__ = ["DEFAULT_T_F", "DEFAULT_R", "DEFAULT_BETA", "DEFAULT_EPS", "PAPER_DEFAULTS"]

#: solver steps between two input updates
DEFAULT_T_F = 2
#: entropy-descent steps per input update (Eq. 8)
DEFAULT_R = 10
#: step size of one entropy-descent step, in pixels of [0, 1] images
DEFAULT_BETA = 2 / 255
#: l_inf radius of the input change around the original input
DEFAULT_EPS = 8 / 255
#: the four as one read-only mapping (``T_f``, ``R``, ``beta``, ``eps``)
PAPER_DEFAULTS: Mapping[str, Union[int, float]] = MappingProxyType(
    {"T_f": DEFAULT_T_F, "R": DEFAULT_R, "beta": DEFAULT_BETA, "eps": DEFAULT_EPS}
)
