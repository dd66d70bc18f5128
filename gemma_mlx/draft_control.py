"""How many tokens to draft in each speculative round, so that MTP never loses to plain decoding.

Drafting pays only when the tokens a round emits outweigh what the round costs. Both sides are
measured while generating: each draft is accepted with a probability `a` (a decaying count of
accepted and rejected drafts), and a round with `k` drafts (drafting plus the target's verify pass
over `k + 1` tokens) takes `cost(k)` seconds; `k = 0` is a plain decoding step. A round with `k`
drafts emits `1 + a + ... + a^k` tokens on average, so the controller picks the `k` in
`0 .. max_drafts` with the most tokens per second. On a bandwidth-bound GPU a verify pass costs
about one step and long blocks win; on a compute-bound CPU it costs about `k + 1` steps and plain
decoding wins even with a perfect drafter. While decoding plainly nothing is learnt about
acceptance, so a probe round drafts again after `probe_every` plain rounds (doubling, up to
`max_probe_every`, each time the probe does not pay).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DraftControl:
    """Chooses the number of drafts per round (`choose`) from what rounds cost and accept (`update`).

    `clock` (seconds) times the rounds; `cost(k)`, when given, replaces the measurement with a
    fixed cost model (for tests and simulations: decisions free of timing noise)."""

    def __init__(
        self,
        max_drafts: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cost: Callable[[int], float] | None = None,
        decay: float = 0.9,
        probe_every: int = 16,
        max_probe_every: int = 256,
    ):
        if max_drafts < 1:
            raise ValueError(f"max_drafts={max_drafts}: must be >= 1 (draft blocks of 2 or more tokens)")
        self.max_drafts, self.clock, self.model = max_drafts, clock, cost
        self.decay, self.min_probe, self.max_probe = decay, probe_every, max_probe_every
        self.costs: dict[int, float] = {}  # k -> running mean seconds of a round with k drafts
        self.seen: dict[int, int] = {}  # k -> rounds timed (the first of each size only warms up)
        self.accepted = self.rejected = 0.0  # decaying counts of draft outcomes
        self.probe_every, self.plain_rounds = probe_every, 0
        self.history: list[int] = []  # k of every round, for stats and tests

    @property
    def acceptance(self) -> float:
        """Estimated probability that a draft is accepted (1/2 before any evidence)."""
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    def cost(self, k: int) -> float:
        """Seconds of a round with `k` drafts: measured, or interpolated linearly from plain steps
        and the measured rounds (a verify pass grows about linearly in its tokens)."""
        if self.model is not None:
            return self.model(k)
        if k in self.costs:
            return self.costs[k]
        step = self.costs.get(0)
        drafted = [(j, c) for j, c in self.costs.items() if j]
        if step is None or not drafted:
            return float("nan")
        slope = sum((c - step) / j for j, c in drafted) / len(drafted)
        return step + max(slope, 0.0) * k

    def rate(self, k: int) -> float:
        """Expected tokens per second of rounds with `k` drafts."""
        a = self.acceptance
        return sum(a**i for i in range(k + 1)) / self.cost(k)

    def choose(self) -> int:
        """Drafts for the next round: first plain steps and single drafts until both are timed (the
        cheapest rounds that give the cost line's intercept and slope: a first guess of full blocks
        wastes up to `max_drafts` steps a round where verify passes are dear), then the best
        expected rate; after `probe_every` plain rounds, one probe with drafts."""
        if self.model is None and 0 not in self.costs:
            k = 0
        elif self.model is None and 1 not in self.costs:
            k = 1
        else:
            k = max(range(self.max_drafts + 1), key=self.rate)
            if k:
                self.probe_every = self.min_probe  # drafting pays: probe soon once it stops paying
            elif self.plain_rounds >= self.probe_every:
                k = max(range(1, self.max_drafts + 1), key=self.rate)
                self.probe_every = min(2 * self.probe_every, self.max_probe)
        self.plain_rounds = self.plain_rounds + 1 if k == 0 else 0
        if len(self.history) >= 4096:  # a long-lived controller (a server's) keeps the recent rounds
            del self.history[:2048]
        self.history.append(k)
        return k

    def update(self, k: int, accepted: int, seconds: float) -> None:
        """Record a round with `k` drafts of which the first `accepted` were accepted."""
        if k:
            self.accepted = self.decay * self.accepted + accepted
            self.rejected = self.decay * self.rejected + (accepted < k)
        seen = self.seen[k] = self.seen.get(k, 0) + 1
        if seen == 2:
            self.costs[k] = seconds
        elif seen > 2:
            self.costs[k] = 0.8 * self.costs[k] + 0.2 * seconds
