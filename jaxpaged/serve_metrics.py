"""Prometheus metrics for `jaxpaged.serve`, under vLLM's metric names where vLLM has one.

Each server owns its registry (not prometheus_client's global one), so several servers in one
process, as in the tests, never collide. The engine thread writes (after every step and for
every finished request); `/metrics` only reads, and prometheus_client's types are thread-safe.
"""

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jaxpaged.outputs import RequestOutput
from jaxpaged.scheduler import SchedulerStats

# vLLM's bucket boundaries, so dashboards built for vLLM read ours unchanged.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        # Counters' `_created` timestamps double the output and vLLM leaves them out too.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}
        self._running = Gauge("vllm:num_requests_running", "Requests in the running batch",
                              **labels).labels(model_name)
        self._waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled",
                              **labels).labels(model_name)
        self._kv_usage = Gauge("vllm:kv_cache_usage_perc",
                               "Fraction of KV-cache blocks held by requests (1 = full)",
                               **labels).labels(model_name)
        self._hit_rate = Gauge("jaxpaged:prefix_cache_hit_rate",
                               "Prefix-cache hits / queries in tokens, since start",
                               **labels).labels(model_name)
        self._preemptions = Counter("vllm:num_preemptions", "Preemptions (recompute)",
                                    **labels).labels(model_name)
        self._pc_queries = Counter("vllm:prefix_cache_queries",
                                   "Prompt tokens looked up in the prefix cache",
                                   **labels).labels(model_name)
        self._pc_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix "
                                "cache", **labels).labels(model_name)
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests",
                                      **labels).labels(model_name)
        self._generation_tokens = Counter("vllm:generation_tokens",
                                          "Generated tokens of finished requests",
                                          **labels).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                               buckets=_TTFT_BUCKETS, **labels).labels(model_name)
        self._tpot = Histogram("vllm:time_per_output_token_seconds",
                               "Mean time per output token after the first, per request",
                               buckets=_TPOT_BUCKETS, **labels).labels(model_name)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish",
                              buckets=_E2E_BUCKETS, **labels).labels(model_name)
        self._last = SchedulerStats(0, 0, 0, 0.0, 0, 0, 0.0)

    def on_stats(self, stats: SchedulerStats) -> None:
        """Gauges take the latest value; counters advance by what the totals grew."""
        self._running.set(stats.num_running_reqs)
        self._waiting.set(stats.num_waiting_reqs)
        self._kv_usage.set(stats.kv_cache_usage)
        self._hit_rate.set(stats.prefix_cache_hit_rate)
        last = self._last
        self._preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self._pc_queries.inc(max(0, stats.prefix_cache_queries - last.prefix_cache_queries))
        self._pc_hits.inc(max(0, stats.prefix_cache_hits - last.prefix_cache_hits))
        self._last = stats

    def on_finished(self, output: RequestOutput) -> None:
        for c in output.outputs:
            self._success.labels(self._model_name, c.finish_reason or "unknown").inc()
        if output.error is not None:
            return
        num_out = sum(len(c.token_ids) for c in output.outputs)
        self._prompt_tokens.inc(len(output.prompt_token_ids or []))
        self._generation_tokens.inc(num_out)
        m = output.metrics
        if m is None or m.finished_time is None:
            return
        self._e2e.observe(m.finished_time - m.arrival_time)
        if m.first_token_time is not None:
            self._ttft.observe(m.first_token_time - m.arrival_time)
            num_later = max(len(c.token_ids) for c in output.outputs) - 1
            if num_later > 0:
                self._tpot.observe((m.finished_time - m.first_token_time) / num_later)

    def render(self) -> bytes:
        return generate_latest(self.registry)
