import math

import pytest

from fedtune.client.schedule import round_lr


def test_constant():
    assert [round_lr(r, 5, 1e-3) for r in range(1, 6)] == [1e-3] * 5


def test_linear_and_cosine_hit_both_ends():
    assert round_lr(1, 5, 1.0, "linear", 0.0) == 1.0
    assert round_lr(3, 5, 1.0, "linear", 0.0) == pytest.approx(0.5)
    assert round_lr(5, 5, 1.0, "linear", 0.2) == pytest.approx(0.2)
    assert round_lr(1, 5, 1.0, "cosine", 0.0) == pytest.approx(1.0)
    assert round_lr(2, 5, 1.0, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert round_lr(5, 5, 1.0, "cosine", 0.1) == pytest.approx(0.1)
    assert round_lr(1, 1, 1.0, "cosine") == 1.0
