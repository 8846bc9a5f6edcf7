"""Numerical settings of one least-squares half-step, shared by the Spark layer and the block kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass

REGULARIZATIONS = ("count", "constant", "frequency")
CONFIDENCES = ("linear", "log")
SOLVERS = ("cholesky", "cg")


@dataclass(frozen=True)
class SolveParams:
    """Settings of the weighted least-squares solve (Hu, Koren and Volinsky 2008).

    Confidence ``c = 1 + alpha*|r|`` (``linear``) or ``1 + alpha*log(1 + |r|/confidence_epsilon)``
    (``log``); preference ``p = 1 if r > 0 else 0``. The per-entity regularisation ``lambda_u`` is
    ``reg_param * n_u`` (``count``, MLlib's ALS-WR scaling by the count of positive entries),
    ``reg_param`` (``constant``), or ``reg_param * (n_u + frequency_alpha0 * n_src)**frequency_nu``
    (``frequency``, Rendle et al. 2022) where ``n_src`` is the number of entities on the fixed side.
    """

    alpha: float = 1.0
    reg_param: float = 0.1
    regularization: str = "count"
    confidence: str = "linear"
    confidence_epsilon: float = 1.0
    frequency_alpha0: float = 0.1
    frequency_nu: float = 1.0
    solver: str = "cholesky"
    cg_steps: int = 3

    def __post_init__(self) -> None:
        if self.regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {self.regularization!r}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {self.confidence!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        numbers = {"alpha": self.alpha, "reg_param": self.reg_param, "confidence_epsilon": self.confidence_epsilon,
                   "frequency_alpha0": self.frequency_alpha0, "frequency_nu": self.frequency_nu}
        for name, value in numbers.items():
            if not math.isfinite(value):  # NaN passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.alpha < 0 or self.reg_param < 0 or self.cg_steps < 1 or self.confidence_epsilon <= 0:
            raise ValueError("alpha and reg_param must be >= 0, cg_steps >= 1, confidence_epsilon > 0")
        if self.frequency_alpha0 < 0 or self.frequency_nu < 0:
            # alpha0 < 0 can make the base negative, and a negative base to a fractional power is NaN: every
            # factor came out NaN without a word. nu < 0 is refused as by the config (minimum 0).
            raise ValueError(f"frequency_alpha0 and frequency_nu must be >= 0, got {self.frequency_alpha0!r} "
                             f"and {self.frequency_nu!r}")
