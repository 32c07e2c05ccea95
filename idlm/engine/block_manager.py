import hashlib
from collections import deque

from idlm.engine.sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Identity of a full block: its tokens and, through the parent, every token before it."""
    return hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in token_ids), digest_size=16).digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class BlockManager:
    """Paged KV bookkeeping: a free list, reference counts, and prefix caching over full blocks.

    Freed blocks keep their hash until reused, so a later request with the same prefix can still
    find them; reuse takes the least recently freed block first."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.cache_hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, seq: Sequence, num_positions: int) -> int:
        return max(0, -(-num_positions // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks holding a prefix of seq (never its last token, which must be
        computed to get logits)."""
        assert not seq.block_table
        if not self.prefix_caching:
            return
        parent = b""
        for start in range(0, len(seq) - 1 - self.block_size + 1, self.block_size):
            parent = block_hash(parent, seq.token_ids[start:start + self.block_size])
            block_id = self.cached.get(parent)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_ids.remove(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
            self.cache_hits += 1
        seq.num_computed = len(seq.block_table) * self.block_size

    def can_reserve(self, seq: Sequence, num_positions: int) -> bool:
        return self.blocks_needed(seq, num_positions) <= self.num_free

    def reserve(self, seq: Sequence, num_positions: int) -> None:
        """Make seq's block table cover positions [0, num_positions)."""
        for _ in range(self.blocks_needed(seq, num_positions)):
            block = self.blocks[self.free_ids.popleft()]
            if block.hash is not None:
                if self.cached.get(block.hash) == block.block_id:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block.block_id)

    def commit(self, seq: Sequence, num_computed: int, keep_blocks: bool = False) -> None:
        """After a forward: the KV of token_ids[:num_computed] is final; every slot past it (drafts
        that were rejected, MASK and branch rows) is rolled back. Frees the blocks wholly beyond
        it (unless keep_blocks: a step launched ahead writes there) and publishes newly completed
        full blocks for prefix caching. The block manager is the one owner of num_computed."""
        seq.num_computed = num_computed
        keep = len(seq.block_table) if keep_blocks else -(-seq.num_computed // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        first = full
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        parent = self.blocks[seq.block_table[first - 1]].hash if first else b""
        for i in range(first, full):
            block = self.blocks[seq.block_table[i]]
            start = i * self.block_size
            block.hash = block_hash(parent, seq.token_ids[start:start + self.block_size])
            self.cached.setdefault(block.hash, block.block_id)
            parent = block.hash

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed = 0

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0
        if block.ref_count == 0:
            self.free_ids.append(block_id)
