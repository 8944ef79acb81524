"""Mixing sparse top-k next-token distributions of several experts over the union of their ids.

Each expert reports the log-probabilities of its top-k tokens and the log of the mass left over
(`rest_logmass`). Mixing happens over the union U of the listed ids; a union token that an
expert did not list gets a value from a fill rule:

- ``spread`` (default): the expert's leftover mass spread evenly over the vocab_size - k tokens
  it did not list.
- ``zero``: probability 0 (for geometric mixing a large negative floor, LOG_FLOOR, so sums stay
  finite); the expert's leftover mass lies entirely outside the union.
- ``floor``: min(the expert's smallest listed log-probability, the spread value).

Whatever an expert's leftover mass does not give to missing union tokens lies outside the union,
spread evenly over the vocab_size - |U| tokens there. The result carries the mixture's own mass
outside the union as its rest mass, so it is itself a normalised distribution (a SparseDist).

- ``linear``: weighted mean of probabilities.
- ``geometric``: weighted mean of log-probabilities, renormalised.
- ``robust``: with three or more experts, the one farthest from the others (largest mean
  divergence, see `divergences`) is dropped and the rest are mixed linearly; the result still
  lists every id any expert listed. With fewer than three it is ``linear``.

Everything is float64 and log-sum-exp; no full-vocabulary array is built (see full_vocab_mix for
the dense reference used by experiments and tests).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mesh_llm.errors import MeshError
from mesh_llm.wire import SparseDist

log = logging.getLogger(__name__)

MIX_RULES = ("linear", "geometric", "robust")
FILL_RULES = ("spread", "zero", "floor")
LOG_FLOOR = -1.0e4  # stands for log(0) in geometric mixing: exp() of it is exactly 0 in float64
_TINY = 1e-280  # below this a linear mix in probability space may have lost precision to underflow


class UnknownRule(MeshError, ValueError):
    """A mix or fill rule name that this module does not know."""


def check_rules(rule: str, fill: str) -> None:
    """Raise UnknownRule, naming the known rules, unless both names are known."""
    if rule not in MIX_RULES:
        raise UnknownRule(f"unknown mix rule {rule!r}; known: {', '.join(MIX_RULES)}")
    if fill not in FILL_RULES:
        raise UnknownRule(f"unknown fill rule {fill!r}; known: {', '.join(FILL_RULES)}")


def normalise_weights(weights: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    """Non-negative finite weights scaled to sum to 1 (uniform when None)."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{w.shape[0] if w.ndim == 1 else w.shape} weights for {n} distributions")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    normalised: np.ndarray = w / total
    return normalised


def mix(
    dists: Sequence[SparseDist],
    *,
    vocab_size: int,
    weights: Sequence[float] | np.ndarray | None = None,
    rule: str = "linear",
    fill: str = "spread",
) -> SparseDist:
    """Mix expert distributions over the union of their ids into one normalised SparseDist."""
    check_rules(rule, fill)
    if not dists:
        raise ValueError("nothing to mix: no distributions")
    w = normalise_weights(weights, len(dists))
    if rule == "robust":
        return _robust(dists, w, vocab_size, fill)
    if np.any(w == 0):
        keep = np.flatnonzero(w > 0)
        dists, w = [dists[int(i)] for i in keep], w[keep]
    k = len(dists)
    lens = np.fromiter((len(d.ids) for d in dists), dtype=np.int64, count=k)
    rest = np.fromiter((d.rest_logmass for d in dists), dtype=np.float64, count=k)
    all_ids = np.concatenate([d.ids for d in dists])
    all_lp = np.concatenate([d.logprobs for d in dists])
    union, where = _union(all_ids)
    size = len(union)
    if size > vocab_size:
        raise ValueError(f"union of {size} ids exceeds the vocabulary of {vocab_size}")

    fill_lp = _fill_logprobs(dists, lens, rest, vocab_size, fill)
    outside = _outside_logmass(lens, rest, fill_lp, size, vocab_size, fill)
    parts = _Parts(w=w, lens=lens, where=where, all_lp=all_lp, fill_lp=fill_lp, outside=outside, size=size)
    mixed, rest_mix, total = _linear(parts) if rule == "linear" else _geometric(parts, vocab_size)
    return SparseDist(ids=union, logprobs=np.minimum(mixed - total, 0.0), rest_logmass=min(rest_mix - total, 0.0))


@dataclass(frozen=True, kw_only=True)
class _Parts:
    w: np.ndarray  # normalised positive weight per expert
    lens: np.ndarray  # number of listed ids per expert
    where: np.ndarray  # union index of every listed entry, experts concatenated
    all_lp: np.ndarray  # log-probability of every listed entry, experts concatenated
    fill_lp: np.ndarray  # per expert: log-probability of each union id it did not list
    outside: np.ndarray  # per expert: log of its mass outside the union
    size: int  # union size


# Each union column is the expert's fill value, corrected where the expert listed the id; the
# corrections are summed with bincount over the listed entries, never over a (K x union) table.


def _linear(p: _Parts) -> tuple[np.ndarray, float, float]:
    """Unnormalised union log-probs, outside log-mass and log of their total for the linear rule."""
    entry_w = np.repeat(p.w, p.lens)
    fill_p = np.exp(p.fill_lp)
    base = float(p.w @ fill_p)
    listed = np.bincount(p.where, weights=entry_w * np.exp(p.all_lp), minlength=p.size)
    listed_fill = np.bincount(p.where, weights=entry_w * np.repeat(fill_p, p.lens), minlength=p.size)
    probs = listed + np.maximum(base - listed_fill, 0.0)
    rest_mix = _logsumexp(np.log(p.w) + p.outside)
    # base - listed_fill is off by up to ~k*eps*base; trust the sum only well above that.
    if probs.min() > max(_TINY, 1e-4 * base):
        return np.log(probs), rest_mix, math.log(float(probs.sum()) + math.exp(rest_mix))
    # Underflow or cancellation: exact log-sum-exp over the dense (K x union) table instead.
    table = np.empty((len(p.w), p.size))
    table[:] = p.fill_lp[:, None]
    table[np.repeat(np.arange(len(p.w)), p.lens), p.where] = p.all_lp
    mixed = _logsumexp_rows(table + np.log(p.w)[:, None])
    return mixed, rest_mix, float(np.logaddexp(_logsumexp(mixed), rest_mix))


def _geometric(p: _Parts, vocab_size: int) -> tuple[np.ndarray, float, float]:
    """Unnormalised union log-probs, outside log-mass and log of their total for the geometric rule."""
    fill_c = np.maximum(p.fill_lp, LOG_FLOOR)
    corrections = np.repeat(p.w, p.lens) * (np.maximum(p.all_lp, LOG_FLOOR) - np.repeat(fill_c, p.lens))
    mixed = float(p.w @ fill_c) + np.bincount(p.where, weights=corrections, minlength=p.size)
    if p.size == vocab_size or np.any(p.outside == -np.inf):
        rest_mix = -math.inf  # some expert puts nothing outside the union: the product is 0
    else:
        spread_out = math.log(vocab_size - p.size)
        rest_mix = spread_out + float(p.w @ np.maximum(p.outside - spread_out, LOG_FLOOR))
    return mixed, rest_mix, float(np.logaddexp(_logsumexp(mixed), rest_mix))


def _union(all_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and each input id's index into them (a stable sort merges the sorted runs fast)."""
    order = np.argsort(all_ids, kind="stable")
    ordered = all_ids[order]
    first = np.empty(len(ordered), dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    where = np.empty(len(ordered), dtype=np.int64)
    where[order] = np.cumsum(first) - 1
    return ordered[first], where


def _fill_logprobs(dists: Sequence[SparseDist], lens: np.ndarray, rest: np.ndarray, vocab_size: int,
                   fill: str) -> np.ndarray:
    """Per expert: the log-probability given to each union token it did not list."""
    if fill == "zero":
        return np.full(len(lens), -np.inf)
    unlisted = vocab_size - lens
    with np.errstate(divide="ignore"):
        spread = np.where(unlisted > 0, rest - np.log(np.maximum(unlisted, 1)), -np.inf)
    if fill == "spread":
        return spread
    smallest = np.fromiter((d.logprobs.min() for d in dists), dtype=np.float64, count=len(dists))
    return np.minimum(smallest, spread)


def _outside_logmass(
    lens: np.ndarray, rest: np.ndarray, fill_lp: np.ndarray, size: int, vocab_size: int, fill: str
) -> np.ndarray:
    """Per expert: log of its mass on tokens outside the union under the fill rule."""
    if size == vocab_size:
        return np.full(len(lens), -np.inf)
    if fill == "zero":
        return rest.copy()
    if fill == "spread":
        spread: np.ndarray = rest + math.log(vocab_size - size) - np.log(vocab_size - lens)
        return spread
    missing = size - lens
    with np.errstate(divide="ignore", invalid="ignore"):
        given = np.where(missing > 0, missing * np.exp(fill_lp - rest), 0.0)
        out = rest + np.log1p(-np.clip(given, 0.0, 1.0))
    return np.where(rest == -np.inf, -np.inf, out)


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    if m == -math.inf:
        return -math.inf
    return m + math.log(float(np.exp(x - m).sum()))


def _logsumexp_rows(table: np.ndarray) -> np.ndarray:
    """Log-sum-exp down the expert axis; every column holds at least one finite value."""
    m = table.max(axis=0)
    total: np.ndarray = m + np.log(np.exp(table - m).sum(axis=0))
    return total


def full_vocab_mix(logprobs: np.ndarray, weights: Sequence[float] | np.ndarray | None = None,
                   rule: str = "linear") -> np.ndarray:
    """Reference mix of dense (experts × vocab) log-probability rows into one normalised row."""
    check_rules(rule, "spread")
    dense = np.asarray(logprobs, dtype=np.float64)
    w = normalise_weights(weights, dense.shape[0])
    keep = w > 0
    dense, w = dense[keep], w[keep]
    if rule == "robust":
        rule = "linear"
        if len(dense) >= 3:
            drop = outlier(_symmetric_kl(np.maximum(dense, KL_FLOOR), np.ones(1)))
            dense, w = np.delete(dense, drop, axis=0), np.delete(w, drop)
    if rule == "linear":
        mixed = _logsumexp_rows(dense + np.log(w)[:, None])
    else:
        mixed = w @ np.maximum(dense, LOG_FLOOR)
    return mixed - _logsumexp(mixed)


def densify(dist: SparseDist, vocab_size: int) -> np.ndarray:
    """Full-vocabulary log-probabilities of a SparseDist, its rest mass spread over unlisted ids."""
    dense = np.full(vocab_size, dist.spread_logprob(vocab_size))
    dense[dist.ids] = dist.logprobs
    return dense


KL_FLOOR = math.log(1e-12)  # log-probabilities are floored here before divergences, so a zero costs ~28 nats


def divergences(dists: Sequence[SparseDist], vocab_size: int) -> np.ndarray:
    """Symmetric KL, (KL(p||q) + KL(q||p)) / 2 in nats, between every pair of distributions (a K x K matrix).

    Each distribution gives every id it did not list its spread value (as densify does), and
    log-probabilities are floored at KL_FLOOR, so the figure equals the one over the full vocabulary
    and stays finite for a distribution that puts no mass somewhere.
    """
    union, _ = _union(np.concatenate([d.ids for d in dists]))
    outside = vocab_size - len(union)
    table = np.empty((len(dists), len(union) + (outside > 0)))
    for row, d in zip(table, dists):
        row[:] = d.spread_logprob(vocab_size)
        row[np.searchsorted(union, d.ids)] = d.logprobs
    counts = np.ones(table.shape[1])
    if outside > 0:
        counts[-1] = outside  # one column stands for every id outside the union
    return _symmetric_kl(np.maximum(table, KL_FLOOR), counts)


def _symmetric_kl(table: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pairwise symmetric KL of rows of per-id log-probabilities, column j standing for counts[j] ids."""
    p = np.exp(table) * counts
    cross = p @ table.T  # cross[i, j] = sum_x p_i(x) log p_j(x)
    kl = np.diag(cross)[:, None] - cross
    symmetric: np.ndarray = np.maximum((kl + kl.T) / 2, 0.0)
    return symmetric


def outlier(pairwise: np.ndarray) -> int:
    """Index of the row farthest on average from the others (the first on a tie)."""
    return int(np.argmax(pairwise.sum(axis=1)))


def _robust(dists: Sequence[SparseDist], w: np.ndarray, vocab_size: int, fill: str) -> SparseDist:
    """Linear mix without the farthest expert (K >= 3), listing every id that any expert listed."""
    dists, w = [d for d, x in zip(dists, w) if x > 0], w[w > 0]
    if len(dists) < 3:
        return mix(dists, vocab_size=vocab_size, weights=w, rule="linear", fill=fill)
    drop = outlier(divergences(dists, vocab_size))
    kept = [d for i, d in enumerate(dists) if i != drop]
    mixed = mix(kept, vocab_size=vocab_size, weights=np.delete(w, drop), rule="linear", fill=fill)
    extra = np.setdiff1d(dists[drop].ids, mixed.ids)
    if not len(extra):
        return mixed
    spread = mixed.spread_logprob(vocab_size)  # what the mix already gives each of those ids
    unlisted = vocab_size - len(mixed.ids)
    rest = mixed.rest_logmass + math.log((unlisted - len(extra)) / unlisted) if unlisted > len(extra) else -math.inf
    ids, where = _union(np.concatenate([mixed.ids, extra]))
    logprobs = np.empty(len(ids))
    logprobs[where] = np.concatenate([mixed.logprobs, np.full(len(extra), spread)])
    return SparseDist(ids=ids, logprobs=logprobs, rest_logmass=rest)
