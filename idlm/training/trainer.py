"""The training loop: introspective-consistency conversion (full) or gated LoRA (R-ISD).

One process, or several under `torchrun` (DDP over gloo on CPU, NCCL on GPU). Every optimizer
step consumes `micro_batch_size * grad_accum * world_size` rows; rank r takes micro-batches
r*grad_accum ... of that list, and every micro-batch loss is scaled by the step's total response
tokens, so the step's gradient is the same whatever the world size and accumulation.
"""

import copy
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from idlm.config import MAX_STRIDE
from idlm.kernels.attention import DenseAttention, FlexAttention
from idlm.models.loader import gguf_source, load_model, model_name, resolve_model_folder
from idlm.models.lora import (
    PEFT_PREFIX,
    AdapterConfig,
    attach_lora,
    load_adapter,
    lora_modules,
    peft_state_dict,
    read_adapter_config,
    save_adapter,
)
from idlm.models.tokenizer import load_tokenizer
from idlm.training.config import TrainConfig
from idlm.training.data import RowOrder, collate, load_examples, make_rows
from idlm.training.objective import (
    DoubledBatch,
    block_diffusion_noise,
    combine,
    dense_mask,
    double,
    flex_block_mask,
    loss_targets,
    summed_ce,
    summed_draft_loss,
)

STATE_FILE = "trainer_state.pt"
DONE_MARKER = "COMPLETE"


class Objective(nn.Module):
    """Model + loss in one forward, so DDP sees every parameter used in its forward."""

    def __init__(self, model: nn.Module, lora: bool, draft_loss: str = "ce", draft_kl_weight: float = 0.0,
                 mask_id: int | None = None, anchor: nn.Module | None = None):
        super().__init__()
        self.model, self.lora = model, lora
        self.draft_loss, self.draft_kl_weight, self.mask_id = draft_loss, draft_kl_weight, mask_id
        # clean_loss kl: a frozen copy of the starting model, whose distribution the clean stream keeps
        # (a plain attribute, not a submodule: DDP and the optimizer never see it)
        self.__dict__["anchor"] = anchor

    def forward(self, db: DoubledBatch, attn, noisy_rows, noisy_targets, clean_rows, clean_targets,
                teacher_rows=None, block_pos=None):
        """teacher_rows (the clean row at each MASK row's position) switch on the draft loss of
        draft_loss and return each MASK row's expected acceptance; without them CE as always.
        block_pos (each MASK row's draft position - 1): for draft_loss length."""
        gate = db.is_mask.float() if self.lora else None
        hidden = self.model(db.input_ids, db.positions, attn, gate).flatten(0, 1)
        accept = None
        if teacher_rows is None:
            noisy = summed_ce(hidden[noisy_rows], self.model.lm_head, noisy_targets)
        else:
            # in lora mode the clean rows are the frozen base (their gate is 0); in full mode the
            # model's own clean stream: either way p is detached and CE_clean alone trains it
            noisy, accept = summed_draft_loss(hidden[noisy_rows], hidden[teacher_rows], self.model.lm_head,
                                              noisy_targets, self.draft_loss, self.draft_kl_weight, self.mask_id,
                                              block_pos, noisy_rows)
        clean = None
        if not self.lora and self.anchor is None:
            clean = summed_ce(hidden[clean_rows], self.model.lm_head, clean_targets)
        elif not self.lora:
            with torch.no_grad():
                start = self.anchor(db.input_ids, db.positions, attn, None).flatten(0, 1)[clean_rows]
            clean, _ = summed_draft_loss(hidden[clean_rows], start, self.model.lm_head, clean_targets, "kl",
                                         banned=self.mask_id, teacher_head=self.anchor.lm_head)
        return noisy, clean, accept


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.flex = cfg.attention == "flex" or (cfg.attention == "auto" and cuda)
        self.out = Path(cfg.output_dir)
        self.is_main = self.rank == 0

        self.folder = resolve_model_folder(cfg.model)
        self.tokenizer = load_tokenizer(self.folder)
        if self.tokenizer is None:
            raise ValueError(f"{model_name(cfg.model)} has no tokenizer; training reads text and needs one")
        self.model = load_model(self.folder, torch.float32, self.device, progress=cfg.progress and self.is_main,
                                gguf_path=gguf_source(cfg.model))
        self.mask_id = self._setup_mask_token()
        self.adapter_cfg = None
        if cfg.mode == "lora":
            self.adapter_cfg = AdapterConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                             target_modules=list(cfg.lora_targets), mask_token_id=self.mask_id,
                                             stride=cfg.stages[-1].stride)
            self._setup_lora()
        else:
            self.model.requires_grad_(True)
        torch.manual_seed(cfg.seed)
        anchor = copy.deepcopy(self.model).requires_grad_(False).eval() if cfg.clean_loss == "kl" else None
        self.objective = Objective(self.model, lora=cfg.mode == "lora", draft_loss=cfg.draft_loss,
                                   draft_kl_weight=cfg.draft_kl_weight, mask_id=self.mask_id, anchor=anchor)
        # the soft draft losses need p; the acceptance log reads it too (introspective objective)
        self.use_teacher = cfg.objective == "introspective" and (
            cfg.log_acceptance or cfg.draft_loss != "ce" or cfg.draft_kl_weight > 0)
        self.fsdp = cfg.parallel == "fsdp" and self.world > 1
        if self.fsdp:
            self._shard()  # in place
        # what a step calls: the objective, wrapped by DDP when its gradients must be averaged
        self.parallel_objective = (nn.parallel.DistributedDataParallel(self.objective)
                                   if self.world > 1 and not self.fsdp else self.objective)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self.examples, self.report = load_examples(cfg.data, self.tokenizer, cfg.max_len)
        self.rows = make_rows(self.examples, cfg.max_len, cfg.packing)
        self.eval_rows = (make_rows(load_examples(cfg.eval_data, self.tokenizer, cfg.max_len)[0], cfg.max_len,
                                    cfg.packing) if cfg.eval_data else None)
        self.order = RowOrder(len(self.rows), cfg.seed)
        self.rows_per_step = cfg.micro_batch_size * cfg.grad_accum * self.world
        self.stage_ends = self._stage_ends()
        self.total_steps = self.stage_ends[-1]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0

    # ------------------------------------------------------------------ setup

    def _setup_mask_token(self) -> int:
        """The MASK id: given, found in the tokenizer, or a new special token (new embedding row)."""
        cfg, tok = self.cfg, self.tokenizer
        if cfg.mask_token_id is not None:
            if not 0 <= cfg.mask_token_id < self.model.cfg.vocab_size:
                raise ValueError(f"mask_token_id {cfg.mask_token_id} is outside the vocabulary "
                                 f"(0..{self.model.cfg.vocab_size - 1})")
            return cfg.mask_token_id
        if cfg.mask_token in tok.get_vocab():
            return tok.convert_tokens_to_ids(cfg.mask_token)
        tok.add_special_tokens({"additional_special_tokens": [cfg.mask_token]}, replace_extra_special_tokens=False)
        mask_id = tok.convert_tokens_to_ids(cfg.mask_token)
        if mask_id >= self.model.cfg.vocab_size and cfg.mode == "full":
            self._grow_vocabulary(mask_id + 1)
        return mask_id

    def _grow_vocabulary(self, size: int) -> None:
        model, cfg = self.model, self.model.cfg
        old = model.model.embed_tokens.weight.data
        emb = nn.Embedding(size, cfg.hidden_size, device=old.device)
        emb.weight.data[:cfg.vocab_size] = old
        emb.weight.data[cfg.vocab_size:] = old.mean(0)
        model.model.embed_tokens = emb
        if cfg.tie_word_embeddings:
            model.lm_head = nn.Linear(cfg.hidden_size, size, bias=False, device=old.device)
            model.lm_head.weight = emb.weight
        else:
            head = nn.Linear(cfg.hidden_size, size, bias=False, device=old.device)
            head.weight.data.zero_()  # the MASK is never a target, nor ever sampled
            head.weight.data[:cfg.vocab_size] = model.lm_head.weight.data
            model.lm_head = head
        cfg.vocab_size = size

    def _shard(self) -> None:
        """FSDP2: every decoder layer is its own unit, the rest (embeddings, norm, head) the root."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.objective, mesh=mesh)

    def _setup_lora(self) -> None:
        model, cfg = self.model, self.cfg
        model.requires_grad_(False)
        if cfg.init_adapter is not None:
            self._continue_adapter(Path(cfg.init_adapter))
        else:
            attach_lora(model, self.adapter_cfg)
            torch.manual_seed(cfg.seed)
            for name, p in model.named_parameters():
                if name.endswith("lora_A"):
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # PEFT's init; B stays 0
        if model.mask_embedding is None:  # init_adapter brings its trained row
            emb = model.model.embed_tokens.weight
            init = emb[self.mask_id] if self.mask_id < model.cfg.vocab_size else emb.mean(0)
            model.mask_embedding = nn.Parameter(init.detach().clone())
        model.mask_embedding_id = self.mask_id
        for name, p in model.named_parameters():
            p.requires_grad_("_lora." in name or name == "mask_embedding")

    def _continue_adapter(self, folder: Path) -> None:
        """Starts from a saved adapter (its A, B and MASK row) instead of PEFT's initialisation. A run of
        a higher rank grows it: the saved ranks fill the first rows of A and columns of B, the new rows
        of A start as PEFT's do and the new columns of B at zero, so the model starts where the saved
        adapter ends (exactly, when alpha grows with the rank and the scaling alpha / rank stays)."""
        theirs, ours = read_adapter_config(folder), self.adapter_cfg
        if (theirs.rank > ours.rank or theirs.alpha / theirs.rank != ours.alpha / ours.rank
                or sorted(theirs.target_modules) != sorted(ours.target_modules)):
            raise ValueError(f"init_adapter {folder} has rank {theirs.rank}, alpha {theirs.alpha}, targets "
                             f"{theirs.target_modules}; the config asks for rank {ours.rank}, alpha {ours.alpha}, "
                             f"targets {ours.target_modules}: continue with its targets and a rank at least "
                             f"its own, at alpha / rank = {theirs.alpha / theirs.rank:g}")
        if theirs.mask_token_id != self.mask_id:
            raise ValueError(f"init_adapter {folder} uses MASK id {theirs.mask_token_id}, this run {self.mask_id}")
        load_adapter(self.model, folder)
        if theirs.rank == ours.rank:
            return
        saved = peft_state_dict(self.model, theirs)
        attach_lora(self.model, ours)
        torch.manual_seed(self.cfg.seed)
        r, old = ours.rank, theirs.rank
        with torch.no_grad():
            for i, name, shard, lora in lora_modules(self.model):
                key = f"{PEFT_PREFIX}model.layers.{i}.{name}"
                rows = lora.lora_A[shard * r:(shard + 1) * r]
                nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
                rows[:old].copy_(saved[f"{key}.lora_A.weight"])
                lora.lora_B[shard][:, :old].copy_(saved[f"{key}.lora_B.weight"])

    def _stage_ends(self) -> list[int]:
        ends, total = [], 0
        for stage in self.cfg.stages:
            steps = stage.steps or max(1, math.ceil(stage.epochs * len(self.rows) / self.rows_per_step))
            total += steps
            ends.append(total)
        return ends

    def _lr_factor(self, step: int) -> float:
        warmup = max(1, int(self.cfg.warmup_ratio * self.total_steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        floor = self.cfg.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def stage_at(self, step: int):
        return next(s for s, end in zip(self.cfg.stages, self.stage_ends) if step < end)

    # ------------------------------------------------------------------ loop

    def train(self) -> Path:
        """Trains to total_steps; a run whose final checkpoint already has them returns it as it is."""
        cfg = self.cfg
        final = self.out / "final"
        if cfg.resume:
            self._resume()
        if self.step >= self.total_steps and (final / DONE_MARKER).is_file():
            if self.is_main:
                print(f"{final} already holds all {self.total_steps} steps; nothing to train (resume: false, or "
                      f"another output_dir, starts afresh)", flush=True)
            return final
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            print(f"training data: {self.report.summary()}; {len(self.rows)} rows, {self.total_steps} steps of "
                  f"{self.rows_per_step} rows", flush=True)
            keep_log_until(self.out / "log.jsonl", self.step)
        log = (self.out / "log.jsonl").open("a") if self.is_main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train ({cfg.mode})", unit="step",
                   disable=not (cfg.progress and self.is_main))
        while self.step < self.total_steps:
            record = self._train_step()
            if self.eval_rows and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                   or self.step == self.total_steps):
                record.update(self.evaluate_acceptance())
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", N=record["stride"], tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save(self.out / "checkpoints" / f"step-{self.step:07d}")
                self._prune_checkpoints()
        bar.close()
        self.save(final)
        if self.is_main:
            log.close()
            plot_loss_curve(self.out / "log.jsonl", self.out / "loss.png")
        return final

    def _train_step(self) -> dict:
        cfg = self.cfg
        stage = self.stage_at(self.step)
        sdar = cfg.objective == "sdar"
        block = stage.stride if sdar else stage.stride - 1
        start = time.perf_counter()
        rows = [self.rows[i] for i in self.order.take(self.step * self.rows_per_step, self.rows_per_step)]
        denominator = sum(sum(sum(ex.response) for ex in row) for row in rows)
        mine = rows[self.rank * cfg.micro_batch_size * cfg.grad_accum:][:cfg.micro_batch_size * cfg.grad_accum]
        # loss, ce_noisy * n, ce_clean * n, tokens, then acceptance sums and row counts by draft position
        totals = torch.zeros(4 + 2 * MAX_STRIDE, dtype=torch.float64)
        for m in range(cfg.grad_accum):
            micro = mine[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]
            batch = collate(micro, self.tokenizer.pad_token_id or 0).to(self.device)
            masked = None
            if sdar:
                noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step * 1009 + self.rank * 31 + m)
                masked = block_diffusion_noise(batch, block, noise)
            db = double(batch, self.mask_id, masked)
            attn = (FlexAttention(flex_block_mask(db, block, sdar)[0]) if self.flex
                    else DenseAttention(dense_mask(db, block, sdar)))
            targets = loss_targets(batch, masked, None if sdar else block)
            last = m == cfg.grad_accum - 1
            if self.fsdp:
                self.objective.set_requires_gradient_sync(last)
            ddp_accumulating = self.world > 1 and not self.fsdp and not last
            sync = self.parallel_objective.no_sync() if ddp_accumulating else nullcontext()
            with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                teacher_rows = targets.teacher_rows if self.use_teacher else None
                noisy_sum, clean_sum, accept = self.parallel_objective(
                    db, attn, targets.noisy_rows, targets.noisy_targets, targets.clean_rows, targets.clean_targets,
                    teacher_rows, targets.block_pos)
                losses = combine(noisy_sum, clean_sum, targets.num_response, len(targets.clean_targets),
                                 stage.clean_weight, denominator, targets.num_noisy)
                (losses.loss * self.world).backward()
            n = targets.num_response
            totals[:4] += torch.tensor([float(losses.loss.detach()), losses.ce_noisy * n, losses.ce_clean * n,
                                        2 * int((batch.sample_ids >= 0).sum())], dtype=torch.float64)
            if accept is not None and len(accept):
                pos = targets.block_pos.to(accept.device)
                totals[4:4 + block] += torch.zeros(block, dtype=torch.float64, device=accept.device).index_add_(
                    0, pos, accept.double()).cpu()
                totals[4 + MAX_STRIDE:4 + MAX_STRIDE + block] += torch.bincount(pos, minlength=block).double().cpu()
        if self.world > 1:
            summed = totals.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(summed)
            totals = summed.cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
        lr = self.lr_schedule.get_last_lr()[0]
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - start
        record = {"step": self.step, "stride": stage.stride, "loss": totals[0].item(),
                  "ce_noisy": totals[1].item() / denominator,  # the draft loss's value (draft_loss says which)
                  # the clean stream's loss: CE, or under clean_loss kl the KL to the starting model
                  "ce_clean": None if cfg.mode == "lora" else totals[2].item() / denominator,
                  "lr": lr, "grad_norm": float(grad_norm), "tokens": int(totals[3]),
                  "response_tokens": denominator, "tokens_per_s": totals[3].item() / elapsed / self.world}
        if cfg.clean_loss != "ce":
            record["clean_loss"] = cfg.clean_loss
        if cfg.draft_loss != "ce" or cfg.draft_kl_weight:
            record["draft_loss"] = cfg.draft_loss + (f"+{cfg.draft_kl_weight:g}kl" if cfg.draft_kl_weight else "")
        if self.use_teacher and totals[4 + MAX_STRIDE:].sum() > 0:
            sums, counts = totals[4:4 + block], totals[4 + MAX_STRIDE:4 + MAX_STRIDE + block]
            # sum(min(p, q)) of each MASK row, averaged by its place in the block (draft position 1..B)
            record["acceptance"] = [round(float(a / c), 5) if c else None for a, c in zip(sums, counts)]
            record["acceptance_mean"] = round(float(sums.sum() / counts.sum()), 5)
        return record

    @torch.no_grad()
    def evaluate_acceptance(self) -> dict:
        """Expected acceptance sum(min(p, q)) of the MASK rows on eval_data, by draft position, at
        the stride of the step just taken (every rank computes it: the forward may be sharded)."""
        stride = self.stage_at(max(0, self.step - 1)).stride
        block = stride - 1
        sums = torch.zeros(block, dtype=torch.float64)
        counts = torch.zeros(block, dtype=torch.float64)
        noisy_total, response = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(self.eval_rows), self.cfg.micro_batch_size):
            batch = collate(self.eval_rows[start:start + self.cfg.micro_batch_size],
                            self.tokenizer.pad_token_id or 0).to(self.device)
            db = double(batch, self.mask_id)
            attn = FlexAttention(flex_block_mask(db, block)[0]) if self.flex else DenseAttention(dense_mask(db, block))
            targets = loss_targets(batch, None, block)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                noisy, _, accept = self.objective(db, attn, targets.noisy_rows, targets.noisy_targets,
                                                  targets.clean_rows, targets.clean_targets, targets.teacher_rows,
                                                  targets.block_pos)
            pos = targets.block_pos.cpu()
            sums += torch.zeros(block, dtype=torch.float64).index_add_(0, pos, accept.double().cpu())
            counts += torch.bincount(pos, minlength=block).double()
            noisy_total += float(noisy)
            response += targets.num_response
        self.model.train(was_training)
        return {"eval_acceptance": [round(float(a / c), 5) if c else None for a, c in zip(sums, counts)],
                "eval_acceptance_mean": round(float(sums.sum() / counts.sum().clamp(min=1)), 5),
                "eval_noisy_loss": noisy_total / max(response, 1)}

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
        """An HF folder (full) or a PEFT adapter (lora) that idlm loads, plus the exact trainer
        state for resuming. Written to a temporary folder and renamed, so a kill never leaves a
        half-written checkpoint."""
        state = self._state()  # every rank takes part when the model is sharded
        if self.is_main:
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            stride = self.stage_at(max(0, self.step - 1)).stride
            if self.cfg.mode == "lora":
                self.adapter_cfg.stride = stride
                save_adapter(self.model, tmp, self.adapter_cfg, base_name=str(self.folder),
                             dtype=getattr(torch, self.cfg.save_dtype))
            else:
                self._save_hf_folder(tmp, stride, state["model"])
            torch.save(state, tmp / STATE_FILE)
            (tmp / DONE_MARKER).write_text(str(self.step))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        if self.world > 1:
            dist.barrier()

    def _save_hf_folder(self, folder: Path, stride: int, full_state: dict) -> None:
        raw = json.loads((self.folder / "config.json").read_text())
        raw.update(vocab_size=self.model.cfg.vocab_size, torch_dtype=self.cfg.save_dtype)
        if self.cfg.objective == "sdar":
            # Not I-DLM keys: the engine must not run ISD on it; its clean stream decodes as ar, and
            # idlm/eval/block_diffusion.py reads these.
            raw.update(idlm_objective="sdar", sdar_mask_token_id=self.mask_id, sdar_block_size=stride)
        else:
            raw.update(mask_token_id=self.mask_id, block_size=stride - 1)
        (folder / "config.json").write_text(json.dumps(raw, indent=2))
        dtype = getattr(torch, self.cfg.save_dtype)
        weights = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.model.hf_state_dict(full_state).items()}
        save_file(weights, folder / "model.safetensors")
        self.tokenizer.save_pretrained(folder)
        generation = self.folder / "generation_config.json"
        if generation.is_file():
            shutil.copy(generation, folder / generation.name)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        if self.cfg.mode == "lora":  # the frozen base is in the base checkpoint already
            model_state = {k: v for k, v in model_state.items() if "_lora." in k or k == "mask_embedding"}
        return {
            "step": self.step,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.lr_schedule.state_dict(),  # the key existing checkpoints resume from
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def _prune_checkpoints(self) -> None:
        """Keeps the newest keep_checkpoints step checkpoints (with its optimizer state, a full one
        takes ~14 bytes a parameter)."""
        if not self.cfg.keep_checkpoints or not self.is_main:
            return
        complete = sorted(c for c in (self.out / "checkpoints").glob("step-*") if (c / DONE_MARKER).is_file())
        for old in complete[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        checkpoints = sorted((self.out / "checkpoints").glob("step-*")) if (self.out / "checkpoints").is_dir() else []
        complete = [c for c in checkpoints if (c / DONE_MARKER).is_file()]
        final = self.out / "final"
        if (final / DONE_MARKER).is_file():  # a finished run, perhaps to be continued with more steps
            complete = sorted(complete + [final], key=lambda c: int((c / DONE_MARKER).read_text()))
        if not complete:
            return
        state = torch.load(complete[-1] / STATE_FILE, map_location="cpu", weights_only=False)
        options = StateDictOptions(full_state_dict=True, strict=self.cfg.mode == "full")
        try:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=options)
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"checkpoint {complete[-1]} does not match this model and config ({e})") from e
        self.lr_schedule.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]
        if self.is_main:
            print(f"resuming from {complete[-1]} at step {self.step}", flush=True)


def keep_log_until(log_path: Path, step: int) -> None:
    """Drops the log lines of steps after `step` (trained after the checkpoint a run resumes from,
    then lost), so that they are not logged twice; a run from step 0 starts a new log."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines(keepends=True) if step else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            continue
    log_path.write_text("".join(kept))


def plot_loss_curve(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="loss")
    kind = records[0].get("draft_loss", "ce") if records else "ce"
    ax.plot(steps, [r["ce_noisy"] for r in records], label=f"{kind.upper()} noisy", alpha=0.7)
    if records and records[0]["ce_clean"] is not None:
        ax.plot(steps, [r["ce_clean"] for r in records], label="CE clean", alpha=0.7)
    for r0, r1 in zip(records, records[1:]):
        if r1["stride"] != r0["stride"]:
            ax.axvline(r1["step"], color="grey", linestyle=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("introspective-consistency training")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
