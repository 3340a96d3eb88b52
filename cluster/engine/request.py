"""A user request: one prompt and its `n` sequences (choices), and the outputs built from them."""
from __future__ import annotations

from cluster.engine.output import CompletionOutput, RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import Sequence
from model.mrope import MultimodalPrompt


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, priority: int = 0, mm: MultimodalPrompt | None = None):
        """prompt_token_ids: what runs (image placeholders expanded); mm: set when it has images."""
        self.request_id, self.prompt, self.mm = request_id, prompt, mm
        self.prompt_token_ids, self.params, self.priority = prompt_token_ids, params, priority
        self.seqs: list[Sequence] = []
        self.sent_tokens: dict[int, int] = {}      # choice index -> token ids already reported

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """Snapshot now; advances the streaming cursors (call once per step per request)."""
        finished = self.finished
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             self.seqs[0].prompt_logprobs, [self.completion(s) for s in self.seqs],
                             finished)

    def completion(self, seq: Sequence) -> CompletionOutput:
        done = seq.is_finished
        ids = seq.output_token_ids
        sent = self.sent_tokens.get(seq.index, 0)
        self.sent_tokens[seq.index] = len(ids)
        delta = seq.detokenizer.take_delta(done)
        want_logprobs = seq.params.logprobs is not None
        return CompletionOutput(
            index=seq.index, text=seq.detokenizer.text[:seq.detokenizer.emitted],
            token_ids=list(ids),
            cumulative_logprob=seq.cumulative_logprob if want_logprobs else None,
            logprobs=list(seq.logprobs) if want_logprobs else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            delta_text=delta, delta_token_ids=ids[sent:])
