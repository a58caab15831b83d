import numpy as np
import pytest

from kvmas.errors import BadInputError
from kvmas.stats import McNemar, bootstrap_ci, mcnemar_exact, paired_bootstrap, wilson


def test_wilson_known_values_and_edges():
    lo, hi = wilson(5, 20)
    assert abs(lo - 0.1119) < 1e-3 and abs(hi - 0.4687) < 1e-3
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(BadInputError):
        wilson(3, 2)


def test_bootstrap_ci_contains_mean_and_is_seeded():
    x = np.array([1] * 30 + [0] * 70)
    lo, hi = bootstrap_ci(x, seed=3)
    assert lo < 0.3 < hi and 0.18 < lo and hi < 0.42
    assert bootstrap_ci(x, seed=3) == (lo, hi)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    with pytest.raises(BadInputError):
        bootstrap_ci([])


def test_mcnemar_exact():
    r = mcnemar_exact([1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1])
    assert (r.a_only, r.b_only) == (6, 1)
    assert abs(r.p_value - 0.125) < 1e-12  # 2 * (1 + 7) / 128
    assert mcnemar_exact([1, 0], [1, 0]).p_value == 1.0
    with pytest.raises(BadInputError):
        mcnemar_exact([1], [1, 0])


def test_paired_bootstrap():
    a = [1] * 20 + [0] * 20
    b = [0] * 20 + [0] * 20
    d = paired_bootstrap(a, b, seed=0)
    assert d.diff == 0.5 and d.lo > 0.3 and d.hi < 0.7
    same = paired_bootstrap(a, a)
    assert same.diff == same.lo == same.hi == 0.0


def test_mcnemar_from_counts_equals_paired_outcomes():
    assert McNemar.from_counts(0, 0).p_value == 1.0 and McNemar.from_counts(5, 5).p_value == 1.0
    assert abs(McNemar.from_counts(10, 2).p_value - 0.03857) < 1e-4
    assert McNemar.from_counts(6, 1) == mcnemar_exact([1] * 6 + [0, 0], [0] * 6 + [0, 1])
