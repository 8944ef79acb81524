"""Teacher-forced scoring of experts and their mixtures: full-vocabulary rows, sparse top-k, NLL and choices.

Each expert scores a token sequence once (one forward over all positions); its sparse top-k
replies are cut from the same full row exactly as the expert's StepEngine cuts them (log-softmax
in float32, top-k, log of the mass outside). Mixtures always go through
mesh_llm.mixing.aggregation: `mix` for sparse replies and `full_vocab_mix` for the dense reference.
A target token outside a sparse mixture's ids gets its rest mass spread evenly (as `densify` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mesh_llm.mixing.aggregation import full_vocab_mix, mix
from mesh_llm.wire import SparseDist


@dataclass(frozen=True, kw_only=True)
class ScoredSequence:
    dense: np.ndarray  # (positions, vocab) float32 log-probabilities of the next token
    targets: np.ndarray  # (positions,) the token that actually came next
    top_ids: np.ndarray  # (positions, kmax) ids, most probable first
    top_lp: np.ndarray  # (positions, kmax) their log-probabilities (float64)
    tail_lse: np.ndarray  # (positions, kmax + 1) log of the mass outside the first j ids, j = 0..kmax


def forward_logprobs(loaded, ids: Sequence[int], first: int = 0):
    """Float32 log-softmax rows (torch) predicting ids[first+1:], from one forward over ids[:-1]."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([list(ids[:-1])], dtype=torch.long, device=loaded.device)
        logits = loaded.model(input_ids=x, logits_to_keep=len(ids) - 1 - first).logits[0].float()
        return torch.log_softmax(logits, dim=-1).cpu()


def cut_topk(rows, ids: Sequence[int], first: int, kmax: int) -> ScoredSequence:
    """A ScoredSequence from log-softmax rows (torch, predicting ids[first+1:]) with top-kmax cuts."""
    import torch

    values, top = torch.topk(rows, kmax, dim=-1)
    outside = rows.clone()
    outside.scatter_(1, top, -math.inf)
    rest = torch.logsumexp(outside.double(), dim=-1, keepdim=True)  # mass outside the top kmax, as the engine does
    head = torch.logcumsumexp(values.double().flip(-1), dim=-1).flip(-1)  # head[:, j] = lse(values[j:kmax])
    tail = torch.cat([torch.logaddexp(head, rest), rest], dim=-1)
    return ScoredSequence(dense=rows.numpy(), targets=np.asarray(ids[first + 1:], dtype=np.int64),
                          top_ids=top.numpy().astype(np.int64), top_lp=values.double().numpy(), tail_lse=tail.numpy())


def score_sequence(loaded, ids: Sequence[int], kmax: int, first: int = 0) -> ScoredSequence:
    """Teacher-forced rows for predicting ids[first+1:] given everything before, with top-kmax cuts."""
    return cut_topk(forward_logprobs(loaded, ids, first), ids, first, kmax)


def score_batch(loaded, seqs: Sequence[tuple[Sequence[int], int]], kmax: int, batch_size: int = 16) -> list[ScoredSequence]:
    """score_sequence for many (ids, first) pairs, run as right-padded batches of similar length."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out: list[ScoredSequence | None] = [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(seqs[i][0]) - 1 for i in chunk)
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = seqs[i][0]
            x[row, : len(ids) - 1] = torch.tensor(list(ids[:-1]))
            mask[row, : len(ids) - 1] = 1
        with torch.inference_mode():
            logits = loaded.model(input_ids=x.to(loaded.device), attention_mask=mask.to(loaded.device)).logits.float()
            for row, i in enumerate(chunk):
                ids, first = seqs[i]
                rows = torch.log_softmax(logits[row, first: len(ids) - 1], dim=-1).cpu()
                out[i] = cut_topk(rows, ids, first, kmax)
    return out


def sparse_reply(seq: ScoredSequence, pos: int, k: int) -> SparseDist:
    """The top-k reply an expert would send for one position (ids ascending)."""
    ids = seq.top_ids[pos, :k]
    order = np.argsort(ids)
    rest = float(seq.tail_lse[pos, k]) if k < seq.dense.shape[1] else -math.inf
    return SparseDist(ids=ids[order], logprobs=np.minimum(seq.top_lp[pos, :k][order], 0.0), rest_logmass=min(rest, 0.0))


def sparse_target_logprobs(seqs: Sequence[ScoredSequence], *, k: int, rule: str, fill: str = "spread",
                           weights: Sequence[float] | None = None) -> np.ndarray:
    """Per position, the mixed log-probability of the target when each expert sends its top-k."""
    vocab = seqs[0].dense.shape[1]
    out = np.empty(len(seqs[0].targets))
    for pos, target in enumerate(seqs[0].targets):
        replies = [sparse_reply(s, pos, k) for s in seqs]
        mixed = mix(replies, vocab_size=vocab, weights=weights, rule=rule, fill=fill)
        out[pos] = mixed.logprob_of(int(target), vocab)
    return out


def dense_target_logprobs(seqs: Sequence[ScoredSequence], *, rule: str,
                          weights: Sequence[float] | None = None) -> np.ndarray:
    """Per position, the target's log-probability under the full-vocabulary mix (the reference)."""
    targets = seqs[0].targets
    if len(seqs) == 1:
        return seqs[0].dense[np.arange(len(targets)), targets].astype(np.float64)
    out = np.empty(len(targets))
    for pos, target in enumerate(targets):
        rows = np.stack([s.dense[pos] for s in seqs])
        out[pos] = full_vocab_mix(rows, weights, rule=rule)[target]
    return out


def top1_agreement(a: ScoredSequence, b: ScoredSequence) -> float:
    """Share of positions where two experts' most likely next token is the same."""
    return float(np.mean(a.top_ids[:, 0] == b.top_ids[:, 0]))


def choice_scores(per_choice: Sequence[np.ndarray], choices: Sequence[str]) -> tuple[int, int]:
    """Index of the best choice by summed log-likelihood and by log-likelihood per character."""
    sums = np.array([float(np.sum(lp)) for lp in per_choice])
    per_char = sums / np.array([max(len(c), 1) for c in choices])
    return int(np.argmax(sums)), int(np.argmax(per_char))
