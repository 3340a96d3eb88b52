"""Turn one row per sequence (its final hidden state, through the lm_head) into the next token,
as the sequence's settings say.

Order: penalties (repetition on prompt+output, presence/frequency on output) and min_tokens
masking on the raw logits -> greedy argmax, or temperature -> top_k -> top_p -> min_p -> draw.
A draw takes one uniform number from the sequence's own generator, so a seeded request gives
the same tokens whatever else shares the batch. Reported logprobs are those of the raw
model distribution (before penalties and temperature), as vLLM reports them by default.

Legend: N sequences to sample, M of them with full logits, H hidden, V vocabulary.
"""
from __future__ import annotations

import torch

from cluster.engine.sequence import Sequence
from kernels import linear_argmax

NEG_INF = float("-inf")


def apply_penalties(logits_V: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits_V.device)
        vals = logits_V[seen]
        logits_V[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                     vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits_V.device)
        counts_V = torch.bincount(out, minlength=logits_V.numel()).to(logits_V.dtype)
        logits_V -= p.frequency_penalty * counts_V + p.presence_penalty * (counts_V > 0)
    return logits_V


def mask_stops_before_min_tokens(logits_V: torch.Tensor, seq: Sequence,
                                 eos_token_ids: list[int]) -> torch.Tensor:
    p = seq.params
    if seq.num_output_tokens < p.min_tokens:
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
        if banned:
            logits_V[torch.tensor(banned, device=logits_V.device)] = NEG_INF
    return logits_V


def filter_top_k_top_p_min_p(logits_V: torch.Tensor, top_k: int, top_p: float,
                             min_p: float) -> torch.Tensor:
    """Set every logit outside the kept set to -inf; the kept set is never empty."""
    V = logits_V.numel()
    if 0 < top_k < V:
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, NEG_INF)
    if top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        cum_V = torch.softmax(sorted_V, dim=-1).cumsum(-1)
        drop_sorted_V = (cum_V - torch.softmax(sorted_V, dim=-1)) >= top_p   # mass before it
        logits_V = logits_V.scatter(0, order_V, sorted_V.masked_fill(drop_sorted_V, NEG_INF))
    if min_p > 0.0:
        probs_V = torch.softmax(logits_V, dim=-1)
        logits_V = logits_V.masked_fill(probs_V < min_p * probs_V.max(), NEG_INF)
    return logits_V


def needs_processing(seq: Sequence) -> bool:
    """Whether anything changes the raw logits before the greedy argmax."""
    p = seq.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens)


def plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing changing the raw logits: the token is their argmax."""
    return seq.params.greedy and not needs_processing(seq)


def draw(logits_V: torch.Tensor, generator: torch.Generator) -> int:
    """Inverse-CDF draw with one uniform number (a tensor of exponentials over V is ~20x slower
    on CPU); the first index whose cumulative mass exceeds u never has zero probability."""
    cdf_V = torch.softmax(logits_V.float(), dim=-1).cumsum(-1)
    u = torch.rand((), generator=generator) * cdf_V[-1]
    return min(int(torch.searchsorted(cdf_V, u, right=True)), logits_V.numel() - 1)


def top_logprobs(logprobs_V: torch.Tensor, token_id: int, k: int) -> dict[int, float]:
    """{token: logprob} for the k most likely tokens plus `token_id` itself."""
    out = {}
    if k > 0:
        vals, ids = torch.topk(logprobs_V, k)
        out = dict(zip(ids.tolist(), vals.tolist()))
    out[token_id] = float(logprobs_V[token_id])
    return out


class Sampler:
    """greedy_head: h [N, H] -> greedy ids [N] for plain greedy rows (e.g. a
    `kernels.linear_argmax.ScreenedArgmax` of the lm_head); None: `linear_argmax` of the
    lm_head weight."""

    def __init__(self, eos_token_ids: list[int], greedy_head=None):
        self.eos_token_ids = list(eos_token_ids)
        self.greedy_head = greedy_head

    def sample(self, hidden_NH: torch.Tensor, lm_head: torch.nn.Linear, seqs: list[Sequence]):
        """One (token_id, logprob or None, top_logprobs or None) per sequence, from the final
        hidden states of the rows that sample.

        Plain greedy rows that report no logprobs take the blocked argmax of the lm_head (their
        logits are never materialised); every other row gets its full logits."""
        fast = [plain_greedy(s) and s.params.logprobs is None for s in seqs]
        fast_rows = [i for i, f in enumerate(fast) if f]
        slow_rows = [i for i, f in enumerate(fast) if not f]
        out = [None] * len(seqs)
        if fast_rows:
            h_FH = hidden_NH[fast_rows]
            ids_F = (self.greedy_head(h_FH) if self.greedy_head is not None
                     else linear_argmax(h_FH, lm_head.weight))
            for i, token in zip(fast_rows, ids_F.tolist()):
                out[i] = (token, None, None)
        if slow_rows:
            logits_MV = lm_head(hidden_NH[slow_rows])
            for i, sampled in zip(slow_rows, self.sample_full(logits_MV, [seqs[i] for i in slow_rows])):
                out[i] = sampled
        return out

    def sample_full(self, logits_NV: torch.Tensor, seqs: list[Sequence]):
        """As `sample`, from full logits rows; logprobs only for the rows whose request asked for
        them (a log-softmax over the vocabulary per row is not free)."""
        plain = [plain_greedy(s) for s in seqs]
        argmax_N = logits_NV.argmax(-1).tolist() if any(plain) else []
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = dict(zip(wanted, torch.log_softmax(logits_NV[wanted].float(), -1)))
        out = []
        for i, seq in enumerate(seqs):
            token = argmax_N[i] if plain[i] else self.sample_one(logits_NV[i], seq)
            lp_V = logprobs.get(i)
            if lp_V is None:
                out.append((token, None, None))
            else:
                tops = top_logprobs(lp_V, token, seq.params.logprobs)
                out.append((token, float(lp_V[token]), tops))
        return out

    def sample_one(self, logits_V: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        logits_V = logits_V.float().clone()             # processed in place below
        logits_V = apply_penalties(logits_V, seq)
        logits_V = mask_stops_before_min_tokens(logits_V, seq, self.eos_token_ids)
        if p.greedy:
            return int(logits_V.argmax())
        logits_V = filter_top_k_top_p_min_p(logits_V / p.temperature, p.top_k, p.top_p, p.min_p)
        return draw(logits_V, seq.generator)
