"""The paged KV allocator: fixed-size blocks, reference counts, block tables, prefix cache, copy-on-write.

The KV cache is `num_blocks` blocks of `block_size` token slots. A sequence's block table maps its
positions to blocks: position p lives in slot `table[p // block_size] * block_size + p % block_size`.
The allocator only does bookkeeping; it never touches K/V tensors (copy-on-write hands the runner a
list of (src, dst) block copies to apply before the step's forward).

Every block is in exactly one of three states:
    used          ref_count > 0: held by that many block tables
    free, plain   ref_count == 0, no cache key        (in `free_plain`, reused first)
    free, cached  ref_count == 0, has a cache key     (in `free_cached`, least recently freed first:
                  its K/V is still valid and a prefix hit revives it; evicted lazily, LRU, only
                  when no plain free block is left)

Prefix caching keys a *full* block by sha256(parent key + its token ids), the parent key being the key
of the previous block (b"" for the first block), so a key names a whole prefix and nobody can craft
prompts whose keys collide (vLLM chains sha256 the same way since CVE-2025-25183). Correctness does
not rest on the hash: a hit also checks the block's own token ids and that it was registered as the
child of the block matched just before it (each registration gets a serial number that a block's
children record), so by induction a hit chain holds exactly the query's prefix even if keys collide.
A block is registered only once its K/V are in the cache (`mark_computed`, after the forward that
wrote them): a forward that fails leaves no key pointing at unwritten K/V.

Invariants (`check()` asserts them; the randomized test runs it after every operation):
  - len(free_plain) + len(free_cached) + #used == num_blocks, and the three sets are disjoint;
  - ref_count[b] == the number of block tables holding b, never negative; no free block is in a table;
  - key_to_block[k] == b  =>  block_key[b] == k, b holds block_size tokens, and b's parent serial is
    older than its own;
  - a block whose position p is about to be written is held by exactly one table (copy-on-write).
"""

import hashlib
from array import array
from collections import OrderedDict, deque
from itertools import count
from typing import Iterable, Optional

from .sequence import Sequence


class NoFreeBlocks(RuntimeError):
    """Raised when asked for a block with none free: callers check can_allocate/can_append first."""


def block_hash(parent_key: bytes, tokens: tuple) -> bytes:
    """sha256 over the parent's key and the block's token ids (int64 bytes): a few microseconds per block."""
    return hashlib.sha256(parent_key + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_key: list[Optional[bytes]] = [None] * num_blocks
        self.block_tokens: list[Optional[tuple]] = [None] * num_blocks
        self.block_serial = [0] * num_blocks  # of its registration; 0 = none (and "no parent")
        self.block_parent = [0] * num_blocks  # the serial its parent block had when it was registered
        self.key_to_block: dict[bytes, int] = {}
        self._serials = count(1)
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        # Accounting.
        self.prefix_query_tokens = 0  # prompt tokens looked up at admission
        self.prefix_hit_tokens = 0  # of those, found in the cache
        self.cow_copies = 0

    # ---- counts -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- low level ----------------------------------------------------------------------------
    def _take_free(self) -> int:
        """A free block for new content: plain ones first, else evict the least recently freed cached one."""
        if self.free_plain:
            b = self.free_plain.popleft()
        elif self.free_cached:
            b, _ = self.free_cached.popitem(last=False)
            self._forget(b)
        else:
            raise NoFreeBlocks("no free KV block")
        self.ref_count[b] = 1
        return b

    def _forget(self, b: int) -> None:
        key = self.block_key[b]
        if key is not None and self.key_to_block.get(key) == b:
            del self.key_to_block[key]
        self.block_key[b] = self.block_tokens[b] = None
        self.block_serial[b] = self.block_parent[b] = 0

    def _release(self, b: int) -> None:
        self.ref_count[b] -= 1
        assert self.ref_count[b] >= 0, f"block {b} released more often than held"
        if self.ref_count[b] == 0:
            key = self.block_key[b]
            if key is not None and self.key_to_block.get(key) == b:
                self.free_cached[b] = None  # most recently freed: evicted last
            else:
                self._forget(b)
                self.free_plain.append(b)

    def _register(self, b: int, parent: Optional[int], tokens: tuple, key: bytes) -> None:
        """Key block b (its K/V written) as holding tokens after the prefix of block `parent` (None: none)."""
        old = self.key_to_block.get(key)
        if old is not None and old != b and self.ref_count[old] == 0:
            # An older copy of this content sits in the cached free list (e.g. its parent was evicted
            # first, so no hit reached it): it becomes a plain free block.
            del self.free_cached[old]
            self._forget(old)
            self.free_plain.append(old)
        self.block_key[b], self.block_tokens[b] = key, tokens
        self.block_serial[b] = next(self._serials)
        self.block_parent[b] = 0 if parent is None else self.block_serial[parent]
        self.key_to_block[key] = b  # a used block with the same content keeps its key; the newest wins

    def _tokens_of(self, seq: Sequence, i: int) -> tuple:
        bs = self.block_size
        return tuple(seq.token_ids[i * bs:(i + 1) * bs])

    def _keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The keys of seq's first num_blocks full blocks. Kept on the sequence and extended as it
        grows (its tokens are only ever appended), so each key is hashed once, not at every step
        that looks at a waiting sequence."""
        keys = seq.block_keys
        for i in range(len(keys), num_blocks):
            keys.append(block_hash(keys[-1] if keys else b"", self._tokens_of(seq, i)))
        return keys

    # ---- admission (prefill) --------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached run of seq's full blocks (prompt and any output so far)."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], 0  # parent: the serial of the last hit
        for i, key in enumerate(self._keys(seq, seq.num_tokens // self.block_size)):
            tokens = self._tokens_of(seq, i)
            b = self.key_to_block.get(key)
            if b is None or self.block_tokens[b] != tokens or self.block_parent[b] != parent:
                break
            hits.append(b)
            parent = self.block_serial[b]
        return hits

    def can_allocate(self, seq: Sequence, hits: Optional[list[int]] = None) -> bool:
        hits = self.match_prefix(seq) if hits is None else hits
        revived = sum(1 for b in hits if self.ref_count[b] == 0)  # hits taken out of the free pool
        return self.blocks_for(seq.num_tokens) - len(hits) <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence, hits: Optional[list[int]] = None) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing cached prefix blocks.

        The new blocks are registered by mark_computed once the forward has filled them, so an
        identical prompt admitted in the same step computes its own copy (the newest copy keeps the
        key). Sets seq.num_cached_tokens = seq.num_computed_tokens = tokens covered by hits."""
        assert not seq.block_table, "allocate() on a sequence that already holds blocks"
        hits = self.match_prefix(seq) if hits is None else hits
        if not self.can_allocate(seq, hits):
            raise NoFreeBlocks(f"sequence {seq.seq_id} needs more blocks than are free")
        for b in hits:
            if self.ref_count[b] == 0:
                del self.free_cached[b]
            self.ref_count[b] += 1
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_cached_tokens

    # ---- growth (decode) ------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Whether the slot for seq's last token (position num_tokens - 1) can be made writable: it needs
        a free block if it starts a new block, or if its block is shared (copy-on-write)."""
        idx = (seq.num_tokens - 1) // self.block_size
        needs_block = idx == len(seq.block_table) or self.ref_count[seq.block_table[idx]] > 1
        return self.num_free_blocks >= needs_block

    def append_slot(self, seq: Sequence) -> Optional[tuple[int, int]]:
        """Make position num_tokens - 1 writable; returns a (src, dst) block copy if it had to copy-on-write."""
        idx = (seq.num_tokens - 1) // self.block_size
        table = seq.block_table
        assert idx <= len(table), "block table is behind the sequence"
        if idx == len(table):
            table.append(self._take_free())
            return None
        b = table[idx]
        if self.ref_count[b] == 1:
            return None
        new = self._take_free()
        self._release(b)
        table[idx] = new
        self.cow_copies += 1
        return b, new

    def mark_computed(self, seq: Sequence, num_computed: int) -> None:
        """seq's first num_computed tokens now have K/V in the cache: register blocks that just filled."""
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        seq.num_computed_tokens = num_computed
        if not self.enable_prefix_caching:
            return
        for i in range(first, num_computed // bs):
            b = seq.block_table[i]
            if self.block_key[b] is not None:
                continue
            parent = seq.block_table[i - 1] if i else None
            if parent is not None and self.block_key[parent] is None:
                return  # the chain is broken (an earlier block is unregistered): nothing to key it by
            self._register(b, parent, self._tokens_of(seq, i), self._keys(seq, i + 1)[i])

    # ---- sharing and release --------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (parallel sampling); writes to them copy-on-write."""
        for b in parent.block_table:
            self.ref_count[b] += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first: the tail is then evicted before the prefix it extends."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []
        seq.num_computed_tokens = 0

    # ---- checks ---------------------------------------------------------------------------------
    def check(self, tables: Iterable[list[int]]) -> None:
        """Assert the invariants in the module docstring, given every live block table."""
        held = [0] * self.num_blocks
        for table in tables:
            for b in table:
                held[b] += 1
        plain, cached = set(self.free_plain), set(self.free_cached)
        assert len(plain) == len(self.free_plain), "a block is twice in the free list"
        assert not (plain & cached), "a block is both plain-free and cached-free"
        used = {b for b in range(self.num_blocks) if self.ref_count[b] > 0}
        assert not (used & (plain | cached)), "a referenced block is on a free list"
        assert len(plain) + len(cached) + len(used) == self.num_blocks, "free + used != total"
        for b in range(self.num_blocks):  # held[b] >= 0, so no refcount is negative
            assert self.ref_count[b] == held[b], f"block {b}: refcount {self.ref_count[b]} but {held[b]} holders"
        for b in cached:
            assert self.block_key[b] is not None and self.key_to_block.get(self.block_key[b]) == b
        for b in plain:
            assert self.block_key[b] is None
        for key, b in self.key_to_block.items():
            assert self.block_key[b] == key, f"key points to block {b} which holds another key"
            assert len(self.block_tokens[b]) == self.block_size
            assert 0 <= self.block_parent[b] < self.block_serial[b]
