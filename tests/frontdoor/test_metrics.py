"""GET /metrics of a real mvllmd after real traffic through its front door to two simulator instances,
read with prometheus_client's own parser."""

from __future__ import annotations

from pathlib import Path

import httpx
import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families
from test_daemon_front_door import front_door

from mvllmd.metrics.prometheus import Metrics

from daemonkit import Spawn
from jobkit import FAST_SIM, daemon_args, launch, submit, wait_ended, write_prompts


def test_metrics_follow_the_traffic(short_tmp: Path, spawn: Spawn) -> None:
    daemon = spawn(daemon_args(short_tmp))
    url = front_door(daemon)
    launch(daemon, 2, *FAST_SIM, model="m")
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(10):
            answer = client.post("/v1/completions", json={"model": "m", "prompt": f"p{i}", "max_tokens": 4})
            assert answer.status_code == 200
        body = {"model": "m", "prompt": "s", "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200 and "[DONE]" in stream.read().decode()
        assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        # A job too: its samples, errors and completion tokens, counted as its answers are written.
        job_id = submit(daemon, write_prompts(short_tmp / "in.parquet", 30), short_tmp / "out.parquet", "-k", "2",
                        "--max-tokens", "4", "--model", "m")  # fmt: skip
        ended = wait_ended(daemon, job_id)
        assert ended["state"] == "JOB_STATE_SUCCEEDED" and ended["samples_done"] == 60
        scraped = client.get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = [s for family in text_string_to_metric_families(scraped.text) for s in family.samples]

    def values(name: str, **labels: str) -> list[float]:
        return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]

    assert values("mvllm_instances", engine="sim", state="ready") == [2.0]
    served = values("mvllm_frontdoor_requests_total", model="m", status="200")
    assert sum(served) == 11  # ten answers and one stream, each counted under the server that answered
    assert values("mvllm_frontdoor_first_byte_seconds_count", model="m") == [11.0]
    assert values("mvllm_frontdoor_request_seconds_count", model="m") == [11.0]
    assert sum(values("mvllm_frontdoor_retries_total")) == 0
    assert sorted(values("mvllm_server_inflight")) == [0.0, 0.0]  # two servers, nothing in flight now
    assert values("mvllm_server_breaker_open") == [0.0, 0.0]
    assert values("mvllm_frontdoor_requests_total", model="nope") == []  # refused at the door, never forwarded
    assert values("mvllm_job_samples_total", model="m") == [60.0]
    assert values("mvllm_job_sample_errors_total", model="m") == [0.0]
    written = sum(pq.read_table(short_tmp / "out.parquet")["completion_tokens"].to_pylist())
    assert 0 < written <= 60 * 4 and values("mvllm_job_completion_tokens_total", model="m") == [float(written)]


def test_the_front_doors_histograms_count_as_prometheus_does() -> None:
    """A value on a bound counts in that bucket (le: less or equal); buckets are cumulative; the parser
    of prometheus_client reads what is written."""
    metrics = Metrics()
    for first_byte, total in ((0.005, 0.02), (None, 700.0), (0.3, 0.3)):
        metrics.door_request("m", "http://a", 200, first_byte, total)
    metrics.door_request("m", "http://b", 503, None, 0.001)
    families = text_string_to_metric_families(metrics.render().decode())
    samples = {(s.name, s.labels.get("le", ""), s.labels.get("server", "")): s.value
               for family in families for s in family.samples}  # fmt: skip
    assert samples[("mvllm_frontdoor_first_byte_seconds_bucket", "0.005", "")] == 1
    assert samples[("mvllm_frontdoor_first_byte_seconds_bucket", "0.25", "")] == 1
    assert samples[("mvllm_frontdoor_first_byte_seconds_bucket", "0.5", "")] == 2
    assert samples[("mvllm_frontdoor_first_byte_seconds_count", "", "")] == 2
    assert samples[("mvllm_frontdoor_request_seconds_bucket", "600.0", "")] == 3  # 700 s is past the last bound
    assert samples[("mvllm_frontdoor_request_seconds_bucket", "+Inf", "")] == 4
    assert samples[("mvllm_frontdoor_request_seconds_sum", "", "")] == 700.0 + 0.02 + 0.3 + 0.001
    assert samples[("mvllm_frontdoor_requests_total", "", "http://a")] == 3
    assert metrics.door_totals().statuses == ((200, 3), (503, 1))
