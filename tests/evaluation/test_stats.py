import math

import pytest

from ircan_serve.evaluation.stats import mcnemar, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-4) and math.isclose(hi, 0.5962, abs_tol=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and math.isclose(wilson_interval(10, 10)[1], 1.0)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mcnemar_exact_against_binomial():
    # 10 discordant rows split 9 / 1: two-sided p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 22 / 1024
    a = [True] * 1 + [False] * 9 + [True] * 5
    b = [False] * 1 + [True] * 9 + [True] * 5
    t = mcnemar(a, b)
    assert (t.a_only, t.b_only) == (1, 9) and math.isclose(t.p_value, 22 / 1024)
    assert math.isclose(t.difference, 8 / 15)
    assert mcnemar(a, a).p_value == 1.0
    assert mcnemar([True, False], [False, True]).p_value == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
