"""Job counters: the periodic progress line, the final summary table and `_job.json`'s numbers."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Progress:
    total_rows: int
    skipped_rows: int = 0                # in shards committed by an earlier run
    rows_ok: int = 0
    rows_failed: int = 0
    shards_written: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)

    def add(self, results: list[dict]) -> None:
        self.shards_written += 1
        for r in results:
            failed = bool(r["error"])
            self.rows_failed += failed
            self.rows_ok += not failed
            self.prompt_tokens += int(r["prompt_tokens"])
            self.completion_tokens += int(r["completion_tokens"])

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(self.wall_s, 1e-9)

    def line(self) -> str:
        done = self.rows_ok + self.rows_failed
        todo = self.total_rows - self.skipped_rows
        rate = done / max(self.wall_s, 1e-9)
        eta = duration((todo - done) / rate) if rate > 0 else "?"
        return (f"[batch] rows {done + self.skipped_rows}/{self.total_rows} "
                f"({self.rows_failed} failed, {self.skipped_rows} already done) | "
                f"{rate:.1f} rows/s | {self.tokens_per_s:.1f} output tokens/s | ETA {eta}")

    def maybe_print(self, every_s: float = 10.0) -> None:
        if time.monotonic() - self.last_line >= every_s:
            self.last_line = time.monotonic()
            print(self.line(), flush=True)

    def counts(self) -> dict:
        return {"rows_total": self.total_rows, "rows_ok": self.rows_ok,
                "rows_failed": self.rows_failed, "rows_skipped_done": self.skipped_rows,
                "shards_written": self.shards_written, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 3)}

    def table(self) -> str:
        width = max(len(k) for k in self.counts())
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in self.counts().items())
