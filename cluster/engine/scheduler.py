"""Which sequences run this step, and how many of their tokens.

One token budget per step (`max_num_batched_tokens`) is shared by decodes (one token each) and
prefill chunks (up to the rest of the budget), so long prompts are chunked and mixed with
decodes. Running sequences go first, in priority/arrival order; waiting ones are admitted while
budget, a GDN slot and KV blocks remain. When a running sequence cannot get a block, the
lowest-priority, newest running sequence is preempted by recompute (its blocks and slot freed,
its tokens fed again later), which may be the sequence itself.
"""
from __future__ import annotations

import bisect
import heapq

from cluster.engine.cache_manager import CacheManager
from cluster.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: list[tuple[tuple, Sequence]] = []        # heap keyed by seq.sort_key
        self.running: list[Sequence] = []                       # sorted by seq.sort_key
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, (seq.sort_key, seq))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of new tokens to feed)], at most the token budget in total."""
        budget = self.max_num_batched_tokens
        scheduled, preempted = self.schedule_running(budget)
        budget -= sum(n for _, n in scheduled)
        if not preempted:
            scheduled += self.admit_waiting(budget)
        return scheduled

    def schedule_running(self, budget: int) -> tuple[list[tuple[Sequence, int]], bool]:
        scheduled, preempted = [], False
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncached_tokens, budget)
            while not self.cache.can_allocate(seq, n):
                preempted = True
                if self.preempt_lowest() is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                self.cache.allocate(seq, n)
                scheduled.append((seq, n))
                budget -= n
        return scheduled, preempted

    def admit_waiting(self, budget: int) -> list[tuple[Sequence, int]]:
        scheduled = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0][1]
            n = min(seq.num_uncached_tokens, budget)
            if not self.cache.can_allocate(seq, n):
                break
            heapq.heappop(self.waiting)
            self.cache.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def preempt_lowest(self) -> Sequence:
        """Preemption policy: recompute the lowest-priority, most recently arrived sequence."""
        victim = self.running.pop()
        self.num_preemptions += 1
        self.cache.free(victim)
        victim.reset_for_recompute()
        self.add(victim)
        return victim

    def finish(self, seq: Sequence) -> None:
        """Free everything a finished or aborted sequence holds, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting = [(k, s) for k, s in self.waiting if s is not seq]
            heapq.heapify(self.waiting)
        self.cache.free(seq)
