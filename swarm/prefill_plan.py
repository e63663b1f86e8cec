"""How many chunks a prompt travels in: sized by the route's measured compute and links.

A long prompt goes through a push route as chunks sent back to back (generation.run_step): peer k
computes chunk i while chunk i+1 is on the wire to it. More chunks overlap more, but every chunk
pays each hop's fixed costs (a frame, decryption, a scheduling round, a forward's dispatch) once
more. The best count depends on the route: on a slow link a chunk's bytes dominate and many small
chunks hide them; with fast links and a slow CPU few chunks are best (MoLink's just-in-time
transmission: the next chunk should arrive as the previous one's compute ends).

The planner picks the count c that minimises the predicted first-token time (pipeline_cost.PrefillTimes:
the first chunk's work around the route, then one bottleneck period per further chunk; the delays
and the head cost every count alike). The prediction starts from what a client knows before it
sends anything (what each hop announced a prompt chunk costs it, fixed + per token, measured by
the peer: peer/cost_curve.py PrefillCost; an assumed link rate: pipeline_cost.route_costs) and then follows what this client measured on the same route: the
spacing of a prompt's answers is the time the busiest host or link spends per chunk, without the
delays in it. Fitted as a line in the chunk's rows over the latest prompts, it replaces the
predicted bottleneck, and its cost per row against the predicted one gives the links' real speed
(a link slower than assumed shows up there as its bandwidth), with which the route's work per
chunk is predicted again. (A decode step's round trip minus a prompt's first answer would give
that work directly, but across a WAN it is the difference of two ~100 ms figures that each jitter
by more than it: tried on the WAN bed, it sent 1024-token prompts whole.)
The route-blind rule (fixed_chunks), tuned on the WAN bed, is the planner's prior: its count stays
unless another is predicted faster by more than KEEP_ROUTE_BLIND plus how far the model, fitted to
the route, still misses its latest prompts' times (RouteMeasurements.error). Alone, the planner did not beat that
rule on the bed where the rule was tuned (the predictions err by about that much there, README);
what it adds is a count for routes nobody tuned for (links far slower or faster than assumed, peers
of other speeds), where its predicted gain is large. MOLINK_PREFILL_CHUNKS=fixed: the rule alone.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from molink.peer.cost_curve import Line, least_squares_slope
from molink.swarm.pipeline_cost import PipelineCosts

MIN_CHUNK = 16  # tokens: smaller chunks are all fixed costs
# The route-blind rule: prompts of at least 2 x FIXED_MIN_CHUNK tokens in at most FIXED_MAX_CHUNKS chunks
FIXED_MIN_CHUNK = 64
FIXED_MAX_CHUNKS = 8
MAX_CHUNKS = 16
MAX_SCALE = 256.0  # links or peers at most this much faster or slower than assumed (1 Mbit/s uplinks, assumed 100)
UNSEEN_SCALE = 16.0  # a route whose answers show no cost per row is taken to be this much faster
# peers measure what their chunks cost and announce it: a route off by more than this is off in its
# links, whose rate the client only assumed (a 1 Mbit/s bed taken as 100x slower CPUs: 1 chunk "best")
PLAUSIBLE_COMPUTE_SCALE = 4.0
NEAR_BEST = 0.02  # predicted times this close to the best count as ties (fewer chunks win)
SPACING_SAMPLES = 8  # the latest prompts' answer spacings a route's bottleneck line is fitted to
SPREAD = 1.5  # chunk sizes this far apart tell a bottleneck's fixed cost from its cost per row
EXPLORE = 0.05  # a plan predicted this much slower than the best may run to measure another chunk size
# the route-blind rule's count stays unless another is predicted this much faster: about what the
# predictions erred by on the WAN bed (a 1024-token TTFT varied +-10 % for identical chunks there)
KEEP_ROUTE_BLIND = 0.10
MAX_ROUTES = 256


def planned_chunks_enabled() -> bool:
    """On unless MOLINK_PREFILL_CHUNKS=fixed (the route-blind rule alone, e.g. for A/B benchmarks)."""
    return os.environ.get("MOLINK_PREFILL_CHUNKS", "planned") != "fixed"


def even_chunks(tokens: int, count: int) -> list[int]:
    """`count` near-equal chunks of `tokens`."""
    base, extra = divmod(tokens, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def fixed_chunks(tokens: int) -> list[int]:
    """The route-blind rule (the default; a chain without a planner): near-equal
    chunks, enough to keep every peer of a 3-hop route busy at once, few enough that each still
    amortises a step's fixed costs (a frame, a scheduling round, a kernel launch)."""
    return even_chunks(tokens, max(1, min(FIXED_MAX_CHUNKS, tokens // FIXED_MIN_CHUNK)))


@dataclass
class RouteMeasurements:
    """What this client measured on one route: (rows per chunk, seconds between answers) of its
    latest prompts sent in chunks, and how far what it predicts now is off their time."""

    spacings: list[tuple[int, float]] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # measured / predicted, as max(r, 1/r) - 1
    prompts: int = 0

    def note_spacing(self, rows: int, seconds: float) -> None:
        self.spacings = [*self.spacings[-(SPACING_SAMPLES - 1):], (rows, seconds)]

    def note_error(self, predicted: float, measured: float) -> None:
        ratio = measured / predicted
        self.errors = [*self.errors[-(SPACING_SAMPLES - 1):], max(ratio, 1 / ratio) - 1]

    def error(self) -> float:
        """How far the predictions are off this route's latest prompts (median; 0 before any)."""
        return statistics.median(self.errors) if self.errors else 0.0


class PrefillPlanner:
    """Shared by a client's generations; `costs(route)` gives a route's predicted stages."""

    def __init__(self, costs: Callable[..., PipelineCosts], keep_route_blind: float = KEEP_ROUTE_BLIND):
        # costs(route, link_speed=1.0, compute_speed=1.0): the route's stages, its links and peers that
        # many times as fast as assumed and announced
        self.costs = costs
        self.keep_route_blind = keep_route_blind  # see KEEP_ROUTE_BLIND (0: the predictions alone)
        self.measured: dict[tuple[str, ...], RouteMeasurements] = {}

    def model(self, route: list) -> tuple[Line, Line]:
        """(a chunk's work around the route, the bottleneck's work per chunk), each a line in the
        chunk's rows: predicted (route_costs), then fitted to what was measured. The spacing of a
        prompt's answers is the bottleneck's time per chunk, whatever the delays: a line through
        chunks of different sizes splits it into fixed and per-row costs (else the predicted fixed
        part is kept). What is off is taken to be what carries most of a chunk's work: the links
        (the client assumed their rate) or the peers' compute (announced), the latter never by more
        than PLAUSIBLE_COMPUTE_SCALE (the peers measured it): the slowest link, or the busiest
        machine, is scaled until it alone costs the measured time per row, and the route's work is
        predicted again with all links, or all peers, that much faster or slower."""
        first, bottleneck = self._lines(route)
        return first(MAX_CHUNKS), bottleneck

    def _lines(self, route: list) -> tuple[Callable[[int], Line], Line]:
        """model()'s lines, the first one for a prompt in a given number of chunks (the machines a
        chunk shares with the chunks behind it slow it down: PipelineCosts.prefill_times)."""
        predicted = self.costs(route)
        bottleneck = Line.through(lambda n: predicted.prefill_times(n).bottleneck)
        seen = self.measured.get(_key(route))
        if seen is None or not seen.spacings:
            return (lambda count: Line.through(lambda n: predicted.prefill_times(n, count).first)), bottleneck
        measured = _fit(seen.spacings, bottleneck)
        usual = round(statistics.fmean(r for r, _ in seen.spacings))
        links = predicted.mostly_links(usual)
        # what is off is scaled until it alone costs what was measured per row: the busiest link, or
        # the busiest machine (the bottleneck, when the peers' compute carries most of a chunk)
        speed = _speed(predicted.link_per_row() if links else bottleneck.per_row, measured.per_row)
        if not links and not 1 / PLAUSIBLE_COMPUTE_SCALE <= speed <= PLAUSIBLE_COMPUTE_SCALE:
            links = True  # the peers measured their compute; the links' rate was only assumed
            speed = _speed(predicted.link_per_row(), measured.per_row)
        which = "link_speed" if links else "compute_speed"
        costs = self.costs(route, **{which: speed})

        def first(count: int) -> Line:
            line = Line.through(lambda n: costs.prefill_times(n, count).first)
            if count == 1:
                return line
            # a chunk's way around the route passes its bottleneck too: never less than what was
            # measured there (a scale clamped at MAX_SCALE can leave it below)
            return Line(max(line.fixed, measured.fixed), max(line.per_row, measured.per_row))

        return first, measured

    def chunks(self, route: list, tokens: int, batch: int = 1) -> list[int]:
        """The chunk sizes for a prompt of `tokens` (x `batch` rows) on `route` (a list of RouteHops)."""
        most = max(1, min(MAX_CHUNKS, tokens // MIN_CHUNK))
        if most == 1:
            return [tokens]
        predicted, bottleneck, first = self._predicted(route, tokens, batch, range(1, most + 1))
        seen = self.measured.get(_key(route)) or RouteMeasurements()
        count = self._count(tokens, batch, predicted, seen)
        _trace(tokens, batch, predicted, count, lambda: first(count), bottleneck, seen)
        return even_chunks(tokens, count)

    def _predicted(self, route: list, tokens: int, batch: int, counts) -> tuple[dict[int, float], Line, Callable]:
        """The predicted time from sending a prompt's first chunk to its last answer, per chunk
        count (the client's head, alike for every count, not in it), and the lines it came from."""
        first, bottleneck = self._lines(route)
        delays = self.costs(route).prefill_times(1).delays

        def ttft(count: int) -> float:
            rows = batch * math.ceil(tokens / count)
            return first(count).at(rows) + (count - 1) * bottleneck.at(rows) + delays

        return {count: ttft(count) for count in counts}, bottleneck, first

    def _count(self, tokens: int, batch: int, predicted: dict[int, float], seen: RouteMeasurements) -> int:
        """The rule's count, unless another is predicted clearly faster (the module doc): then the
        fastest (fewest within NEAR_BEST), varied to measure another size, never whole alone."""
        best = min(predicted.values())
        route_blind = len(fixed_chunks(tokens))
        if self.keep_route_blind > 0 and predicted[route_blind] <= best * (1 + self.keep_route_blind + seen.error()):
            # the prior holds (the module doc): nothing is predicted to pay more than the predictions
            # err, in general and as measured on this route
            return route_blind
        count = min(c for c, seconds in predicted.items() if seconds <= best * (1 + NEAR_BEST) + 1e-12)
        if len(seen.spacings) >= 2 and not _spread([r for r, _ in seen.spacings]):
            # chunks of one size cannot tell a bottleneck's fixed cost from its cost per row: try
            # another size this time, where the prediction says it costs little
            usual = statistics.fmean(r for r, _ in seen.spacings)
            others = [c for c, seconds in predicted.items() if seconds <= best * (1 + EXPLORE)
                      and _spread([usual, batch * math.ceil(tokens / c)])]
            if others:
                count = min(others, key=predicted.__getitem__)
        if count == 1 and predicted[2] <= best * (1 + EXPLORE):
            # a prompt sent whole measures nothing (no answers to space), so a route once planned as
            # one chunk would stay so, whatever it really is: two chunks, where predicted about as fast
            count = 2
        return count

    def observe(self, route: list, sizes: list[int], started: float, answers: list[float], batch: int = 1) -> None:
        """A prompt went as `sizes` chunks: sent from `started`, their answers back at `answers`."""
        if not sizes or len(answers) != len(sizes) or max(sizes) < MIN_CHUNK or answers[0] <= started:
            return
        seen = self._measurements(route)
        if len(sizes) > 1:
            spacing = statistics.median(b - a for a, b in zip(answers, answers[1:]))
            if spacing > 0:
                seen.note_spacing(batch * max(sizes), spacing)
                seen.prompts += 1
        # how far the model, with this prompt learned, is still off its time (the prior's margin)
        count = len(sizes)
        predicted = self._predicted(route, sum(sizes), batch, [count])[0][count]
        if predicted > 0:
            seen.note_error(predicted, answers[-1] - started)

    def _measurements(self, route: list) -> RouteMeasurements:
        key = _key(route)
        if key not in self.measured:
            if len(self.measured) >= MAX_ROUTES:
                del self.measured[next(iter(self.measured))]
            self.measured[key] = RouteMeasurements()
        return self.measured[key]


def _trace(tokens: int, batch: int, predicted: dict[int, float], count: int, first: Callable[[], Line],
           bottleneck: Line, seen: RouteMeasurements | None) -> None:
    """MOLINK_PREFILL_TRACE=FILE: each plan as a JSON line (benchmarks read why a count was chosen)."""
    path = os.environ.get("MOLINK_PREFILL_TRACE")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"tokens": tokens, "batch": batch, "count": count, "first": vars(first()),
                                  "bottleneck": vars(bottleneck), "spacings": seen.spacings if seen else [],
                                  "predicted_ms": {c: round(1000 * t, 2) for c, t in predicted.items()}}) + "\n")


def _fit(samples: list[tuple[int, float]], predicted: Line) -> Line:
    """A line through (rows, seconds) samples, each size's median standing for it (one prompt's
    spacing is itself a median, but of one gap when it went as two chunks: a lost packet's
    retransmission on a WAN made one 4x its neighbours): least squares when the sizes differ enough to
    tell fixed from per-row costs, else through the median. Its fixed part is never below the
    predicted one (a step's overhead per process, and the fixed part of the hop's announced
    prefill line): a few noisy spacings, on a busy machine, easily fit a line through zero, and
    every chunk would then look free."""
    by_size: dict[int, list[float]] = {}
    for rows, seconds in samples:
        by_size.setdefault(rows, []).append(seconds)
    points = [(rows, statistics.median(times)) for rows, times in by_size.items()]
    sizes = [r for r, _ in points]
    mean_rows, mean_seconds = statistics.fmean(sizes), statistics.fmean(s for _, s in points)
    fixed = predicted.fixed
    if _spread(sizes):
        fixed = max(fixed, mean_seconds - max(0.0, least_squares_slope(points)) * mean_rows)
    fixed = min(fixed, mean_seconds)
    return Line(fixed, (mean_seconds - fixed) / mean_rows)


def _speed(predicted_per_row: float, measured_per_row: float) -> float:
    """How many times faster than predicted a cost per row was measured (within MAX_SCALE)."""
    if measured_per_row > 0 and predicted_per_row > 0:
        return min(MAX_SCALE, max(1 / MAX_SCALE, predicted_per_row / measured_per_row))
    # no cost per row to see: it is fast, by how much is unknown (MAX_SCALE would make its links free)
    return UNSEEN_SCALE if predicted_per_row > 0 else 1.0


def _spread(rows: list[float]) -> bool:
    return max(rows) >= SPREAD * min(rows)


def _key(route: list) -> tuple[str, ...]:
    return tuple(f"{hop.peer_id}[{hop.start}:{hop.end})" for hop in route)
