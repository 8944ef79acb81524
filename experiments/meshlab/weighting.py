"""Weighted linear mixtures of two experts: weights chosen on one text, judged on others.

The linear full-vocabulary mixture's probability of a token is the weighted sum of the experts'
probabilities of it (`aggregation.full_vocab_mix` with rule linear, as a test checks), so only each
expert's log-probability of the scored tokens is needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

GRID_STEP = 0.05  # first expert's weight from 0 to 1 in these steps; 0 and 1 are the single experts


def weight_grid(step: float = GRID_STEP) -> list[tuple[float, float]]:
    """(w, 1 - w) pairs from (0, 1) to (1, 0)."""
    n = round(1 / step)
    return [(round(i / n, 6), round(1 - i / n, 6)) for i in range(n + 1)]


def weighted_linear_lp(target_lps: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Per token, the log-probability of the target under the weighted linear mixture."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    with np.errstate(divide="ignore"):
        stacked = np.stack([np.asarray(lp, dtype=np.float64) for lp in target_lps]) + np.log(w)[:, None]
    return np.logaddexp.reduce(stacked, axis=0)


def weighted_linear_nll(target_lps: Sequence[np.ndarray], weights: Sequence[float]) -> float:
    """Mean negative log-likelihood of the targets under the weighted linear mixture."""
    return float(-np.mean(weighted_linear_lp(target_lps, weights)))


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of the mean per-token difference a - b (the same tokens scored twice)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


def choose_weights(target_lps: Sequence[np.ndarray], grid: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The grid weights with the lowest NLL on these targets (the first of equals)."""
    return min(grid, key=lambda w: weighted_linear_nll(target_lps, w))


def weighted_rows(labels: Sequence[str], target_lps: Mapping[str, Sequence[np.ndarray]], *, choose_on: str,
                  step: float = GRID_STEP) -> list[dict]:
    """For every pair of experts: weights and best single expert chosen on one text, NLL of each on every text.

    target_lps maps a text's name to each expert's log-probabilities of that text's tokens.
    """
    if choose_on not in target_lps:
        raise ValueError(f"weights are chosen on {choose_on!r}, which is not among the texts {', '.join(target_lps)}")
    grid = weight_grid(step)
    single_nll = {t: [float(-np.mean(np.asarray(lp, dtype=np.float64))) for lp in lps]
                  for t, lps in target_lps.items()}
    chosen_single = int(np.argmin(single_nll[choose_on]))
    rows = []
    for a, b in itertools.combinations(range(len(labels)), 2):
        weights = choose_weights([target_lps[choose_on][a], target_lps[choose_on][b]], grid)
        for text, lps in target_lps.items():
            pair = [lps[a], lps[b]]
            oracle = int(np.argmin(single_nll[text]))
            mixed = weighted_linear_lp(pair, weights)
            rows.append({
                "kind": "weighted", "experts": f"{labels[a]}+{labels[b]}", "weights": list(weights),
                "chosen_on": choose_on, "text": text, "in_sample": text == choose_on, "tokens": len(mixed),
                "nll": float(-np.mean(mixed)), "uniform_nll": weighted_linear_nll(pair, (0.5, 0.5)),
                "gain_se": paired_se(mixed, lps[chosen_single]),  # of the gain over the chosen single expert
                "best_weights_here": list(choose_weights(pair, grid)),
                "best_single": labels[chosen_single], "best_single_nll": single_nll[text][chosen_single],
                "best_single_here": labels[oracle], "best_single_here_nll": single_nll[text][oracle],
            })
    return rows
