"""mvllmd's Prometheus metrics, on a registry of its own (never prometheus_client's global one).

Events (metrics/__init__.py) are counted as they happen; what already exists is read when Prometheus
scrapes, by collectors: the instances by engine and state (and any other source of servers added with
`count_servers`, as the external servers will be), the requests in flight at each server and its
breaker (`watch_servers`), and each GPU's utilisation and memory through NVML (`read_gpus`, called by
the front door before each rendering, off the event loop). README, "Metrics", lists them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mvllmd.errors import InventoryError
from mvllmd.inventory import GpuUsage, read_gpu_usage
from mvllmd.metrics import DoorTotals, Events

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
# Time to first byte and in all: from a few milliseconds (an instant server) to long generations.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

ServerCount = Callable[[], Iterable[tuple[str, str]]]  # (engine, state) of each server of one source


class ServerState(Protocol):
    """What is read of each server at a scrape (dispatch/endpoint.py's Endpoint)."""

    url: str
    inflight: int
    trips: int
    hangs: int

    @property
    def out(self) -> bool: ...


ServerStates = Callable[[], Iterable[ServerState]]  # every server in the endpoint table


class Metrics(Events):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("mvllm_frontdoor_requests", "Front-door requests ended, by the server that "
                                 "answered last and the status the client got", ["model", "server", "status"],
                                 registry=r)  # fmt: skip
        self._first_byte = Histogram("mvllm_frontdoor_first_byte_seconds", "Front-door time to the answer's "
                                     "first byte", ["model"], buckets=BUCKETS_S, registry=r)  # fmt: skip
        self._total = Histogram("mvllm_frontdoor_request_seconds", "Front-door time from request to the "
                                "answer's end", ["model"], buckets=BUCKETS_S, registry=r)  # fmt: skip
        self._retries = Counter("mvllm_frontdoor_retries", "Front-door requests sent to another server before "
                                "their answer began", ["model"], registry=r)  # fmt: skip
        self._continued = Counter("mvllm_frontdoor_continued_streams", "Streamed choices cut mid-way that went "
                                  "on on another server", ["model"], registry=r)  # fmt: skip
        self._stream_failed = Counter("mvllm_frontdoor_stream_errors", "Streamed answers cut mid-way that "
                                      "ended with an error event", ["model"], registry=r)  # fmt: skip
        self._samples = Counter("mvllm_job_samples", "Job samples written (errors included)", ["model"], registry=r)
        self._errors = Counter("mvllm_job_sample_errors", "Job samples written as errors", ["model"], registry=r)
        self._tokens = Counter("mvllm_job_completion_tokens", "Completion tokens of job samples written", ["model"],
                               registry=r)  # fmt: skip
        self._door_children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._sample_children: dict[str, tuple[Any, Any, Any]] = {}
        self._fleet = _Fleet()
        self._servers = _Servers()
        self._gpus = _Gpus()
        for collector in (self._fleet, self._servers, self._gpus):
            r.register(collector)

    # --- what is read at scrape time --------------------------------------------------------------

    def count_servers(self, source: ServerCount) -> None:
        """Count a source's servers by engine and state at each scrape: the instance manager's, and
        the external servers' (engine "external")."""
        self._fleet.sources.append(source)

    def watch_servers(self, source: ServerStates) -> None:
        """Report each server's requests in flight, breaker, trips and hangs at each scrape."""
        self._servers.source = source

    def read_gpus(self) -> None:
        """Read each GPU's utilisation and memory (NVML; none without it). Blocking: call it in a thread."""
        try:
            self._gpus.usage = read_gpu_usage()
        except InventoryError as exc:
            log.debug("no GPU metrics: %s", exc)
            self._gpus.usage = ()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def door_totals(self) -> DoorTotals:
        """The front door's counters as plain totals, read from the counters themselves."""
        statuses: dict[int, int] = {}
        for labels, value in _totals(self._requests):
            status = int(labels["status"])
            statuses[status] = statuses.get(status, 0) + int(value)
        return DoorTotals(
            statuses=tuple(sorted(statuses.items())),
            retries=sum(int(v) for _, v in _totals(self._retries)),
            continued=sum(int(v) for _, v in _totals(self._continued)),
            stream_errors=sum(int(v) for _, v in _totals(self._stream_failed)),
        )

    # --- events ------------------------------------------------------------------------------------

    def door_request(self, model: str, server: str, status: int, first_byte_s: float | None, total_s: float) -> None:
        # The labelled children once per (model, server, status): labels() costs more than counting.
        children = self._door_children.get((model, server, status))
        if children is None:
            children = (self._requests.labels(model, server, str(status)), self._first_byte.labels(model),
                        self._total.labels(model))  # fmt: skip
            self._door_children[(model, server, status)] = children
        requests, first_byte, total = children
        requests.inc()
        if first_byte_s is not None:
            first_byte.observe(first_byte_s)
        total.observe(total_s)

    def door_retry(self, model: str) -> None:
        self._retries.labels(model).inc()

    def door_continued(self, model: str) -> None:
        self._continued.labels(model).inc()

    def door_stream_failed(self, model: str) -> None:
        self._stream_failed.labels(model).inc()

    def samples(self, model: str, done: int, errors: int, tokens: int) -> None:
        # Called for each answer a job writes: the children once per model, as door_request's.
        children = self._sample_children.get(model)
        if children is None:
            children = self._sample_children[model] = (
                self._samples.labels(model), self._errors.labels(model), self._tokens.labels(model)
            )  # fmt: skip
        samples, failed, made = children
        samples.inc(done)
        failed.inc(errors)
        made.inc(tokens)


def _totals(counter: Counter) -> Iterator[tuple[dict[str, str], float]]:
    """Each label set's total of a counter (its `_total` samples; not `_created`)."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, sample.value


class _Fleet(Collector):
    def __init__(self) -> None:
        self.sources: list[ServerCount] = []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("mvllm_instances", "Servers by engine (external: attached, not launched) "
                                   "and state", labels=["engine", "state"])  # fmt: skip
        counts: dict[tuple[str, str], int] = {}
        for source in self.sources:
            for key in source():
                counts[key] = counts.get(key, 0) + 1
        for (engine, state), count in sorted(counts.items()):
            family.add_metric([engine, state], count)
        yield family


class _Servers(Collector):
    def __init__(self) -> None:
        self.source: ServerStates = list

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily("mvllm_server_inflight", "Samples of mvllmd's in flight at each server "
                                     "(jobs' and the front door's; a request's choices count until it returns)",
                                     labels=["server"])  # fmt: skip
        out = GaugeMetricFamily("mvllm_server_breaker_open", "1 while a server is taken out (breaker open, "
                                "or hung)", labels=["server"])  # fmt: skip
        hangs = CounterMetricFamily("mvllm_server_hangs", "Times a server was taken out as hung (since it "
                                    "joined the endpoint table)", labels=["server"])  # fmt: skip
        trips = CounterMetricFamily("mvllm_server_breaker_trips", "Times a server's breaker opened (failures "
                                    "in a row, or a failed probe) since it joined", labels=["server"])  # fmt: skip
        for server in self.source():
            inflight.add_metric([server.url], server.inflight)
            out.add_metric([server.url], int(server.out))
            hangs.add_metric([server.url], server.hangs)
            trips.add_metric([server.url], server.trips)
        yield from (inflight, out, hangs, trips)


class _Gpus(Collector):
    def __init__(self) -> None:
        self.usage: tuple[GpuUsage, ...] = ()

    def collect(self) -> Iterator[Metric]:
        labels = ["gpu", "uuid", "name"]
        util = GaugeMetricFamily("mvllm_gpu_utilization_ratio", "Share of the last sample period a kernel ran "
                                 "on the GPU (NVML)", labels=labels)  # fmt: skip
        used = GaugeMetricFamily("mvllm_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=labels)
        total = GaugeMetricFamily("mvllm_gpu_memory_total_bytes", "GPU memory in all (NVML)", labels=labels)
        for gpu in self.usage:
            names = [str(gpu.index), gpu.uuid, gpu.name]
            util.add_metric(names, gpu.utilization)
            used.add_metric(names, gpu.memory_used_bytes)
            total.add_metric(names, gpu.memory_total_bytes)
        yield from (util, used, total)
