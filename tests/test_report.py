"""The report's verdicts: Welch's test against scipy's, and the three-way rule."""
import numpy as np
import pytest
from scipy import stats

from tools import report


def stat(x):
  return report.Stat(float(np.mean(x)), float(np.std(x, ddof=1)), len(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_one_sided_equals_scipy(seed):
  rng = np.random.default_rng(seed)
  a, b = rng.normal(80, 3, 5), rng.normal(78, 6, 7)
  t, p = report.greater(stat(a), stat(b))
  want = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
  assert t == pytest.approx(want.statistic, rel=1e-9)
  assert p == pytest.approx(want.pvalue, rel=1e-9)
  # a margin is a shift of a: the same test on a - margin
  t2, p2 = report.greater(stat(a), stat(b), margin=1.5)
  want2 = stats.ttest_ind(a - 1.5, b, equal_var=False, alternative="greater")
  assert p2 == pytest.approx(want2.pvalue, rel=1e-9)


def test_three_way_verdicts():
  clear = report.rule_greater(report.Stat(90, 1, 5), report.Stat(80, 1, 5))
  opposite = report.rule_greater(report.Stat(80, 1, 5), report.Stat(90, 1, 5))
  noisy = report.rule_greater(report.Stat(80.5, 4.4, 5), report.Stat(79.5, 2.5, 5))
  assert (clear[0], opposite[0], noisy[0]) == ("yes", "no", "within noise")
  assert report.rule_within(report.Stat(80, 1, 5), report.Stat(80.5, 1, 5), 3.0)[0] == "yes"
  assert report.rule_within(report.Stat(70, 1, 5), report.Stat(80, 1, 5), 3.0)[0] == "no"
  assert report._lt_ratio(report.Stat(20, 2, 5), report.Stat(95, 1, 5), 0.3)[0] == "yes"
  assert report._more_spread(report.Stat(0, 10, 100), report.Stat(0, 1, 12))[0] == "yes"
  assert report.rule_all([clear, noisy])[0] == "within noise"
  assert report.rule_all([clear, opposite, noisy])[0] == "no"
