"""Options that several commands share, each written once, and the two functions that read them
back: `engine_args` (the EngineConfig fields, by name) and `sampling_params`."""

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from idlm.config import MAX_STRIDE, EngineConfig
from idlm.decoding.rounds import PROPOSALS
from idlm.engine.decoding_config import load_decoding_config
from idlm.engine.sampling_params import MODES, STRIDE_POLICIES, SamplingParams
from idlm.models.loader import QUANTIZATIONS

MODEL_HELP = ("Hugging Face model folder, .gguf file, or hub id (org/name) already in the Hugging Face cache "
              "(default: the embedded SmolLM2-135M-Instruct)")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class Option:
    flags: tuple[str, ...]
    kwargs: dict[str, Any]

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")


def option(*flags: str, **kwargs: Any) -> Option:
    return Option(flags, kwargs)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option], **changes: dict[str, Any]) -> None:
    """Adds `options` to parser; `changes` maps an option's dest to the argparse keywords this
    command gives it instead (its own default or help)."""
    options = list(options)
    unknown = set(changes) - {o.dest for o in options}
    assert not unknown, f"changes for options not added: {unknown}"
    for o in options:
        parser.add_argument(*o.flags, **(o.kwargs | changes.get(o.dest, {})))


MODEL = option("--model", default=None, help=MODEL_HELP)
DEVICE = option("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
DTYPE = option("--dtype", default="auto", choices=DTYPES,
               help="activation and KV dtype (default: bfloat16 on CUDA; on CPU float32, or bfloat16 with quantised "
                    "weights where the CPU has AMX or AVX-512 BF16 and idlm's CPU kernels do not build)")
QUANTIZATION = option("--quantization", default="auto", choices=QUANTIZATIONS,
                      help="CPU weights: auto (a GGUF's own quantised blocks on the CPU, else as stored), none "
                           "(dequantise to float), gguf, or int8 / int4 (round a safetensors model's projections "
                           "to Q8_0 / Q4_1 on load)")
KV_CACHE_TOKENS = option("--kv-cache-tokens", type=int, default=None, help="size of the paged KV pool in tokens")
ADAPTER = option("--adapter", default=None,
                 help="gated-LoRA (R-ISD) adapter folder for the model (default: the shipped SmolLM2 adapter when "
                      "--model is not given; 'none' for no adapter)")
MAX_MODEL_LEN = option("--max-model-len", type=int, default=None,
                       help="context length in tokens, prompt and output together (default: the model's, or what "
                            "the KV pool holds if less)")
CHAT_TEMPLATE = option("--chat-template", default=None,
                       help="Jinja chat template, as a file or inline, instead of the tokenizer's")
GENERATION_CONFIG = option("--generation-config", default="auto",
                           help="sampling defaults for what a request or flag leaves unset: auto (the model's "
                                "generation_config.json: temperature, top_p, top_k, max_new_tokens; greedy where it "
                                "sets none or the model has no such file, as a GGUF), vllm (ignore the file: "
                                "temperature 1, as the OpenAI API), or a path to such a file or its folder "
                                "(default auto)")
DETERMINISTIC = option("--deterministic", action="store_true", default=None,
                       help="batch-invariant kernels: a request decodes the same tokens alone or in any batch, and "
                            "greedy isd/risd equal ar bit for bit, in bfloat16 on the GPU too (CUDA: fixed-tile "
                            "Triton matmuls, norms and attention instead of cuBLAS and compiled kernels)")
TENSOR_PARALLEL_SIZE = option("--tensor-parallel-size", "-tp", type=int, default=None, metavar="N",
                              help="GPUs to split the model over (tensor parallel, on GPUs of one host; on the CPU, "
                                   "processes): the engine starts a worker process per extra GPU (default 1)")
ENGINE = (MODEL, DEVICE, DTYPE, QUANTIZATION, KV_CACHE_TOKENS, ADAPTER, MAX_MODEL_LEN, CHAT_TEMPLATE,
          GENERATION_CONFIG, DETERMINISTIC, TENSOR_PARALLEL_SIZE)

MAX_NUM_BATCHED_TOKENS = option("--max-num-batched-tokens", type=int, default=None,
                                help="prompt tokens prefilled per step; longer prompts are chunked (default 2048)")
GPU_MEMORY_UTILIZATION = option("--gpu-memory-utilization", type=float, default=None,
                                help="CUDA: share of the GPU's memory the engine may use, the KV pool sized to fit "
                                     "(default 0.9)")
ENFORCE_EAGER = option("--enforce-eager", action="store_true", default=None,
                       help="CUDA: run decode steps eagerly, without CUDA graphs or compiled kernels")
OVERLAP_SCHEDULING = option("--overlap-scheduling", action=argparse.BooleanOptionalAction, default=None,
                            help="CUDA: launch each decode step of the same requests before the host has "
                                 "read the outcome of the one before, so that the host's work on it overlaps the "
                                 "GPU's next step; the same tokens either way (default on)")
SCHEDULING = (MAX_NUM_BATCHED_TOKENS, GPU_MEMORY_UTILIZATION, ENFORCE_EAGER, OVERLAP_SCHEDULING)

MAX_NUM_SEQS = option("--max-num-seqs", type=int, default=64, help="requests decoded together (default 64)")

# None means "not given": the decoding config, then the command's defaults, then SamplingParams decide
MODE = option("--mode", choices=MODES, default=None,
              help="ar: one token per forward; isd: the I-DLM decoder; risd: ISD with the gated LoRA "
                   "(default: risd with --adapter, isd for I-DLM checkpoints, else ar)")
STRIDE = option("--stride", type=int, default=None,
                help=f"N: a round proposes N-1 drafts (2-{MAX_STRIDE}, default 4)")
PROPOSAL = option("--proposal", choices=PROPOSALS, default=None,
                  help="how drafts are proposed: sample (exact, default), argmax (the reference's way, lossy at "
                       "temperature > 0), argmax_exact (argmax drafts verified against a one-hot proposal)")
STRIDE_POLICY = option("--stride-policy", choices=STRIDE_POLICIES, default=None,
                       help="fixed: every round proposes N-1 drafts; adaptive: N is a maximum and each step picks "
                            "the drafts and branches that commit the most tokens per second on this device "
                            "(default adaptive; a sampled request with --seed keeps its stride fixed)")
BRANCHES = option("--branches", type=int, default=None,
                  help="most branch drafts a round adds, each ready for the rejection of one draft so that no "
                       f"round after a rejection is cold (0-{MAX_STRIDE - 1}, 0 = none; default: as many as fit)")
SAMPLING_FLAGS = (
    option("--max-tokens", type=int, help="most tokens to generate (default: the generation config's "
                                          "max_new_tokens, else 256)"),
    option("--temperature", type=float, help="0 = greedy (default: the generation config's, else 0)"),
    option("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default: the generation config's, "
                                       "else 1 = off)"),
    option("--top-k", type=int, help="sample among the k likeliest tokens (default: the generation config's, "
                                     "else 0 = off)"),
    option("--seed", type=int, help="seed: the same seed gives the same output"),
    option("--stop", action="append", help="stop string (repeatable); not included in output"),
    option("--ignore-eos", action="store_true", default=None, help="keep generating past the end-of-sequence token"),
    MODE,
    STRIDE,
    PROPOSAL,
    STRIDE_POLICY,
    BRANCHES,
)
DECODING_CONFIG = option("--decoding-config", default=None,
                         help="YAML in the reference's vocabulary (gen_block_size, temperature, top_k, top_p, "
                              "use_spec_verify, verify_alpha, conditional_lora); command-line flags override it")
SAMPLING = (*SAMPLING_FLAGS, DECODING_CONFIG)


def engine_args(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """EngineConfig keyword arguments from the parsed arguments: every EngineConfig field that
    has an argument of the same name, unless that argument is None (not given), then overrides."""
    names = {f.name for f in fields(EngineConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None} | overrides


def sampling_params(args: argparse.Namespace, model_defaults: dict[str, Any] | None = None,
                    **defaults: Any) -> SamplingParams:
    """Flags given on the command line override the decoding config, which overrides the
    command's `defaults`, which override the model's generation config (`model_defaults`, the
    engine's `sampling_defaults`; None before the engine is loaded, to check the flags early),
    which overrides SamplingParams' own defaults."""
    given = (model_defaults or {}) | defaults
    if args.decoding_config:
        given |= load_decoding_config(args.decoding_config)
    for o in SAMPLING_FLAGS:
        if getattr(args, o.dest) is not None:
            given[o.dest] = getattr(args, o.dest)
    return SamplingParams(**given)
