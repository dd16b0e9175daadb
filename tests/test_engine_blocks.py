"""The paged block allocator: a randomized simulation against a shadow KV store, plus edge cases.

The shadow store records, for every slot written, what its K/V would encode: (position, the tokens up
to and including that position). A prefix-cache hit or a shared block is only correct if the slots a
sequence reads hold exactly its own (position, prefix): the simulation checks that after every op.
At the end, the same two dangers end to end (a forward that fails, keys that collide), against full
recompute.
"""

import random

import pytest
import torch

from builders import tiny_model
from engine import LLM, block_manager
from engine.block_manager import BlockManager, NoFreeBlocks
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

PARAMS = SamplingParams(temperature=0)


class Sim:
    def __init__(self, num_blocks, block_size, seed, colliding_keys=False):
        self.bm = BlockManager(num_blocks, block_size)
        self.colliding_keys = colliding_keys
        self.bs = block_size
        self.rng = random.Random(seed)
        self.shadow = {}  # slot -> (position, prefix tokens)
        self.running: list[Sequence] = []
        self.next_id = 0
        self.hits = self.cows = self.preempted = self.forks = 0

    def new_seq(self, tokens):
        self.next_id += 1
        return Sequence(self.next_id, 0, 0, list(tokens), len(tokens), PARAMS, 10 ** 6)

    def slot(self, seq, pos):
        return seq.block_table[pos // self.bs] * self.bs + pos % self.bs

    def write(self, seq, pos):
        self.shadow[self.slot(seq, pos)] = (pos, tuple(seq.token_ids[:pos + 1]))

    def prompt(self):
        rng = self.rng
        bases = [[1, 2, 3, 1, 2, 3, 1, 2], [0] * 9, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
        base = rng.choice(bases)[:rng.randint(0, 10)]
        return base + [rng.randrange(4) for _ in range(rng.randint(0 if base else 1, 12))]

    def prefill(self, seqs):
        """Like the runner: write every new token's K/V (tokens before num_computed are cached), then
        check that every position of every sequence reads its own content."""
        for seq in seqs:
            start = min(seq.num_computed_tokens, seq.num_tokens - 1)
            for pos in range(start, seq.num_tokens):
                if pos >= seq.num_computed_tokens:
                    self.write(seq, pos)
        for seq in seqs:
            self.hits += seq.num_cached_tokens > 0
            self.bm.mark_computed(seq, seq.num_tokens)
            seq.token_ids.append(self.rng.randrange(4))

    def admit(self, dup=False):
        seq = self.new_seq(self.prompt())
        batch = [seq]
        if dup:  # the same prompt twice in one step
            batch.append(self.new_seq(seq.token_ids))
        admitted = []
        for s in batch:
            hits = self.bm.match_prefix(s)
            if not self.bm.can_allocate(s, hits):
                with pytest.raises(NoFreeBlocks):
                    self.bm.allocate(s, hits)
                break
            free_before = self.bm.num_free_blocks
            revived = sum(self.bm.ref_count[b] == 0 for b in hits)  # cached hits come off the free lists
            self.bm.allocate(s, hits)
            assert len(s.block_table) == -(-s.num_tokens // self.bs) and s.block_table[:len(hits)] == hits
            assert free_before - self.bm.num_free_blocks == len(s.block_table) - len(hits) + revived
            admitted.append(s)
        self.prefill(admitted)
        if dup and len(admitted) == 2 and not self.colliding_keys:  # both computed their full blocks; the newer copy holds the keys
            b = admitted[1]
            full = (b.num_tokens - 1) // self.bs
            assert self.bm.match_prefix(self.new_seq(b.token_ids[:-1])) == b.block_table[:full]
        self.running += admitted

    def decode(self):
        for seq in list(self.running):
            if self.rng.random() < 0.3:
                continue
            if not self.bm.can_append(seq):
                self.bm.free(seq)
                self.running.remove(seq)
                self.preempted += 1
                continue
            cow = self.bm.append_slot(seq)
            if cow is not None:
                src, dst = cow
                self.cows += 1
                for j in range(self.bs):
                    if src * self.bs + j in self.shadow:
                        self.shadow[dst * self.bs + j] = self.shadow[src * self.bs + j]
            self.write(seq, seq.num_tokens - 1)
            self.bm.mark_computed(seq, seq.num_tokens)
            seq.token_ids.append(self.rng.randrange(4))

    def fork(self):
        if not self.running:
            return
        parent = self.rng.choice(self.running)
        child = self.new_seq(parent.token_ids[:-1] + [self.rng.randrange(4)])
        child.num_prompt_tokens = parent.num_prompt_tokens
        self.bm.fork(parent, child)
        self.running.append(child)
        self.forks += 1

    def finish(self):
        if self.running:
            seq = self.running.pop(self.rng.randrange(len(self.running)))
            self.bm.free(seq)
            assert seq.block_table == []

    def check(self):
        bm = self.bm
        bm.check(s.block_table for s in self.running)
        for seq in self.running:
            assert seq.num_computed_tokens == seq.num_tokens - 1
            assert len(seq.block_table) == -(-seq.num_computed_tokens // self.bs)
            for pos in range(seq.num_computed_tokens):
                assert self.shadow.get(self.slot(seq, pos)) == (pos, tuple(seq.token_ids[:pos + 1])), \
                    f"sequence {seq.seq_id} reads wrong K/V at position {pos}"
        # Cache keys only point to blocks holding those tokens (in the shadow K/V too).
        for key, b in bm.key_to_block.items():
            tokens = bm.block_tokens[b]
            for j in range(self.bs):
                pos, prefix = self.shadow[b * self.bs + j]
                assert pos % self.bs == j and prefix[-(j + 1):] == tokens[:j + 1]


def weak_hash(parent_key: bytes, tokens: tuple) -> bytes:
    """Keys that collide all the time: only the block's last token counts, not even the parent's key."""
    return tokens[-1].to_bytes(8, "little")


@pytest.mark.parametrize("key", ["sha256", "weak"])
@pytest.mark.parametrize("num_blocks,block_size,seed", [(24, 4, 0), (40, 2, 1), (12, 8, 2), (30, 1, 3)])
def test_randomized_allocator(num_blocks, block_size, seed, key, monkeypatch):
    """With the weak keys every hit comes from a colliding key: the shadow store shows that none of
    them hands a sequence K/V computed for another prefix."""
    if key == "weak":
        monkeypatch.setattr(block_manager, "block_hash", weak_hash)
    sim = Sim(num_blocks, block_size, seed, colliding_keys=key == "weak")
    ops = [sim.admit, lambda: sim.admit(dup=True), sim.decode, sim.fork, sim.finish]
    weights = [3, 1, 6, 1, 2]
    for _ in range(2500):
        sim.rng.choices(ops, weights)[0]()
        sim.check()
    for seq in list(sim.running):
        sim.bm.free(seq)
    sim.running.clear()
    sim.check()
    assert sim.bm.num_free_blocks == num_blocks and sim.bm.num_used_blocks == 0
    # The simulation must have exercised what it claims to test.
    assert sim.hits > (20 if key == "sha256" else 5) and sim.preempted > 5 and sim.forks > 20
    assert sim.cows > 5 or block_size == 1  # with one-token blocks no block is ever partial


def _seq(tokens, sid=0):
    return Sequence(sid, 0, 0, list(tokens), len(tokens), PARAMS, 10 ** 6)


def test_full_prefix_hit_recomputes_last_token():
    bm = BlockManager(8, 4)
    a = _seq(range(8), 1)
    bm.allocate(a)
    bm.mark_computed(a, 8)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8 and len(bm.free_cached) == 2
    b = _seq(range(8), 2)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table == table
    assert bm.num_used_blocks == 2 and not bm.free_cached  # both cached blocks revived, none new
    # The runner computes the last token (its query) anyway, without rewriting the cached slot.
    assert min(b.num_computed_tokens, b.num_tokens - 1) == 7


def test_blocks_are_registered_once_computed():
    bm = BlockManager(16, 4)
    a, b = _seq(range(10), 1), _seq(range(10), 2)
    bm.allocate(a)
    assert bm.match_prefix(_seq(range(10))) == [] and not bm.key_to_block  # K/V not written yet
    bm.allocate(b)  # the same prompt in the same step: its own blocks
    assert not set(a.block_table) & set(b.block_table) and b.num_cached_tokens == 0
    bm.mark_computed(a, 10)
    assert bm.match_prefix(_seq(range(10))) == a.block_table[:2]
    bm.mark_computed(b, 10)
    assert bm.match_prefix(_seq(range(10))) == b.block_table[:2]  # the newest copy holds the keys
    bm.free(a)  # a's copies are unreachable: plain free blocks, not cached ones
    assert len(bm.free_plain) == 16 - 3 and not bm.free_cached
    # A forward that fails: no mark_computed, so nothing was registered and the blocks come back plain.
    c = _seq(range(20, 30), 3)
    bm.allocate(c)
    bm.free(c)
    assert bm.match_prefix(_seq(range(20, 30))) == [] and not bm.free_cached
    bm.check([b.block_table])


def test_copy_on_write_of_shared_partial_block():
    bm = BlockManager(8, 4)
    p = _seq(range(6), 1)
    bm.allocate(p)
    bm.mark_computed(p, 6)
    c = _seq(range(6), 2)
    bm.fork(p, c)
    shared = p.block_table[1]
    p.token_ids.append(100)
    cow = bm.append_slot(p)
    assert cow == (shared, p.block_table[1]) and p.block_table[1] != shared
    assert bm.ref_count[shared] == 1 and bm.ref_count[p.block_table[1]] == 1
    c.token_ids.append(101)
    assert bm.append_slot(c) is None and c.block_table[1] == shared  # the last holder writes in place
    assert bm.ref_count[p.block_table[0]] == 2  # the full prompt block stays shared
    bm.check([p.block_table, c.block_table])


def test_cannot_fit_and_lru_eviction():
    bm = BlockManager(4, 2)
    big = _seq(range(9))  # 5 blocks > 4
    assert not bm.can_allocate(big)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(big)
    old = _seq([7, 7, 7, 7], 1)
    bm.allocate(old)
    bm.mark_computed(old, 4)
    old_table = list(old.block_table)
    bm.free(old)  # tail first: the tail block is the least recently freed, evicted first
    assert len(bm.free_cached) == 2
    new = _seq([1, 2, 3, 4, 5, 6], 2)  # needs 3 blocks: 2 plain free + the LRU cached one
    bm.allocate(new)
    assert len(bm.free_cached) == 1 and bm.num_free_blocks == 1
    assert bm.match_prefix(_seq([7, 7, 7, 7])) == [old_table[0]]
    bm.check([new.block_table])


# ---- end to end: what a failed forward or colliding keys leave behind, against full recompute ----

def _generate(llm, prompt, n=8):
    sp = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, return_logits=True)
    return llm.generate([prompt], sp)[0].outputs[0]


def _assert_same(out, ref):
    assert out.token_ids == ref.token_ids
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)


def test_failed_forward_leaves_no_key_to_unwritten_kv(monkeypatch):
    """The second layer raises during a prefill, after the first has written its K/V: a later
    request with the same prefix must not be served those blocks."""
    model = tiny_model("gqa", seed=0)
    llm = LLM(model=model, device="cpu", block_size=4)
    prompt = list(range(40, 52))  # three full blocks

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(llm.runner.model.layers[1], "forward", broken)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=4))
    monkeypatch.undo()
    ref = _generate(LLM(model=model, device="cpu", use_cache=False), prompt + [7])
    _assert_same(_generate(llm, prompt + [7]), ref)


def test_colliding_keys_hand_out_no_wrong_kv(monkeypatch):
    """Keys that collide whenever two blocks end in the same token: X+Y, then Z+Y (Z ends like X, so
    its Y block takes Y's key), then X+W (X's key again). X+Y then finds X's block and, under Y's key,
    the Y block computed after Z: tokens and parent key agree, only its parent's contents differ."""
    monkeypatch.setattr(block_manager, "block_hash", weak_hash)
    model = tiny_model("gqa", seed=0)
    llm = LLM(model=model, device="cpu", block_size=4)
    X, Z, Y, W = [5, 6, 7, 9], [1, 2, 3, 9], [10, 11, 12, 13], [20, 21, 22, 23]
    for prompt in (X + Y, Z + Y, X + W):
        _generate(llm, prompt, n=1)  # one token: prefill only, no decode blocks with more keys
    ref = _generate(LLM(model=model, device="cpu", use_cache=False), X + Y + [30])
    _assert_same(_generate(llm, X + Y + [30]), ref)
    assert llm.stats.prefix_hit_tokens == 4  # X's block was served; the wrong Y block was refused
