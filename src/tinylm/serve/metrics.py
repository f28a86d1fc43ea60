"""Server metrics in the Prometheus text format (version 0.0.4), written by hand.

A histogram is a list of cumulative bucket counts plus a sum and a count: a few lines of
code, so the server needs no metrics library. Everything is updated from the one asyncio
event loop that runs the app, so no locks are needed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

# Latency buckets in seconds, from a tiny CPU model's milliseconds to a queued request's seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, c in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            total += c
            out.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


class Counter:
    """A counter with one optional label."""

    def __init__(self, name: str, help: str, label: str | None = None):
        self.name, self.help, self.label = name, help, label
        self.values: dict[str, float] = {}

    def inc(self, amount: float = 1, value: str = "") -> None:
        self.values[value] = self.values.get(value, 0) + amount

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if self.label is None:
            return out + [f"{self.name} {self.values.get('', 0)!r}"]
        return out + [f'{self.name}{{{self.label}="{v}"}} {n!r}'
                      for v, n in sorted(self.values.items())]


class Metrics:
    """What /metrics shows. `gauges` are read when scraped (the scheduler's queue sizes)."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]):
        self.ttft = Histogram("tinylm_time_to_first_token_seconds",
                              "from a request's arrival to its first token")
        self.itl = Histogram("tinylm_inter_token_latency_seconds",
                             "time between two tokens of one request, as the server sends them")
        self.e2e = Histogram("tinylm_request_duration_seconds",
                             "from a request's arrival to its last token")
        self.prompt_tokens = Counter("tinylm_prompt_tokens_total", "prompt tokens prefilled")
        self.generated = Counter("tinylm_generation_tokens_total", "tokens generated")
        self.finished = Counter("tinylm_requests_finished_total",
                                "finished rows by finish reason", "finish_reason")
        self.rejected = Counter("tinylm_requests_rejected_total",
                                "requests answered with an error, by HTTP status", "status")
        self.gauges = gauges

    def render(self) -> str:
        out: list[str] = []
        for name, (help, read) in self.gauges.items():
            out += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {read()!r}"]
        for m in (self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generated,
                  self.finished, self.rejected):
            out += m.lines()
        return "\n".join(out) + "\n"
