import torch

from idlm.decoding.noise import Stream
from idlm.decoding.sampling import SamplingTensors, sample
from idlm.engine.sequence import Sequence
from idlm.kernels.attention import PagedAttention, PagedBatch
from idlm.models.transformer import CausalLM


class ModelRunner:
    """Turns a scheduled batch into tensors, runs the model over the paged KV cache, and samples.
    One device-to-host copy per step: the sampled tokens."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, banned_token: int | None = None):
        cfg = model.cfg
        self.model = model
        self.device = model.lm_head.weight.device
        self.block_size = block_size
        self.banned_token = banned_token
        param = next(model.parameters())
        self.kv_cache = torch.zeros(2, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=param.dtype, device=self.device)

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> tuple[torch.Tensor, torch.Tensor, PagedBatch]:
        ids, positions, slots, starts = [], [], [], [0]
        bs = self.block_size
        for seq, n in zip(seqs, num_new, strict=True):
            start = seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        dev = self.device
        batch = PagedBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start=starts,
            context_lens=torch.tensor([s.num_computed + n for s, n in zip(seqs, num_new)], device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        )
        return torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), batch

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int], sample_rows: list[bool]) -> list[int]:
        """Feeds token_ids[num_computed:num_computed + n] of each sequence; returns a token for
        each sequence whose sample_rows entry is set (its last fed position predicts it)."""
        input_ids, positions, batch = self.prepare(seqs, num_new)
        hidden = self.model(input_ids, positions, PagedAttention(self.kv_cache, batch))
        picked = [i for i, flag in enumerate(sample_rows) if flag]
        if not picked:
            return []
        last_rows = torch.tensor([batch.query_start[i + 1] - 1 for i in picked], device=self.device)
        logits = self.model.logits(hidden[last_rows])
        params = [seqs[i].params for i in picked]
        st = SamplingTensors.build([(p.temperature, p.top_k, p.top_p, seqs[i].seed)
                                    for p, i in zip(params, picked)], self.device)
        new_positions = torch.tensor([seqs[i].num_computed + num_new[i] for i in picked], device=self.device)
        tokens = sample(logits, st, new_positions, Stream.TARGET, self.banned_token)
        return tokens.tolist()
