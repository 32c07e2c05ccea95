"""Prometheus metrics of one server. Engine-side values are set by the engine thread only."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from idlm.engine.llm_engine import LLMEngine, RequestOutput

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TPF_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                   960.0)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("idlm_requests", "Requests by outcome: ok, aborted (the client left), or the HTTP "
                                "error status they were answered with (mid-stream errors included)", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("idlm_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("idlm_generation_tokens", "Committed output tokens", registry=r)
        self.forwards = Counter("idlm_engine_forwards", "Engine steps (one batched forward each)", registry=r)
        self.tokens_per_forward = Gauge("idlm_tokens_per_forward", "Output tokens per forward over the "
                                        "finished requests (each request counts the forwards it took part in)",
                                        registry=r)
        self.request_tpf = Histogram("idlm_request_tokens_per_forward", "Tokens per forward of each finished "
                                     "request", buckets=TPF_BUCKETS, registry=r)
        self.drafts_reached = Counter("idlm_drafts_reached", "Verify rounds whose scan reached draft position j",
                                      ["position"], registry=r)
        self.drafts_accepted = Counter("idlm_drafts_accepted", "Verify rounds that accepted the draft at "
                                       "position j", ["position"], registry=r)
        self.draft_acceptance = Gauge("idlm_draft_acceptance", "P(draft at position j accepted | reached)",
                                      ["position"], registry=r)
        self.rounds = Counter("idlm_rounds", "Multi-token rounds by kind: cold (no draft to test), verify, and "
                              "branch (a verify round testing drafts a branch proposed)", ["kind"], registry=r)
        self.branch_drafts_accepted = Counter("idlm_branch_drafts_accepted", "Accepted drafts that a branch "
                                              "proposed", registry=r)
        self.stride_chosen = Counter("idlm_stride_steps", "Decode steps by the K (drafts a round) the adaptive "
                                     "policy chose for its requests (0: plain AR steps)", ["k"], registry=r)
        self.queue_depth = Gauge("idlm_queue_depth", "Requests waiting for a slot in the running batch", registry=r)
        self.running = Gauge("idlm_running_requests", "Requests in the running batch", registry=r)
        self.kv_used = Gauge("idlm_kv_blocks_used", "KV cache blocks held by requests", registry=r)
        self.kv_free = Gauge("idlm_kv_blocks_free", "KV cache blocks free (prefix-cached ones included)", registry=r)
        self.kv_total = Gauge("idlm_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.step_seconds = Histogram("idlm_step_seconds", "Wall time of one engine step", buckets=STEP_BUCKETS,
                                      registry=r)
        self.ttft = Histogram("idlm_time_to_first_token_seconds", "From a request's arrival (before tokenising) "
                              "to its first output token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("idlm_inter_token_latency_seconds", "Per output token after the first: the time since "
                             "the request's previous output over the tokens this output carried (a round "
                             "commits several at once)", buckets=ITL_BUCKETS, registry=r)
        self.request_seconds = Histogram("idlm_request_latency_seconds", "From a request's arrival to its last "
                                         "token (finished requests)", buckets=LATENCY_BUCKETS, registry=r)
        self._reached: list[int] = []
        self._accepted: list[int] = []
        self._seen: dict[tuple, int] = {}

    def observe_step(self, outputs: list[RequestOutput], seconds: float) -> None:
        self.forwards.inc()
        self.step_seconds.observe(seconds)
        for out in outputs:
            self.generation_tokens.inc(len(out.new_token_sources))
            if out.finished:
                self.requests.labels("ok").inc()
                self.request_tpf.observe(out.stats["tokens_per_forward"])

    def observe_latency(self, arrival: float, previous: float | None, now: float, tokens: int) -> None:
        """An output of `tokens` tokens of one request at `now`."""
        if previous is None:
            self.ttft.observe(now - arrival)
            previous, tokens = now, tokens - 1  # the first token's wait is TTFT; the rest came with it
        for _ in range(tokens):
            self.itl.observe((now - previous) / tokens)

    def observe_engine(self, engine: LLMEngine) -> None:
        bm = engine.block_manager
        self.queue_depth.set(len(engine.scheduler.waiting))
        self.running.set(len(engine.scheduler.running))
        self.kv_total.set(len(bm.blocks))
        self.kv_free.set(bm.num_free)
        self.kv_used.set(len(bm.blocks) - bm.num_free)
        self.tokens_per_forward.set(engine.stats.tokens_per_forward)
        drafts = engine.stats.drafts
        self._count(self.drafts_reached, self._reached, drafts.reached)
        self._count(self.drafts_accepted, self._accepted, drafts.accepted)
        for j, rate in enumerate(drafts.acceptance(), start=1):
            self.draft_acceptance.labels(str(j)).set(rate)
        st = engine.stats
        for kind in ("cold", "verify", "branch"):
            self._advance(self.rounds.labels(kind), ("rounds", kind), getattr(st, f"{kind}_rounds"))
        self._advance(self.branch_drafts_accepted, ("branch_accepted",), st.branch_drafts_accepted)
        for k, steps in list(engine.policy.chosen.items()):
            self._advance(self.stride_chosen.labels(str(k)), ("k", k), steps)

    def _advance(self, counter, key: tuple, total: int) -> None:
        """Advance a counter to the engine's running total."""
        if total > self._seen.get(key, 0):
            counter.inc(total - self._seen.get(key, 0))
            self._seen[key] = total

    @staticmethod
    def _count(counter: Counter, seen: list[int], totals: list[int]) -> None:
        """Advance a per-position counter to the engine's running totals."""
        seen.extend([0] * (len(totals) - len(seen)))
        for j, total in enumerate(totals):
            if total > seen[j]:
                counter.labels(str(j + 1)).inc(total - seen[j])
                seen[j] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
