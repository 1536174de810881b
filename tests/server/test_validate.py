import pytest
import torch

from fedtune.server.validate import validate_updates
from fedtune.types import ClientUpdate

GLOBAL = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}


def update(cid, scale=1.0, n=10, **replace):
    delta = {"a": torch.full((2, 2), 0.5 * scale), "b": torch.zeros(3)}  # ||delta|| = sqrt(4 * 0.25) * scale = scale
    delta.update(replace)
    return ClientUpdate(cid, n, delta)


def reasons(rejected):
    return {r.client_id: r.reason for r in rejected}


def test_good_updates_are_accepted_in_client_order_with_their_norms():
    accepted, rejected, norms = validate_updates(GLOBAL, [update(2), update(0, 2.0), update(1)], norm_bound_factor=10.0)
    assert [u.client_id for u in accepted] == [0, 1, 2] and rejected == []
    assert norms == pytest.approx({0: 2.0, 1: 1.0, 2: 1.0})


@pytest.mark.parametrize("bad, reason", [
    ({"a": torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])}, "tensor a has NaN or Inf values"),
    ({"b": torch.tensor([0.0, float("inf"), 0.0])}, "tensor b has NaN or Inf values"),
    ({"b": torch.zeros(4)}, "tensor b is (4,) torch.float32, expected (3,) torch.float32"),
    ({"b": torch.zeros(3, dtype=torch.float64)}, "tensor b is (3,) torch.float64, expected (3,) torch.float32"),
    ({"c": torch.zeros(1)}, "adapter keys differ (missing [], unexpected ['c'])"),
])
def test_broken_updates_are_rejected_with_the_reason(bad, reason):
    accepted, rejected, _ = validate_updates(GLOBAL, [update(0), update(1, **bad), update(2)], norm_bound_factor=None)
    assert [u.client_id for u in accepted] == [0, 2]
    assert reasons(rejected) == {1: reason}


def test_missing_tensor_negative_examples_and_second_answer_are_rejected():
    missing = ClientUpdate(3, 10, {"a": torch.zeros(2, 2)})
    accepted, rejected, _ = validate_updates(GLOBAL, [update(0), update(1, n=-1), update(0), missing], norm_bound_factor=None)
    assert [u.client_id for u in accepted] == [0]
    got = reasons(rejected)
    assert got[1] == "num_examples must be a non-negative integer, got -1"
    assert got[3] == "adapter keys differ (missing ['b'], unexpected [])"
    assert [r.client_id for r in rejected].count(0) == 1 and "second update" in [r.reason for r in rejected if r.client_id == 0][0]


def test_oversized_update_is_rejected_against_the_median_norm():
    # norms 1, 1.5, 2, 25: median 1.75, bound 10 x 1.75 = 17.5 -> only the 25 goes
    ups = [update(0, 1.0), update(1, 1.5), update(2, 2.0), update(3, 25.0)]
    accepted, rejected, norms = validate_updates(GLOBAL, ups, norm_bound_factor=10.0)
    assert [u.client_id for u in accepted] == [0, 1, 2]
    assert reasons(rejected) == {3: "update norm 25 is above privacy.norm_bound_factor=10 x the round's median norm 1.75 (= 17.5)"}
    assert norms[3] == pytest.approx(25.0)
    accepted, rejected, _ = validate_updates(GLOBAL, ups, norm_bound_factor=None)  # no bound (DP: clipping bounds)
    assert len(accepted) == 4 and rejected == []


def test_norm_bound_is_taken_over_structurally_valid_updates_only():
    nan = {"a": torch.full((2, 2), float("nan"))}
    accepted, rejected, _ = validate_updates(GLOBAL, [update(0), update(1), update(2, **nan)], norm_bound_factor=1.5)
    assert [u.client_id for u in accepted] == [0, 1] and list(reasons(rejected)) == [2]
