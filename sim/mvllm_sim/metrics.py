"""/metrics in Prometheus text format, with vLLM's metric names, read from the engine as it is."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mvllm_sim.engine import Engine

# vLLM's buckets for vllm:e2e_request_latency_seconds.
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


SLEEP_STATE_HELP = ("Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
                    "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.")  # fmt: skip
CLOCK_HELP = ("The simulator's simulated clock: simulated seconds since it started. While the engine steps it "
              "advances by each step's time, with the step's tokens; while idle, by wall seconds / --time-scale "
              "(with --time-scale 0 it is the sum of the step times).")  # fmt: skip


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}.0')
        out += [f"{name}_sum{{{labels}}} {self.total}", f"{name}_count{{{labels}}} {self.n}.0"]
        return out


@dataclass
class Metrics:
    """What the engine does not count itself: latencies and outcomes, in simulated seconds."""

    model_name: str
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})

    def render(
        self,
        engine: Engine,
        clock: float,
        frozen: tuple[int, int] | None = None,
        sleep: tuple[int, int] = (0, 0),
    ) -> str:
        """The exposition text. `clock` is the simulated clock (Runner.now_sim). The running and waiting
        gauges of an engine that steps no more (hung, or paused) stay `frozen` as they were when it
        stopped, as vLLM's do (they are published at each step). `sleep`: (asleep, level) as the last
        /sleep or /wake_up left them."""
        labels = f'engine="0",model_name="{_escape(self.model_name)}"'
        c = engine.counters
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(value)}"])

        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            frozen[0] if frozen else engine.num_running,
        )
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            frozen[1] if frozen else engine.num_waiting,
        )
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", engine.kv_usage)
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", c.prompt_tokens)
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            c.generation_tokens,
        )
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in tokens.",
            c.prefix_cache_queries,
        )
        metric("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in tokens.", c.prefix_cache_hits)
        metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.", c.preemptions)
        lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
                  "# TYPE vllm:request_success_total counter"]  # fmt: skip
        lines += [f'vllm:request_success_total{{{labels},finished_reason="{r}"}} {float(n)}'
                  for r, n in self.finished.items()]  # fmt: skip
        for name, hist, text in (
            ("vllm:e2e_request_latency_seconds", self.e2e_latency, "End-to-end request latency (simulated)."),
            ("vllm:time_to_first_token_seconds", self.ttft, "Time to first token (simulated)."),
            ("vllm:request_queue_time_seconds", self.queue_time, "Time spent waiting, before the batch (simulated)."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name, labels)]
        lines += [f"# HELP vllm:engine_sleep_state {SLEEP_STATE_HELP}", "# TYPE vllm:engine_sleep_state gauge"]
        asleep, level = sleep
        states = {"awake": 1 - asleep, "weights_offloaded": int(asleep and level == 1),
                  "discard_all": int(asleep and level == 2)}  # fmt: skip
        lines += [f'vllm:engine_sleep_state{{{labels},sleep_state="{s}"}} {float(v)}' for s, v in states.items()]
        metric("mvllm_sim:clock_seconds", "gauge", CLOCK_HELP, clock)
        metric("mvllm_sim:engine_steps_total", "counter", "Engine steps run.", c.steps)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
