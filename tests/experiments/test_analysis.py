"""Routing analysis: the correlations of routing depth with prediction entropy."""

import math

from modlm.experiments.analysis import pearson, spearman


def test_correlations():
    xs = [1, 2, 3, 4, 5]
    assert math.isclose(pearson(xs, [2 * x + 1 for x in xs]), 1.0)
    assert math.isclose(spearman(xs, [x**3 for x in xs]), 1.0)  # monotone, not linear
    assert math.isclose(spearman([0, 0, 1, 1], [1, 2, 3, 4]), pearson([0.5, 0.5, 2.5, 2.5], [0, 1, 2, 3]))  # ties
