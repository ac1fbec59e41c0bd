"""A failure pmap cannot do anything about while it closes is reported, not swallowed
(issue #24): here, a user's async source that raises as it is closed."""
from __future__ import annotations

import asyncio

import pytest

import pmap


async def double(x):
    return 2 * x


def test_a_source_that_raises_as_it_closes_is_reported_and_the_results_stand():
    closed = []

    async def source():
        try:
            for x in range(100):
                yield x
        finally:
            closed.append(True)
            raise ValueError("the source's clean-up failed")

    async def caller():
        async with pmap.aimap(double, source(), workers=2, chunksize=1) as results:
            async for value in results:
                return value

    with pytest.warns(RuntimeWarning, match="closing the source raised ValueError: the source's clean-up failed"):
        first = asyncio.run(caller())
    assert first == 0
    assert closed == [True]


def test_a_source_that_closes_cleanly_warns_nothing(recwarn):
    async def source():
        for x in range(100):
            yield x

    async def caller():
        async with pmap.aimap(double, source(), workers=2, chunksize=1) as results:
            async for value in results:
                return value

    assert asyncio.run(caller()) == 0
    assert not [w for w in recwarn if "closing the source" in str(w.message)]
