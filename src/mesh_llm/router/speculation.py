"""How many tokens to draft each round: the draft length that maximises expected tokens per second.

A round that drafts g tokens yields E(g) = (1 - a^(g+1)) / (1 - a) tokens when each drafted token
is accepted with probability a (given the ones before it were), and costs T(g) = base + g * c:
the round trip and one-position compute, plus per drafted token the drafting time and the
experts' extra verify compute. a, base and c are measured as the generation runs (exponentially
forgotten), so g grows while drafts pay and falls to 0 (no drafting) when they do not; a round
of g = 1 is still tried now and then to notice when they start paying again.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.85  # weight kept by older rounds in every running estimate
VERIFY_PRIOR = 0.1  # extra verify cost of one drafted token, as a share of a round, until measured


@dataclass(kw_only=True)
class _Fit:
    """Exponentially forgotten least squares of round seconds against drafted tokens."""

    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0
    fitted_slope: float | None = None  # the latest slope measured while the drafted counts varied

    def add(self, x: float, y: float) -> None:
        for name, value in (("w", 1.0), ("x", x), ("y", y), ("xx", x * x), ("xy", x * y)):
            setattr(self, name, getattr(self, name) * DECAY + value)

    def line(self, prior_share: float) -> tuple[float, float]:
        """(intercept, slope); while drafted counts barely vary, the last fitted slope (or prior_share of a round)."""
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var > 0.25:
            self.fitted_slope = max((self.xy / self.w - mx * my) / var, 0.0)
        slope = self.fitted_slope if self.fitted_slope is not None else prior_share * my
        return max(my - slope * mx, 1e-6), slope


class GammaController:
    """Chooses each round's draft length from the measured acceptance rate and costs, within 0..max_gamma."""

    def __init__(self, max_gamma: int, *, start: int = 2, prior_acceptance: float = 0.6, probe_every: int = 8):
        self.max_gamma = max_gamma
        self.start = min(start, max_gamma)
        self.probe_every = probe_every
        self.accepted = prior_acceptance * 2  # forgotten counts of accepted drafted tokens ...
        self.rejected = (1 - prior_acceptance) * 2  # ... and of rounds that rejected one
        self.draft_s_per_token = 0.0  # forgotten mean drafting time per drafted token
        self.fit = _Fit()
        self.rounds_without_draft = 0

    @property
    def acceptance(self) -> float:
        """Estimated probability that a drafted token is accepted (given the ones before it were)."""
        return self.accepted / (self.accepted + self.rejected)

    def next(self) -> int:
        """Draft length for the next round (0 = do not draft)."""
        if self.fit.w == 0:
            return self.start
        base, slope = self.fit.line(prior_share=VERIFY_PRIOR)
        cost = slope + self.draft_s_per_token
        a = min(self.acceptance, 0.999)
        best, best_rate = 0, 1.0 / base
        for g in range(1, self.max_gamma + 1):
            rate = (1 - a ** (g + 1)) / (1 - a) / (base + g * cost)
            if rate > best_rate * 1.02:  # prefer shorter drafts unless longer clearly pay
                best, best_rate = g, rate
        if best == 0:
            self.rounds_without_draft += 1
            if self.rounds_without_draft >= self.probe_every:
                self.rounds_without_draft = 0
                return 1
        return best

    def observe(self, *, drafted: int, accepted: int, round_s: float, draft_s: float) -> None:
        """Take one finished round: tokens drafted and accepted, its wall time and the part spent drafting."""
        if drafted:
            self.accepted = self.accepted * DECAY + accepted
            self.rejected = self.rejected * DECAY + (1 if accepted < drafted else 0)
            per_token = draft_s / drafted
            self.draft_s_per_token = per_token if self.draft_s_per_token == 0 else (
                DECAY * self.draft_s_per_token + (1 - DECAY) * per_token)
        self.fit.add(float(drafted), max(round_s - draft_s, 1e-6))
