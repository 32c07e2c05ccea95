"""Training configuration: a YAML file whose keys are the fields below, plus --key value overrides."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idlm.config import MAX_STRIDE, read_yaml_mapping
from idlm.training.objective import DRAFT_LOSSES, OBJECTIVES


@dataclass
class Stage:
    """One step of the stride curriculum: train at stride N for `steps` optimizer steps (or
    `epochs` passes over the data) with clean-loss weight `clean_weight` (a number or "auto")."""

    stride: int
    steps: int | None = None
    epochs: float | None = None
    clean_weight: float | str = 0.2

    def validate(self) -> None:
        if not isinstance(self.stride, int) or not 2 <= self.stride <= MAX_STRIDE:
            raise ValueError(f"stage stride must be an integer from 2 to {MAX_STRIDE}, got {self.stride!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("each stage needs exactly one of 'steps' or 'epochs'")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"stage steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int | float) or self.epochs <= 0):
            raise ValueError(f"stage epochs must be > 0, got {self.epochs!r}")
        if self.clean_weight != "auto" and not (isinstance(self.clean_weight, int | float) and self.clean_weight >= 0):
            raise ValueError(f"clean_weight must be a number >= 0 or 'auto', got {self.clean_weight!r}")


@dataclass
class TrainConfig:
    data: list[str]
    output_dir: str
    model: str | None = None  # HF folder or .gguf; None = the embedded default model
    mode: str = "full"  # full: I-DLM conversion; lora: gated LoRA for R-ISD (base frozen)
    objective: str = "introspective"  # or sdar: the block-diffusion baseline (objective.py; full mode only)
    # what trains the MASK rows: ce (the data's next token), kl (KL(p || q) to the clean stream's
    # distribution p), tv (1 - sum(min(p, q)), one minus the expected acceptance); introspective only
    draft_loss: str = "ce"
    draft_kl_weight: float = 0.0  # adds this multiple of KL(p || q) to a ce or tv draft loss
    # what trains the clean stream in full mode: ce (the data's next token), or kl: KL(p0 || p) to
    # the distribution p0 of a frozen copy of the starting model at every clean position (the whole
    # distribution instead of one sampled token: what CE on the base's T = 1 answers estimates)
    clean_loss: str = "ce"
    # log the MASK rows' expected acceptance sum(min(p, q)) by draft position in log.jsonl (one
    # more LM-head product per MASK row, no backward); the kl and tv losses compute it anyway
    log_acceptance: bool = True
    # held-out data (the same JSONL formats as `data`) whose expected acceptance by draft position
    # is measured every eval_every steps and at the end, and logged as eval_acceptance (a scaling curve)
    eval_data: list[str] | None = None
    eval_every: int = 0
    stages: list[Stage] = field(default_factory=lambda: [Stage(2, steps=100), Stage(3, steps=100, clean_weight="auto"),
                                                         Stage(4, steps=100, clean_weight="auto")])
    mask_token: str = "<|MASK|>"  # added to the tokenizer (and embedding) when absent
    mask_token_id: int | None = None  # reuse this existing id as MASK instead
    max_len: int = 1024
    packing: bool = True
    micro_batch_size: int = 4  # rows per forward
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    init_adapter: str | None = None  # lora mode: start from this adapter's weights (same targets; rank grows)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    attention: str = "auto"  # flex on CUDA, dense on CPU
    parallel: str = "ddp"  # with several processes: ddp (replicated) or fsdp (FSDP2, sharded)
    seed: int = 0
    save_every: int = 0  # steps between checkpoints; 0 = final only
    keep_checkpoints: int = 0  # keep only the newest K step checkpoints; 0 = keep all
    save_dtype: str = "float32"  # weights of a full checkpoint, or A and B of an adapter
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one
    progress: bool = True

    def validate(self) -> None:
        if not self.data:
            raise ValueError("'data' must list at least one JSONL file")
        if self.mode not in ("full", "lora"):
            raise ValueError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every must be an integer >= 0, got {self.eval_every!r}")
        if self.eval_data is not None and self.objective != "introspective":
            raise ValueError("eval_data measures the introspective MASK rows' acceptance: objective introspective only")
        if self.draft_loss not in DRAFT_LOSSES:
            raise ValueError(f"draft_loss must be one of {', '.join(DRAFT_LOSSES)}, got {self.draft_loss!r}")
        if not isinstance(self.draft_kl_weight, int | float) or self.draft_kl_weight < 0:
            raise ValueError(f"draft_kl_weight must be a number >= 0, got {self.draft_kl_weight!r}")
        if self.objective == "sdar" and (self.draft_loss != "ce" or self.draft_kl_weight):
            raise ValueError("objective sdar trains its MASKs with ce only (draft_loss ce, draft_kl_weight 0)")
        if self.clean_loss not in ("ce", "kl"):
            raise ValueError(f"clean_loss must be ce or kl, got {self.clean_loss!r}")
        if self.clean_loss == "kl":
            if self.mode != "full" or self.objective != "introspective":
                raise ValueError("clean_loss kl holds a converted model's clean stream to its start: mode full, "
                                 "objective introspective")
            if any(stage.clean_weight == "auto" for stage in self.stages):
                raise ValueError("clean_loss kl needs a number for every stage's clean_weight (auto divides by "
                                 "the clean loss, which starts at 0)")
            if self.parallel == "fsdp":
                raise ValueError("clean_loss kl keeps a whole frozen copy of the model on each process: use "
                                 "parallel ddp")
        if self.init_adapter is not None and self.mode != "lora":
            raise ValueError("init_adapter continues a gated-LoRA adapter: use mode lora")
        if self.objective == "sdar" and self.mode != "full":
            raise ValueError("objective sdar (the block-diffusion baseline) trains every weight: use mode full")
        if not self.stages:
            raise ValueError("'stages' must list at least one stage")
        for stage in self.stages:
            stage.validate()
        for name in ("max_len", "micro_batch_size", "grad_accum", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be an integer >= 0, got {self.keep_checkpoints!r}")
        if not isinstance(self.lr, int | float) or self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.attention not in ("auto", "flex", "dense"):
            raise ValueError(f"attention must be auto, flex or dense, got {self.attention!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
FLOAT_FIELDS = {"lr", "warmup_ratio", "min_lr_ratio", "weight_decay", "grad_clip", "lora_alpha", "draft_kl_weight"}


def build_config(raw: dict[str, Any], source: str) -> TrainConfig:
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise ValueError(f"{source}: unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(FIELDS))}")
    missing = [k for k in ("data", "output_dir") if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing required key {missing[0]!r}")
    raw = dict(raw)
    for key in ("data", "eval_data"):
        if isinstance(raw.get(key), str):
            raw[key] = [raw[key]]
    if "stages" in raw:
        if not isinstance(raw["stages"], list):
            raise ValueError(f"{source}: 'stages' must be a list of {{stride, steps|epochs, clean_weight}}")
        stage_keys = {f.name for f in dataclasses.fields(Stage)}
        stages = []
        for i, s in enumerate(raw["stages"]):
            if not isinstance(s, dict):
                raise ValueError(f"{source}: stage {i} must be a mapping")
            bad = sorted(set(s) - stage_keys)
            if bad:
                raise ValueError(f"{source}: stage {i}: unknown key {bad[0]!r}; known: {', '.join(sorted(stage_keys))}")
            if "stride" not in s:
                raise ValueError(f"{source}: stage {i} needs a 'stride'")
            stages.append(Stage(**s))
        raw["stages"] = stages
    for name in FLOAT_FIELDS & set(raw):
        # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            raw[name] = float(raw[name])
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {name} must be a number, got {raw[name]!r}") from None
    if "adam_betas" in raw:
        raw["adam_betas"] = tuple(float(b) for b in raw["adam_betas"])
    config = TrainConfig(**raw)
    config.validate()
    return config


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file plus `--key value` overrides (values parsed as YAML: `--lr 3e-4`, `--packing false`)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "training config")
    overrides = list(overrides or [])
    while overrides:
        flag = overrides.pop(0)
        if not flag.startswith("--") or not overrides:
            raise ValueError(f"overrides must be '--key value' pairs, got {flag!r}")
        key = flag[2:].replace("-", "_")
        raw[key] = yaml.safe_load(overrides.pop(0))
    return build_config(raw, str(path))
