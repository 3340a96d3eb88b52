"""The engine as an asyncio service: many concurrent `generate` streams over one step loop.

Steps run in a worker thread so the event loop stays responsive; adds and aborts are queued
and applied by the loop between steps, so the engine itself is only ever touched by one
thread at a time. Validation runs at once in `generate` (a prompt's images are decoded in a
worker thread), so a bad request raises before any output and before it reaches the engine.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from cluster.engine.engine import Engine, PromptInput
from cluster.engine.output import RequestOutput
from cluster.engine.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.streams: dict[str, asyncio.Queue] = {}
        self.pending_adds: list = []
        self.pending_aborts: list[str] = []
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        self.ids = itertools.count()

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str | None = None, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput each step the request makes progress; the last has finished=True.

        Leaving the loop early (break, cancellation, disconnect) aborts the request.
        """
        request_id = request_id if request_id is not None else f"async-{next(self.ids)}"
        if request_id in self.streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        queue = self.streams[request_id] = asyncio.Queue()
        try:
            req = await self.new_request(request_id, prompt, params, priority)
        except BaseException:
            self.streams.pop(request_id, None)
            raise
        self.pending_adds.append(req)
        self.start()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def new_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                          priority: int):
        """Validate; decoding and preprocessing images runs in a thread, off the event loop."""
        if isinstance(prompt, dict) and (prompt.get("images") or prompt.get("videos")):
            return await asyncio.to_thread(self.engine.new_request, request_id, prompt, params,
                                           priority)
        return self.engine.new_request(request_id, prompt, params, priority)

    def abort(self, request_id: str) -> None:
        self.pending_aborts.append(request_id)
        self.wake.set()

    def start(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self.run_loop())
        self.wake.set()

    async def run_loop(self) -> None:
        while True:
            self.apply_pending()
            if not self.engine.has_unfinished():
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                outs = await asyncio.to_thread(self.engine.step)
            except Exception as e:           # the model failed: every open stream gets the error
                self.fail_all(e)
                continue
            for out in outs:
                if out.request_id in self.streams:
                    self.streams[out.request_id].put_nowait(out)

    def apply_pending(self) -> None:
        adds, self.pending_adds = self.pending_adds, []
        for req in adds:
            self.engine.add(req)
        aborts, self.pending_aborts = self.pending_aborts, []
        for request_id in aborts:
            self.engine.abort(request_id)

    def fail_all(self, error: Exception) -> None:
        for request_id, queue in list(self.streams.items()):
            queue.put_nowait(error)
            self.engine.abort(request_id)
