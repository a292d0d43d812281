"""The books of a fault test: which seqs were sent to each user, which each client received, and the counts.

A client expects every row of its user with a seq above the cursor it first connected with, exactly once and
in increasing order, across all its reconnections. `count` turns what was sent and what was received into
sent / expected / received / lost / duplicated / out of order / unexpected; `assert_exact` fails with a
readable account when any of the last four is not zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# How many seqs of one kind a failure message lists per client.
SHOWN = 8


@dataclass
class ClientLog:
    """What one logical client (all its connections together) received, in arrival order."""

    user: str
    after: int = 0  # the cursor of its first connection: rows up to it are not owed to this client
    seqs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Tally:
    """The counts a fault test ends with."""

    sent: int  # rows committed for the users of the test
    expected: int  # deliveries owed: each client's share of the sent rows
    received: int  # row events received by all clients
    lost: int  # owed, never received
    duplicated: int  # received again after the first time
    out_of_order: int  # received after a larger seq, the first time
    unexpected: int  # received but never sent to that client's user (or at or below its first cursor)
    problems: tuple[str, ...] = ()  # per-client details of any non-zero count

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.out_of_order or self.unexpected)

    def __str__(self) -> str:
        return (
            f"sent {self.sent} rows, expected {self.expected} deliveries, received {self.received}: "
            f"lost {self.lost}, duplicated {self.duplicated}, out of order {self.out_of_order}, "
            f"unexpected {self.unexpected}"
        )


def _sample(seqs: Iterable[int]) -> str:
    listed = sorted(seqs)
    more = f" … (+{len(listed) - SHOWN})" if len(listed) > SHOWN else ""
    return ", ".join(map(str, listed[:SHOWN])) + more


def count(sent: Mapping[str, Iterable[int]], received: Mapping[str, ClientLog]) -> Tally:
    """The tally of `received` (client name → its log) against `sent` (user → committed seqs)."""
    sent_sets = {user: set(seqs) for user, seqs in sent.items()}
    total_sent = sum(len(seqs) for seqs in sent_sets.values())
    expected = received_total = lost = duplicated = out_of_order = unexpected = 0
    problems: list[str] = []
    for name, log in sorted(received.items()):
        owed = {seq for seq in sent_sets.get(log.user, set()) if seq > log.after}
        seen: set[int] = set()
        dups: list[int] = []
        late: list[int] = []
        highest = log.after
        for seq in log.seqs:
            if seq in seen:
                dups.append(seq)
                continue
            seen.add(seq)
            if seq < highest:
                late.append(seq)
            highest = max(highest, seq)
        missing = owed - seen
        strays = seen - owed
        expected += len(owed)
        received_total += len(log.seqs)
        lost += len(missing)
        duplicated += len(dups)
        out_of_order += len(late)
        unexpected += len(strays)
        for what, seqs in (
            ("lost", missing),
            ("duplicated", dups),
            ("out of order", late),
            ("unexpected", strays),
        ):
            if seqs:
                problems.append(f"{name} ({log.user}, after {log.after}): {what} {_sample(seqs)}")
    return Tally(
        total_sent, expected, received_total, lost, duplicated, out_of_order, unexpected, tuple(problems)
    )


def assert_exact(tally: Tally) -> Tally:
    """Fail with the counts and the first problems unless nothing was lost, duplicated, late or stray."""
    if not tally.exact:
        details = "\n  ".join(tally.problems[:20])
        raise AssertionError(f"{tally}\n  {details}")
    return tally


@dataclass
class Ledger:
    """Collects a test's sends and clients as they happen, then counts them."""

    sent: dict[str, list[int]] = field(default_factory=dict)
    clients: dict[str, ClientLog] = field(default_factory=dict)

    def record_sent(self, user: str, seq: int) -> None:
        self.sent.setdefault(user, []).append(seq)

    def client(self, name: str, user: str, after: int = 0) -> ClientLog:
        log = self.clients[name] = ClientLog(user, after)
        return log

    def owed(self, log: ClientLog) -> int:
        return sum(1 for seq in self.sent.get(log.user, ()) if seq > log.after)

    def caught_up(self) -> bool:
        """Every client holds at least as many rows as it is owed (the moment to stop waiting and count)."""
        return all(len(set(log.seqs)) >= self.owed(log) for log in self.clients.values())

    async def settle(self, within: float, quiet: float = 0.3) -> None:
        """Wait (at most `within` s) until every client holds its rows, then `quiet` s for late duplicates.

        Never raises: the count that follows reports a shortfall as lost rows, which says more than a timeout.
        """
        deadline = time.monotonic() + within
        while not self.caught_up():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(quiet)

    def tally(self) -> Tally:
        return count(self.sent, self.clients)

    def assert_exact(self) -> Tally:
        return assert_exact(self.tally())
