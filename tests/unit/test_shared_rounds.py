"""SharedRounds, the one piece behind the coalesced key lookups and the shared page reads: rounds
shared by concurrent askers, never an answer older than its question, failures kept to their
round or key, and an asker that leaves cancels nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from pydist.shared_rounds import SharedRounds


class Source:
    """A fake database: answers key * 10 + the number of the round, and can hold a round."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []
        self.hold: asyncio.Event | None = None
        self.running = asyncio.Event()
        self.fail_round: Exception | None = None
        self.fail_key: dict[int, Exception] = {}

    async def fetch(self, keys: list[int]) -> Mapping[int, int | BaseException]:
        self.rounds.append(keys)
        self.running.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_round is not None:
            exc, self.fail_round = self.fail_round, None
            raise exc
        answers: dict[int, int | BaseException] = {k: k * 10 + len(self.rounds) for k in keys}
        return answers | {k: e for k, e in self.fail_key.items() if k in keys}


async def test_concurrent_askers_share_one_round() -> None:
    source = Source()
    rounds = SharedRounds(source.fetch, name="test")
    answers = await asyncio.gather(*(rounds.ask(k % 3) for k in range(30)))
    assert source.rounds == [[0, 1, 2]]
    assert answers == [(k % 3) * 10 + 1 for k in range(30)]


async def test_an_asker_arriving_during_a_round_waits_for_the_next() -> None:
    source = Source()
    source.hold = asyncio.Event()
    rounds = SharedRounds(source.fetch, name="test")
    early = rounds.ask(7)
    await asyncio.wait_for(source.running.wait(), 5)
    late = rounds.ask(7)  # the round for 7 is already under way: its answer may predate this ask
    source.hold.set()
    assert await asyncio.wait_for(early, 5) == 71
    assert await asyncio.wait_for(late, 5) == 72
    assert source.rounds == [[7], [7]]


async def test_a_failed_round_fails_its_askers_only() -> None:
    source = Source()
    source.hold = asyncio.Event()
    source.fail_round = ConnectionError("database down")
    rounds = SharedRounds(source.fetch, name="test")
    first = [rounds.ask(1), rounds.ask(2)]
    await asyncio.wait_for(source.running.wait(), 5)
    second = rounds.ask(1)
    source.hold.set()
    for future in first:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(future, 5)
    assert await asyncio.wait_for(second, 5) == 12


async def test_an_exception_for_one_key_fails_that_key_only() -> None:
    source = Source()
    source.fail_key = {2: LookupError("no such page")}
    rounds = SharedRounds(source.fetch, name="test")
    one, two = rounds.ask(1), rounds.ask(2)
    assert await one == 11
    with pytest.raises(LookupError):
        await two


async def test_an_asker_that_leaves_cancels_nothing_else() -> None:
    source = Source()
    source.hold = asyncio.Event()
    rounds = SharedRounds(source.fetch, name="test")
    leaving, staying = rounds.ask(5), rounds.ask(5)
    await asyncio.wait_for(source.running.wait(), 5)
    leaving.cancel()
    source.hold.set()
    assert await asyncio.wait_for(staying, 5) == 51
    assert source.rounds == [[5]]


async def test_rounds_take_at_most_max_keys() -> None:
    source = Source()
    rounds = SharedRounds(source.fetch, name="test", max_keys=4)
    answers = await asyncio.gather(*(rounds.ask(k) for k in range(10)))
    assert [len(r) for r in source.rounds] == [4, 4, 2]
    assert sorted(k for r in source.rounds for k in r) == list(range(10))
    assert answers[9] == 93


async def test_a_missing_answer_is_a_key_error_not_a_hang() -> None:
    async def forgetful(keys: list[int]) -> Mapping[int, int | BaseException]:
        return {}

    rounds = SharedRounds(forgetful, name="test")
    with pytest.raises(KeyError):
        await asyncio.wait_for(rounds.ask(1), 5)


async def test_cancelling_the_runner_cancels_every_waiting_asker() -> None:
    source = Source()
    source.hold = asyncio.Event()
    rounds = SharedRounds(source.fetch, name="test")
    asked = rounds.ask(1)
    await asyncio.wait_for(source.running.wait(), 5)
    queued = rounds.ask(2)
    assert rounds._runner is not None
    rounds._runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asked
    assert queued.cancelled()
    # and the next ask starts a new runner
    source.hold.set()
    assert await asyncio.wait_for(rounds.ask(3), 5) == 32
