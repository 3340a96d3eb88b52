"""Back-pressure inside one replica: so many requests in the engine, so many waiting, no more.

Beyond `max_ongoing + max_queued` a request is answered at once with 503 and `Retry-After`
(an OpenAI error body), instead of piling up in memory.
"""
from __future__ import annotations

import asyncio

from cluster.api import APIError


class Admission:
    def __init__(self, max_ongoing: int, max_queued: int, retry_after: int):
        self.max_ongoing, self.max_queued, self.retry_after = max_ongoing, max_queued, retry_after
        self.places = asyncio.Semaphore(max_ongoing)
        self.queued = 0

    async def enter(self) -> None:
        """Take a place in the engine, waiting in the queue if there is room in it."""
        if self.places.locked() and self.queued >= self.max_queued:
            raise APIError(503, f"server is at capacity ({self.max_ongoing} requests running, "
                                f"{self.queued} queued); retry later", code="server_overloaded",
                           retry_after=self.retry_after)
        self.queued += 1
        try:
            await self.places.acquire()
        finally:
            self.queued -= 1

    def leave(self) -> None:
        self.places.release()
