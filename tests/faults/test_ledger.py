"""The fault suite's instrument: the ledger counts every kind of delivery error, and says which."""

from __future__ import annotations

import pytest

from tests.faults.ledger import ClientLog, assert_exact, count


def test_an_exact_delivery_counts_all_zero() -> None:
    tally = count(
        {"alice": [1, 2, 5]}, {"a1": ClientLog("alice", 0, [1, 2, 5]), "a2": ClientLog("alice", 2, [5])}
    )
    assert (tally.sent, tally.expected, tally.received) == (3, 4, 4)
    assert tally.exact and assert_exact(tally) is tally


def test_lost_duplicated_out_of_order_and_stray_rows_are_each_counted() -> None:
    sent = {"alice": [1, 2, 3, 4, 5], "bob": [1]}
    received = {
        "lossy": ClientLog("alice", 0, [1, 2, 4]),  # 3 and 5 lost
        "echo": ClientLog("alice", 0, [1, 2, 2, 3, 4, 5, 5]),  # 2 and 5 twice
        "shuffled": ClientLog("alice", 0, [1, 3, 2, 4, 5]),  # 2 after 3
        "snoop": ClientLog("bob", 0, [1, 7]),  # 7 was never bob's
        "stale": ClientLog("alice", 3, [2, 4, 5]),  # 2 is at or below its cursor
    }
    tally = count(sent, received)
    assert (tally.lost, tally.duplicated, tally.out_of_order, tally.unexpected) == (2, 2, 2, 2)
    with pytest.raises(AssertionError) as failure:
        assert_exact(tally)
    message = str(failure.value)
    assert "lost 2, duplicated 2, out of order 2, unexpected 2" in message
    assert "lossy (alice, after 0): lost 3, 5" in message and "snoop (bob, after 0): unexpected 7" in message
