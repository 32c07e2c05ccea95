import contextlib
import dataclasses
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from idlm.config import MAX_STRIDE, EngineConfig
from idlm.decoding.layout import max_branches
from idlm.decoding.noise import compile_noise
from idlm.engine.block_manager import BlockManager
from idlm.engine.detokenizer import IncrementalDetokenizer
from idlm.engine.runner import ModelRunner, PendingRound, RoundOutcome
from idlm.engine.sampling_params import SamplingParams
from idlm.engine.scheduler import ScheduledBatch, Scheduler
from idlm.engine.sequence import Sequence, TokenSource
from idlm.engine.stats import EngineStats, request_stats
from idlm.engine.step_cost import measure_step_cost, rows_of_round
from idlm.engine.stride_policy import StridePolicy
from idlm.engine.structured import Grammars
from idlm.engine.tensor_parallel import TensorParallel, check_tensor_parallel
from idlm.kernels.attention import TritonPagedAttention
from idlm.models.config import ModelConfig
from idlm.models.generation_config import sampling_defaults
from idlm.models.loader import (
    auto_dtype,
    gguf_source,
    load_model,
    model_name,
    parse_dtype,
    resolve_model_folder,
    resolve_quantization,
)
from idlm.models.lora import DEFAULT_ADAPTER, fuse_for_inference, load_adapter, widen_for_inference
from idlm.models.tokenizer import generation_eos_ids, load_tokenizer
from idlm.models.transformer import compile_elementwise

MASK_TOKEN_NAMES = ("<|MASK|>",)  # the I-DLM release's name for it


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    new_text: str = ""  # released by the step that produced this output
    new_token_sources: list[int] = field(default_factory=list)  # TokenSource of this step's tokens
    # of every output token, on the finished output only (copying them every step is O(length)):
    token_sources: list[int] = field(default_factory=list)  # TokenSource
    token_q: list[float] = field(default_factory=list)  # probability it was proposed (drafts) or drawn with
    # params.logprobs set: (log p, [(token id, log p) of the likeliest tokens]) of each token, under
    # the model's raw distribution; this step's tokens, and every token on the finished output
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # params.prompt_logprobs set: the same for prompt tokens 1.. (on the first and the finished output)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # stats.request_stats: its counters; every one when finished


class LLMEngine:
    """Owns the model, the KV pool, the scheduler and the runner; `step()` advances every running
    request by one forward. The server and the offline `LLM` both drive it."""

    def __init__(self, config: EngineConfig):
        self.tp: TensorParallel | None = None
        try:
            self._init(config)
        except BaseException:
            self.close()  # a tensor-parallel engine's workers end with it
            raise

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (also done when the engine is collected)."""
        if self.tp is not None:
            if getattr(self, "runner", None) is not None:
                self.runner.drop_graphs()  # before the group ends: a live graph holds its communicator
            self.tp.close()

    def _init(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.name = model_name(config.model)  # in messages: the folder may be a cache path the user never gave
        self.folder = resolve_model_folder(config.model)
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        self.quantization = resolve_quantization(config.model, config.quantization, self.device)
        dtype = config.dtype if config.dtype != "auto" else auto_dtype(self.device, self.quantization)
        adapter = config.adapter
        if adapter is None and config.model is None:  # the embedded default: SmolLM2 + its R-ISD adapter
            adapter = str(DEFAULT_ADAPTER)
        adapter = adapter if adapter and adapter != "none" else None
        if config.tensor_parallel_size > 1:
            check_tensor_parallel(ModelConfig.from_folder(self.folder), config.tensor_parallel_size, self.quantization,
                                  self.name, adapter)
            self.tp = TensorParallel(self.folder, parse_dtype(dtype), self.device, config.tensor_parallel_size,
                                     adapter, gguf_source(config.model),
                                     compile=self.device.type == "cuda" and not config.enforce_eager,
                                     progress=config.progress)
            self.model = self.tp.model
            self.model_config = self.tp.config  # the whole model's (self.model.cfg: this rank's heads)
        else:
            self.model = load_model(self.folder, parse_dtype(dtype), self.device, progress=config.progress,
                                    quantization=self.quantization, gguf_path=gguf_source(config.model))
            self.model_config = self.model.cfg
        if self.device.type == "cpu":
            self.model.store_head_column_major()
        elif not config.enforce_eager:
            compile_elementwise()
            compile_noise(self.device)
        self.tokenizer = load_tokenizer(self.folder)
        if config.chat_template is not None:
            self._set_chat_template(config.chat_template)
        self.sampling_defaults = sampling_defaults(config.generation_config, self.folder)
        try:
            SamplingParams(**self.sampling_defaults)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the generation config of {self.name}: {e}; fix it or pass --generation-config "
                             f"vllm") from e
        if self.tp is not None:
            self.adapter = self.tp.adapter  # loaded by every rank before the cut
        else:
            self.adapter = load_adapter(self.model, adapter) if adapter else None
        fuse_for_inference(self.model)
        if config.deterministic:
            head_dim = self.model_config.head_dim
            if self.device.type == "cuda" and not TritonPagedAttention.supports(self.device, head_dim):
                raise ValueError(f"deterministic mode needs the Triton attention kernel, which takes power-of-two "
                                 f"head dims of at least 16; {self.name} has {head_dim}")
            self.model.use_batch_invariant()
        elif self.device.type == "cuda" and self.tp is None and os.environ.get("IDLM_WIDE_LORA", "1") != "0":
            # one GEMM for the base output and x A^T, then the gated delta (models/lora.py);
            # IDLM_WIDE_LORA=0 keeps the two-weight kernel, IDLM_WIDE_UNGATED=0 the base weight
            # alone in steps without gated rows (for comparisons)
            widen_for_inference(self.model, ungated_too=os.environ.get("IDLM_WIDE_UNGATED", "1") != "0")
        self.mask_ids = {"isd": self._find_mask_token(), "risd": None}
        self.mask_ids["risd"] = self._risd_mask_token()
        default_mode = config.mode or ("risd" if self.adapter else "isd" if self.mask_ids["isd"] is not None else "ar")
        trained_stride = (self.model_config.draft_block or 3) + 1
        self.defaults = dict(mode=default_mode, stride=config.stride or min(MAX_STRIDE, max(2, trained_stride)),
                             proposal=config.proposal, stride_policy=config.stride_policy, branches=config.branches)
        SamplingParams(**self.defaults)  # validates the engine defaults
        self.eos_ids = set(self.model_config.eos_token_ids) | generation_eos_ids(self.folder)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        self.runner = ModelRunner.start(self.model, config, self.model_config, self.name, self.mask_ids,
                                        banned_token=self.mask_ids["isd"],
                                        row_exact=self.quantization != "none" or config.deterministic, tp=self.tp)
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.kv_block_size, config.enable_prefix_caching)
        self.policy = StridePolicy(config.stride_policy, config.branches,
                                   measure_step_cost(self.runner, config.max_num_seqs))
        self.scheduler = Scheduler(config, self.block_manager, self.policy)
        self.stats = EngineStats()
        # (batch, rows, start, graphs captured by then) of the step before
        self._decode_step: tuple[int, int, float, int] | None = None
        self._decode_ids: tuple[int, ...] = ()  # the requests of the last decode step
        # overlap scheduling: the next step (a decode step of the same requests, or a prefill of
        # waiting ones), launched before the outcome of the current one was read
        self.in_flight: tuple[ScheduledBatch, PendingRound | None] | None = None
        self.last_batch: ScheduledBatch | None = None  # the batch whose outcome the last step applied
        self.seed_source = random.Random(config.seed)
        self.seqs: dict[int, Sequence] = {}
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}

    def _set_chat_template(self, template: str) -> None:
        """template: a Jinja file, or the template itself (vLLM's --chat-template)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer, so no chat template applies; leave out --chat-template")
        path = Path(template).expanduser()
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # inline template text too long, or odd, for a file name
            is_file = False
        if is_file:
            try:
                template = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read the chat template {path} ({e})") from e
        elif "{{" not in template and "{%" not in template:
            raise ValueError(f"chat template {template!r} is neither a file nor a Jinja template; give a path to a "
                             f".jinja file or the template text")
        self.tokenizer.chat_template = template

    def default_sampling_params(self, **fields) -> SamplingParams:
        """SamplingParams of the model's generation config (see --generation-config), then `fields`."""
        return SamplingParams(**(self.sampling_defaults | fields))

    def _find_mask_token(self) -> int | None:
        if self.model_config.mask_token_id is not None:
            return self.model_config.mask_token_id
        if self.tokenizer is None or self.model_config.block_diffusion:
            return None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # (a lookup a name: the whole vocabulary as a dict took 60 ms of a start)
            return next((i for i in map(backend.token_to_id, MASK_TOKEN_NAMES) if i is not None), None)
        vocab = self.tokenizer.get_vocab()
        return next((vocab[name] for name in MASK_TOKEN_NAMES if name in vocab), None)

    def _risd_mask_token(self) -> int:
        """The MASK id of R-ISD rows: the adapter's, else the model's, else any id (a risd request
        without adapter is still exact: its MASK rows then only make poor drafts)."""
        if self.adapter is not None and self.adapter.mask_token_id is not None:
            return self.adapter.mask_token_id
        if self.mask_ids["isd"] is not None:
            return self.mask_ids["isd"]
        return self.tokenizer.eos_token_id if self.tokenizer is not None and self.tokenizer.eos_token_id else 0

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """params with the engine defaults filled in, checked against this model."""
        params.validate()
        filled = {k: v for k, v in self.defaults.items() if getattr(params, k) is None}
        params = dataclasses.replace(params, **filled)
        if params.mode == "isd" and self.model_config.block_diffusion:
            raise ValueError(f"{self.name} is the SDAR-style baseline (idlm_objective: sdar): its MASKs are trained "
                             "for block diffusion, not for ISD; use mode ar (scripts/eval_sdar_baseline.py measures "
                             "its own decoding)")
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias names token ids the model does not have; its vocabulary has ids 0 to "
                             f"{vocab - 1}")
        if params.json_schema is not None:
            self.grammars.compile(params.json_schema)
        if params.mode == "isd" and self.mask_ids["isd"] is None:
            raise ValueError(f"mode isd needs an I-DLM checkpoint with a MASK token (mask_token_id in config.json); "
                             f"{self.name} has none: use mode ar, or mode risd with an adapter")
        return params

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.name} has no tokenizer; pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"token ids must be integers in [0, {vocab})")
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                             f"(prompt + output); shorten the prompt")
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} has no chat template; use plain prompts, or give one with --chat-template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise ValueError("a chat is a list of {'role': ..., 'content': ...} messages")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenize(self.tokenizer.encode(text, add_special_tokens=False))

    def add_request(self, prompt: str | list[int], params: SamplingParams) -> int:
        params = self.resolve(params)
        ids = self.tokenize(prompt)
        seed = params.seed if params.seed is not None else self.seed_source.getrandbits(63)
        seq = Sequence(ids, params, seed)
        if params.json_schema is not None:
            seq.constraint = self.grammars.constraint(params.json_schema)
        self.seqs[seq.seq_id] = seq
        self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
        self.detokenizers.pop(request_id, None)

    @property
    def replays_graphs(self) -> bool:
        """Decode steps replay CUDA graphs (captured as each shape first comes, or prepared)."""
        graphs = self.runner.decode_graphs
        return graphs is not None and graphs.use_graphs

    def prepare_decode_steps(self, max_stride: int | None = None) -> float | None:
        """Before serving: every batch size up to max_num_seqs priced for the adaptive stride policy
        (where the default policy adapts) and, with CUDA graphs, every decode shape's graphs captured,
        by timing dummy steps of each (step_cost.py). Otherwise the first step at each new batch size
        or shape measures or captures it while the running requests wait: one step of 5.7 s at 64
        requests on an H200 for the prices; about 60 ms a graph. Returns the seconds it took, or None
        where there is nothing to prepare. max_stride: the longest stride to prepare the rounds of
        (default: the engine's default stride)."""
        adaptive = self.defaults["stride_policy"] == "adaptive" and self.defaults["mode"] != "ar"
        if not (self.replays_graphs or adaptive):
            return None
        drafts = self.mask_ids["isd"] is not None or self.mask_ids["risd"] is not None
        # the rounds of the default stride at most (a request asking for a longer one measures and
        # captures its shapes when it comes); an engine that cannot draft runs AR steps alone
        k = (max_stride or self.defaults["stride"]) - 1 if drafts else 0
        rows = rows_of_round(k, max_branches(k, k))
        start = time.perf_counter()
        with self.tp.guard() if self.tp is not None else contextlib.nullcontext():  # (dummy steps run on every rank)
            self.policy.cost.measure_up_to(self.config.max_num_seqs, rows)
        return time.perf_counter() - start

    def prepared(self, seconds: float) -> str:
        """What prepare_decode_steps did, in a line for a log."""
        done = "timed and their CUDA graphs captured" if self.replays_graphs else "timed (the adaptive stride's prices)"
        return f"decode steps up to {self.config.max_num_seqs} requests {done} in {seconds:.1f} s"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def step(self) -> list[RequestOutput]:
        """One forward; returns an output for every request that advanced (finished ones last time)."""
        if self.tp is None:
            return self._step()
        with self.tp.guard():  # (scheduling runs steps too: the adaptive stride's first measurement)
            return self._step()

    def _step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        captured = self.runner.graphs_captured()
        if self._decode_step is not None:
            # what a decode step costs is the time until the next one can start: scheduling, the
            # round's bookkeeping and the caller's work on the outputs as well as the forward
            batch_size, rows, began, captured_then = self._decode_step
            if captured == captured_then:  # a step that captured a graph (and compiled its kernels) is no price
                self.policy.cost.observe(batch_size, rows, start - began)
            self._decode_step = None
        self.last_batch = None
        if self.in_flight is not None:  # launched by the step before (overlap scheduling)
            (batch, pending), self.in_flight = self.in_flight, None
            self.stats.decode_steps_launched_ahead += not batch.is_prefill
        else:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
            pending = self.runner.launch(batch.seqs, batch.num_new_tokens)
        self.last_batch = batch
        if self.config.overlap_scheduling and pending is not None:
            self._launch_ahead(batch)
        try:
            outputs = self._finish_step(batch, pending, (start, captured))
        except BaseException:
            self.in_flight = None  # a failed step voids the one launched after it
            raise
        if self.in_flight is not None and all(seq.is_finished for seq in self.in_flight[0].seqs):
            # every request of the step launched ahead finished in this one: its round is void, and
            # the engine is idle once the GPU is done with it
            (_, void), self.in_flight = self.in_flight, None
            if void is not None:
                void.result.read()
        return outputs

    def _launch_ahead(self, batch: ScheduledBatch) -> None:
        """Overlap scheduling: launches the step after `batch` (in flight) where it does not depend
        on batch's outcome, as in_flight: the decode step of the same requests, or else a prefill
        of waiting ones."""
        # the requests of the decode step after this one: this one's, or after a prefill every running one
        follow = list(self.scheduler.running) if batch.is_prefill else [s for s in batch.seqs if not s.is_finished]
        if not self.runner.can_launch_next(follow):
            return
        # the next step goes to the GPU before this one's outcome comes back, so the host's work on
        # that outcome runs while the GPU computes
        planned = self.policy.state()
        nxt = self.scheduler.schedule_next(follow)
        ahead = self.runner.launch_next(nxt.seqs) if nxt is not None else None
        if ahead is not None:
            self.in_flight = (nxt, ahead)
            if self.scheduler.on_schedule is not None:
                self.scheduler.on_schedule(nxt)
            return
        self.policy.restore(planned)  # the synchronous step plans, and counts, the step again
        if self.scheduler.waiting and not batch.is_prefill:
            # requests wait to join: their prefill does not depend on this step's outcome either
            # (after a prefill step it might: a prompt's next chunk needs this one's commit)
            prefill = self.scheduler.schedule_prefill()
            if prefill is not None:
                self.in_flight = (prefill, self.runner.launch(prefill.seqs, prefill.num_new_tokens))

    def _finish_step(self, batch: ScheduledBatch, pending: PendingRound | None,
                     began: tuple[float, int]) -> list[RequestOutput]:
        """Reads the step's outcome and applies it: the outputs of every request that advanced.
        began: when the step started, and the graphs captured by then."""
        outcomes = self.runner.collect(pending)
        if self.tp is not None:
            self.tp.check()  # before the outcomes are applied (on CUDA a dead worker's collectives end aborted)
        self.stats.forwards += 1
        rounds: Counter[tuple[str, int, int]] = Counter()
        ahead_ids = {seq.seq_id for seq in self.in_flight[0].seqs} if self.in_flight is not None else set()
        outputs = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.is_finished:  # finished, or aborted, while this step was in flight: its round is void
                continue
            seq.stats.forwards += 1
            if i not in outcomes:
                self.block_manager.commit(seq, seq.num_computed + n)
                continue
            first_new = seq.num_output_tokens
            self._apply_round(seq, outcomes[i], rounds, keep_blocks=seq.seq_id in ahead_ids)
            outputs.append(self._output(seq, first_new))
        # the engine's draft counters, one entry per kind of round rather than per request
        for (mode, num_drafts, accepted), times in rounds.items():
            self.stats.drafts.record(num_drafts, accepted, times)
            self.policy.observe(mode, num_drafts, accepted, times)
        ids = () if batch.is_prefill else tuple(seq.seq_id for seq in batch.seqs)
        # only a step of the same requests as the decode step before it is timed: the first one after a
        # request joins or leaves carries that change's work (its inputs built on the host, a prefill
        # in flight), whatever its shape, and the policy replans right then, so charging it to the new
        # plan's shape once priced AR steps 30% too high at 64 requests with refills
        if ids and ids == self._decode_ids and self.has_unfinished():  # (a last step has no next step to time to)
            rows = max(seq.layout.num_rows for seq in batch.seqs)  # the plan is still the one that ran
            self._decode_step = (len(batch.seqs), rows, *began)
        self._decode_ids = ids
        return outputs

    def _apply_round(self, seq: Sequence, r: RoundOutcome, rounds: Counter, keep_blocks: bool = False) -> None:
        """Commits the round's tokens to seq; its kind of round, (mode, drafts, accepted), counted
        in `rounds` for the engine's counters."""
        tokens = seq.drafts[:r.accepted] + [r.final_token]
        sources = [TokenSource.DRAFT] * r.accepted + [
            TokenSource.CORRECTION if r.accepted < r.num_drafts else TokenSource.TARGET]
        seq.token_sources.extend(sources)
        seq.token_q.extend(r.drafts_q[:r.accepted] + [r.final_p])
        if r.logprobs is not None:
            seq.token_logprobs.extend(r.logprobs)
        if r.num_drafts or seq.num_new:  # (an AR step's round counts nothing here: a step of 64 spends it)
            for st in (seq.stats, self.stats):
                if r.num_drafts:
                    st.verify_rounds += 1
                    if seq.drafts_from_branch:
                        st.branch_rounds += 1
                        st.branch_drafts_accepted += r.accepted
                else:
                    st.cold_rounds += 1
        if r.num_drafts:
            seq.stats.drafts.record(r.num_drafts, r.accepted)
            rounds[seq.params.mode, r.num_drafts, r.accepted] += 1
            seq.tokens_since_verify = 0
        else:
            seq.tokens_since_verify += len(tokens)
        computed = len(seq) + r.accepted
        seq.drafts, seq.draft_rows = r.new_drafts, r.new_draft_rows
        seq.drafts_from_branch = r.from_branch
        self._append(seq, tokens)
        kept = seq.num_output_tokens  # tokens after a stop inside the round were not appended
        if len(seq.token_sources) > kept:
            del seq.token_sources[kept:], seq.token_q[kept:]
            del seq.token_logprobs[kept:]
        if not seq.is_finished:
            self.block_manager.commit(seq, computed, keep_blocks)

    def _append(self, seq: Sequence, new_tokens: list[int]) -> None:
        params = seq.params
        reason = None
        detok = self.detokenizers[seq.seq_id]
        token_ids = seq.token_ids
        full = min(seq.num_prompt_tokens + params.max_tokens, self.max_model_len)  # a length that ends it
        for i, token in enumerate(new_tokens):
            token_ids.append(token)
            if seq.constraint is not None:
                seq.constraint.accept(token)
            if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
                reason = "stop"
            elif len(token_ids) >= full:
                reason = "length"
            elif params.stop and i < len(new_tokens) - 1:
                # a stop string completed inside a round ends the output at this token, as in AR
                detok.feed(seq.token_ids, final=False, start=seq.num_prompt_tokens)
                reason = "stop" if detok.stopped else None
            if reason:
                break
        detok.feed(seq.token_ids, final=reason is not None, start=seq.num_prompt_tokens)
        if detok.stopped:
            reason = "stop"
        if reason:
            self.scheduler.finish(seq, reason)

    def _output(self, seq: Sequence, first_new: int) -> RequestOutput:
        detok = self.detokenizers[seq.seq_id]
        finished = seq.is_finished
        new_text = detok.release(final=finished)
        out = RequestOutput(
            request_id=seq.seq_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=detok.text if finished else detok.text[:detok.emitted],
            finished=finished,
            finish_reason=seq.finish_reason,
            new_text=new_text,
            new_token_sources=seq.token_sources[first_new:],
            token_sources=list(seq.token_sources) if finished else [],
            token_q=list(seq.token_q) if finished else [],
            new_logprobs=seq.token_logprobs[first_new:],
            logprobs=list(seq.token_logprobs) if finished else [],
            prompt_logprobs=list(seq.prompt_logprobs) if finished or first_new == 0 else [],
            stats=request_stats(seq, full=finished),
        )
        if finished:
            self.stats.record_finished(seq)
            self.seqs.pop(seq.seq_id, None)
            self.detokenizers.pop(seq.seq_id, None)
        return out
