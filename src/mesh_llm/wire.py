"""Packing and unpacking sparse top-k distributions for the wire (the TopK message)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh_llm.pb import expert_pb2

_DTYPES: dict[int, np.dtype[Any]] = {expert_pb2.LOGPROB_F32: np.dtype("<f4"), expert_pb2.LOGPROB_F16: np.dtype("<f2")}


class MalformedDistribution(ValueError):
    """A peer sent a distribution that cannot be a log-probability distribution."""


@dataclass(frozen=True, kw_only=True)
class SparseDist:
    ids: np.ndarray  # int64 token ids, ascending, unique
    logprobs: np.ndarray  # float64 log-probabilities of those ids, each <= 0
    rest_logmass: float  # log of the mass outside ids; -inf when the ids cover everything

    def spread_logprob(self, vocab_size: int) -> float:
        """Log-probability of each unlisted id when the rest mass is spread evenly over them."""
        unlisted = vocab_size - len(self.ids)
        return self.rest_logmass - math.log(unlisted) if unlisted > 0 else -math.inf

    def logprob_of(self, token_id: int, vocab_size: int) -> float:
        """Log-probability of one id: its listed value, else its share of the spread rest mass."""
        where = int(np.searchsorted(self.ids, token_id))
        if where < len(self.ids) and self.ids[where] == token_id:
            return float(self.logprobs[where])
        return self.spread_logprob(vocab_size)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, rest_logmass: float, encoding: int) -> expert_pb2.TopK:
    """Build a TopK message from ids and their logprobs, in any order."""
    order = np.argsort(ids, kind="stable")
    ids_sorted = np.asarray(ids, dtype=np.int64)[order]
    deltas = np.diff(ids_sorted, prepend=0)
    packed = np.asarray(logprobs, dtype=np.float64)[order].astype(_DTYPES[encoding]).tobytes()
    return expert_pb2.TopK(id_deltas=deltas.tolist(), logprobs=packed, rest_logmass=float(rest_logmass))


def decode_topk(msg: expert_pb2.TopK, encoding: int, vocab_size: int) -> SparseDist:
    """Unpack and validate a TopK message; raise MalformedDistribution on anything impossible."""
    if encoding not in _DTYPES:
        raise MalformedDistribution(f"unknown logprob encoding {encoding}")
    ids = np.cumsum(np.asarray(msg.id_deltas, dtype=np.int64))
    dtype = _DTYPES[encoding]
    if len(msg.logprobs) != len(ids) * dtype.itemsize:
        raise MalformedDistribution(f"{len(ids)} ids but {len(msg.logprobs)} bytes of logprobs")
    logprobs = np.frombuffer(msg.logprobs, dtype=dtype).astype(np.float64)
    if len(ids) == 0:
        raise MalformedDistribution("empty distribution")
    if len(ids) > 1 and np.any(np.asarray(msg.id_deltas[1:]) == 0):
        raise MalformedDistribution("duplicate token ids")
    if ids[-1] >= vocab_size:
        raise MalformedDistribution(f"token id {int(ids[-1])} outside the vocabulary of {vocab_size}")
    if not np.all(np.isfinite(logprobs)):
        raise MalformedDistribution("NaN or infinite log-probability")
    rest = float(msg.rest_logmass)
    if math.isnan(rest) or rest == math.inf:
        raise MalformedDistribution("rest_logmass is NaN or +inf")
    tolerance = 1e-3 if encoding == expert_pb2.LOGPROB_F16 else 1e-5
    if np.any(logprobs > tolerance) or rest > tolerance:
        raise MalformedDistribution("log-probability above 0")
    total = np.logaddexp.reduce(np.append(logprobs, rest))
    if abs(total) > 0.05:
        raise MalformedDistribution(f"probabilities sum to {math.exp(total):.4f}, not 1")
    return SparseDist(ids=ids, logprobs=np.minimum(logprobs, 0.0), rest_logmass=min(rest, 0.0))
