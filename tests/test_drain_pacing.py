"""sync/drain.py `gather_wait`: while a burst trickles in, the drain's passes gather what arrived instead of
running back to back for a few changes each; a lone change, a slow trickle and a backlog never wait."""

from __future__ import annotations

import pytest

from sync.drain import BATCH, GATHER_MIN, GATHER_SECONDS, gather_wait


@pytest.mark.parametrize("found", [0, 1, 2, GATHER_MIN - 1])
def test_a_lone_change_or_a_slow_trickle_is_followed_at_once(found: int) -> None:
    assert gather_wait(found, 0.0) == 0.0


def test_a_full_pass_is_a_backlog_and_the_next_follows_at_once() -> None:
    assert gather_wait(BATCH, 0.0) == 0.0


@pytest.mark.parametrize(("found", "took", "wait"), [
    (GATHER_MIN, 0.0, GATHER_SECONDS),
    (300, 0.2, GATHER_SECONDS - 0.2),  # the pass's own time counts towards the wait
    (BATCH - 1, GATHER_SECONDS, 0.0),
    (BATCH - 1, 3.0, 0.0),  # a slow pass is never followed by a wait on top
])
def test_a_busy_pass_is_followed_no_sooner_than_gather_seconds_after_it_began(found: int, took: float,
                                                                              wait: float) -> None:
    assert gather_wait(found, took) == pytest.approx(wait)
