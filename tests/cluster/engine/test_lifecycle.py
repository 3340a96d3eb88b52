"""Resources come back: many requests with random aborts leave every block and slot free;
priorities order admission; the async service streams and aborts on cancellation."""
from __future__ import annotations

import asyncio
import random

from cluster.engine import AsyncEngine, SamplingParams
from tests.cluster.engine.conftest import run_all


def test_thousand_requests_with_random_aborts_free_everything(tiny):
    rng = random.Random(0)
    engine = tiny.engine(num_blocks=12, block_size=4, max_num_seqs=32, max_num_batched_tokens=256)
    finished, aborted = 0, 0
    for i in range(1000):
        prompt = [rng.randrange(1, 240000) for _ in range(rng.randint(1, 12))]
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=rng.randint(1, 3), temperature=0))
        if i % 24 == 23:
            finished += sum(out.finished for out in engine.step())
        if rng.random() < 0.3:                      # abort a live request, waiting or running
            aborted += engine.abort(rng.choice(sorted(engine.requests))) is not None
    finished += len(run_all(engine))
    assert finished + aborted == 1000 and aborted > 200
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    assert engine.cache.num_free_slots == engine.cache.num_slots
    assert sorted(engine.cache.free_blocks) == list(range(engine.cache.num_blocks))
    assert not engine.requests and not engine.has_unfinished()


def test_priority_orders_admission(tiny):
    engine = tiny.engine(max_num_seqs=1)
    for rid, prio in (("late-low", 5), ("high", -1), ("mid", 0)):
        engine.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=2), priority=prio)
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "mid", "late-low"]


def test_async_streams_deltas_and_cancellation_aborts(tiny):
    engine = tiny.engine()
    service = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def scenario():
        deltas, ids, last = [], [], None
        async for out in service.generate([11, 22, 33], params):
            deltas.append(out.outputs[0].delta_text)
            ids += out.outputs[0].delta_token_ids
            last = out
        stream = service.generate([44, 55], SamplingParams(max_tokens=50, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()                              # the consumer goes away
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not engine.has_unfinished():
                break
        return deltas, ids, last

    deltas, ids, last = asyncio.run(scenario())
    assert last.finished and "".join(deltas) == last.outputs[0].text
    assert ids == last.outputs[0].token_ids and len(ids) == 8
    assert not engine.has_unfinished()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
