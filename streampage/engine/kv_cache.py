"""The KV cache manager: block tables over one GPU block pool, prefix caching, fork, copy-on-write, swap.

Per sequence it keeps a block table (logical block i -> physical block) and the prefix chain of its
full, computed blocks (the content ids of `BlockPool`). Blocks are taken on demand, one step at a
time, so a sequence wastes at most `block_size - 1` slots.

Invariants (checked by `check_invariants`, exercised by property tests):
- every GPU block's ref_count equals the number of block tables of running sequences holding it;
  `free + used == total`;
- a sequence only ever writes slots at positions >= num_computed_tokens, and the block holding that
  position is private to it (copy-on-write happens in `allocate_slots` before the write);
- registered (prefix-cached) blocks are full and computed, so they are never written again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from streampage.engine.block_pool import ROOT_CONTENT_ID, BlockPool, CpuBlockPool
from streampage.engine.request import SeqStatus, Sequence

BlockPair = tuple[int, int]


@dataclass(frozen=True)
class PrefixHit:
    blocks: list[int]
    content_ids: list[int]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class KVCacheManager:
    def __init__(
        self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int,
        enable_prefix_caching: bool = True, watermark: float = 0.01,
    ) -> None:
        self.block_size = block_size
        self.gpu = BlockPool(num_gpu_blocks)
        self.cpu = CpuBlockPool(num_cpu_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.block_tables: dict[int, list[int]] = {}  # seq_id -> GPU blocks (running) or CPU blocks (swapped)
        self._chains: dict[int, list[int]] = {}  # seq_id -> content ids of its first full blocks
        # Change log for the runner's persistent copy of the tables: tables that changed other than by
        # appending (copy-on-write, swap), and tables that were dropped. Taken once per step.
        self.rewritten: set[int] = set()
        self.dropped: list[int] = []

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.gpu.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.gpu.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------

    def find_prefix(self, seq: Sequence) -> PrefixHit:
        """The longest run of cached full blocks that starts the sequence. It never covers the last
        token: at least one token is always computed, so the step has logits to sample from."""
        if not self.enable_prefix_caching:
            return PrefixHit([], [])
        tokens, size = seq.token_ids, self.block_size
        blocks: list[int] = []
        chain: list[int] = []
        parent = ROOT_CONTENT_ID
        for i in range((len(tokens) - 1) // size):
            block = self.gpu.lookup(parent, tuple(tokens[i * size : (i + 1) * size]))
            if block is None:
                break
            parent = self.gpu.content_id[block]
            blocks.append(block)
            chain.append(parent)
        return PrefixHit(blocks, chain)

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> int:
        """GPU blocks `allocate_slots` would take (copy-on-write included; cached free blocks that a
        prefix hit revives count too, since they leave the free queue)."""
        table = self.block_tables.get(seq.seq_id)
        if table is None:  # a new sequence: `num_new_tokens` come after the prefix hit
            if hit is None:
                return self.blocks_for(num_new_tokens)
            revived = sum(1 for b in hit.blocks if self.gpu.ref_counts[b] == 0)
            return revived + self.blocks_for(hit.num_blocks * self.block_size + num_new_tokens) - hit.num_blocks
        return self._blocks_to_grow(seq, table, num_new_tokens, self.gpu.ref_counts)

    def _blocks_to_grow(self, seq: Sequence, table: list[int], num_new_tokens: int, ref_counts: list[int]) -> int:
        """Blocks an existing table takes for the next `num_new_tokens`: those the tokens open, plus a
        copy-on-write block when the block about to be written is shared (by `ref_counts`: the GPU
        pool's, or the CPU pool's for a table swapped out)."""
        need = max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(table))
        return need + (1 if self._write_block_is_shared(seq, table, ref_counts) else 0)

    def can_allocate(self, num_blocks: int, keep_watermark: bool) -> bool:
        reserve = self.watermark_blocks if keep_watermark else 0
        return self.gpu.num_free - num_blocks >= reserve

    # ---- allocation --------------------------------------------------------------------------

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, copies: list[BlockPair], hit: PrefixHit | None = None
    ) -> None:
        """Give `seq` slots for its next `num_new_tokens` tokens. A new sequence first takes the
        prefix `hit` (its tokens become computed). Appends a (src, dst) pair to `copies` when the
        block about to be written is shared. The caller checks `num_new_blocks_needed` first."""
        table = self.block_tables.get(seq.seq_id)
        if table is None:
            table = self.block_tables[seq.seq_id] = []
            chain = self._chains[seq.seq_id] = []
            if hit is not None and hit.blocks:
                for block in hit.blocks:
                    self.gpu.incref(block)
                table.extend(hit.blocks)
                chain.extend(hit.content_ids)
                seq.num_computed_tokens = hit.num_blocks * self.block_size
        elif self._write_block_is_shared(seq, table, self.gpu.ref_counts):
            index = seq.num_computed_tokens // self.block_size
            src = table[index]
            dst = self.gpu.allocate()
            self.gpu.decref(src)
            table[index] = dst
            copies.append((src, dst))
            self.rewritten.add(seq.seq_id)
        for _ in range(self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(table)):
            table.append(self.gpu.allocate())

    def _write_block_is_shared(self, seq: Sequence, table: list[int], ref_counts: list[int]) -> bool:
        index = seq.num_computed_tokens // self.block_size
        return index < len(table) and ref_counts[table[index]] > 1

    def commit_computed(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now full and computed in the prefix cache."""
        chain = self._chains.get(seq.seq_id)
        if chain is None or not self.enable_prefix_caching or seq.status is not SeqStatus.RUNNING:
            # Prefix caching is off, or the sequence holds no GPU blocks now: preempted, or swapped
            # out while its last step was in flight (its table then names CPU blocks).
            return
        table = self.block_tables[seq.seq_id]
        size = self.block_size
        tokens = seq.token_ids
        for i in range(len(chain), seq.num_computed_tokens // size):
            parent = chain[i - 1] if i else ROOT_CONTENT_ID
            chain.append(self.gpu.register(table[i], parent, tuple(tokens[i * size : (i + 1) * size])))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (copy-on-write on its first write)."""
        table = self.block_tables[parent.seq_id]
        for block in table:
            self.gpu.incref(block)
        self.block_tables[child.seq_id] = list(table)
        self._chains[child.seq_id] = list(self._chains[parent.seq_id])

    def free(self, seq: Sequence) -> None:
        """Release the sequence's GPU blocks, tail first, so shared prefixes stay cached longest."""
        table = self.block_tables.pop(seq.seq_id, None)
        self._chains.pop(seq.seq_id, None)
        if table is not None:
            self.dropped.append(seq.seq_id)
            for block in reversed(table):
                self.gpu.decref(block)

    # ---- swap --------------------------------------------------------------------------------

    def num_blocks_to_swap(self, seqs: Iterable[Sequence]) -> int:
        """Distinct blocks the sequences hold (shared blocks move once)."""
        return len({b for s in seqs for b in self.block_tables[s.seq_id]})

    def blocks_to_resume(self, seqs: list[Sequence], rows: list[tuple[Sequence, int]]) -> int:
        """GPU blocks swapped-out sequences need to come back and run their next rows (sequence,
        tokens): the shared blocks once, plus the blocks each row's new tokens open, plus one
        copy-on-write block per row that writes into a block it shares."""
        ref_counts = self.cpu.ref_counts  # the tables name CPU blocks while swapped out
        return self.num_blocks_to_swap(seqs) + sum(
            self._blocks_to_grow(seq, self.block_tables[seq.seq_id], n, ref_counts) for seq, n in rows)

    def swap_out(self, seqs: list[Sequence]) -> list[BlockPair]:
        """Move the sequences' blocks to CPU swap space, keeping sharing between them.
        Returns (gpu, cpu) copies to run before the GPU blocks are reused."""
        return self._move(seqs, self.gpu, self.cpu)

    def swap_in(self, seqs: list[Sequence]) -> list[BlockPair]:
        """Bring swapped sequences back into fresh GPU blocks. Returns (cpu, gpu) copies."""
        self.rewritten.update(s.seq_id for s in seqs)
        return self._move(seqs, self.cpu, self.gpu)

    def _move(self, seqs: list[Sequence], source: BlockPool | CpuBlockPool,
              target: BlockPool | CpuBlockPool) -> list[BlockPair]:
        """Re-home the sequences' tables from one pool to the other; a block shared by several of them
        moves once and stays shared."""
        mapping: dict[int, int] = {}
        for seq in seqs:
            table = self.block_tables[seq.seq_id]
            for i, block in enumerate(table):
                moved = mapping.get(block)
                if moved is None:
                    moved = mapping[block] = target.allocate()
                else:
                    target.incref(moved)
                source.decref(block)
                table[i] = moved
        return list(mapping.items())

    def free_swapped(self, seq: Sequence) -> None:
        """Release a swapped-out sequence's CPU blocks (abort while swapped)."""
        table = self.block_tables.pop(seq.seq_id, None)
        self._chains.pop(seq.seq_id, None)
        if table is not None:
            self.dropped.append(seq.seq_id)
            for block in table:
                self.cpu.decref(block)

    def take_table_changes(self) -> tuple[set[int], list[int]]:
        """Tables rewritten and tables dropped since the last call (for the runner's mirror)."""
        rewritten, dropped = self.rewritten, self.dropped
        self.rewritten, self.dropped = set(), []
        return rewritten, dropped

    # ---- checks ------------------------------------------------------------------------------

    def check_invariants(self, running: Iterable[Sequence], swapped: Iterable[Sequence]) -> None:
        """Raise AssertionError if block accounting is inconsistent with the given live sequences."""
        gpu_refs = [0] * self.gpu.num_blocks
        cpu_refs = [0] * self.cpu.num_blocks
        running_ids = set()
        for seq in running:
            running_ids.add(seq.seq_id)
            for block in self.block_tables.get(seq.seq_id, ()):
                gpu_refs[block] += 1
        for seq in swapped:
            for block in self.block_tables[seq.seq_id]:
                cpu_refs[block] += 1
        assert gpu_refs == self.gpu.ref_counts, "GPU ref counts differ from block tables"
        assert cpu_refs == self.cpu.ref_counts, "CPU ref counts differ from swapped block tables"
        free = set(self.gpu.free_blocks_in_eviction_order())
        assert len(free) == self.gpu.num_free, "free queue holds a block twice"
        assert free == {b for b, r in enumerate(self.gpu.ref_counts) if r == 0}, "free queue != unreferenced"
        assert self.gpu.num_free + self.gpu.num_used == self.gpu.num_blocks
        assert self.gpu.num_shared == sum(1 for r in self.gpu.ref_counts if r > 1)
        cached_free = sum(1 for b in free if self.gpu.is_registered(b))
        assert self.gpu.num_cached_free == cached_free, "cached-free counter drifted"
        stale = set(self.block_tables) - running_ids - {s.seq_id for s in swapped}
        assert not stale, f"block tables of dead sequences: {sorted(stale)}"
