"""The GPU block pool: reference counts, an O(1) LRU free queue, and the exact prefix cache.

A block is either *used* (ref_count > 0, held by one or more block tables) or *free* (ref_count == 0,
in the free queue). A free block may still hold a registered prefix (a *cached* block): it can be
revived by a prefix-cache hit until it is handed out again, least recently freed first.

Prefix identity is exact, with no hash trusted: a registered block gets a fresh `content_id`, and its
cache key is `(parent content_id, its token ids)`. Content ids are never reused, so equal keys mean
equal whole prefixes. Evicting a block removes only its own key; keys of its descendants become
unreachable (a lookup walks from the root) and vanish when those blocks are evicted in turn.
"""

from __future__ import annotations

from collections import OrderedDict

ROOT_CONTENT_ID = 0  # the parent of a sequence's first block
PrefixKey = tuple[int, tuple[int, ...]]


class OutOfBlocksError(RuntimeError):
    """Raised when a block is taken from an empty pool (callers check `num_free` first)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Insertion order is eviction order: popitem(last=False) takes the least recently freed block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._key: list[PrefixKey | None] = [None] * num_blocks
        self.content_id = [ROOT_CONTENT_ID] * num_blocks  # meaningful only while _key is set
        self._cached: dict[PrefixKey, int] = {}
        self._next_content_id = ROOT_CONTENT_ID + 1
        # Kept current for O(1) stats: blocks with ref_count > 1, and free blocks holding a prefix.
        self.num_shared = 0
        self.num_cached_free = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """A fresh block with ref_count 1; evicts the least recently freed one's prefix."""
        if not self._free:
            raise OutOfBlocksError("the KV block pool is empty")
        block, _ = self._free.popitem(last=False)
        key = self._key[block]
        if key is not None:
            del self._cached[key]
            self._key[block] = None
            self.num_cached_free -= 1
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Share a block (fork, or a prefix-cache hit that may revive a free cached block)."""
        count = self.ref_counts[block]
        if count == 0:
            del self._free[block]
            if self._key[block] is not None:
                self.num_cached_free -= 1
        elif count == 1:
            self.num_shared += 1
        self.ref_counts[block] = count + 1

    def decref(self, block: int) -> None:
        """Drop one holder; at zero the block joins the free queue as most recently freed."""
        count = self.ref_counts[block] - 1
        if count < 0:
            raise RuntimeError(f"block {block} freed more often than it was taken")
        self.ref_counts[block] = count
        if count == 1:
            self.num_shared -= 1
        elif count == 0:
            self._free[block] = None
            if self._key[block] is not None:
                self.num_cached_free += 1

    def lookup(self, parent_content_id: int, tokens: tuple[int, ...]) -> int | None:
        """The block holding exactly this prefix continuation, used or free, if any."""
        return self._cached.get((parent_content_id, tokens))

    def register(self, block: int, parent_content_id: int, tokens: tuple[int, ...]) -> int:
        """Record that a full, computed `block` holds `tokens` after the given parent; return the
        content id a child should chain from. If another block already holds the same prefix, that
        block's content id is returned and `block` stays an unregistered duplicate."""
        key = (parent_content_id, tokens)
        existing = self._cached.get(key)
        if existing is not None:
            return self.content_id[existing]
        if self._key[block] is not None:
            raise RuntimeError(f"block {block} is already registered")
        content_id = self._next_content_id
        self._next_content_id += 1
        self._cached[key] = block
        self._key[block] = key
        self.content_id[block] = content_id
        return content_id

    def is_registered(self, block: int) -> bool:
        return self._key[block] is not None

    def free_blocks_in_eviction_order(self) -> list[int]:
        return list(self._free)


class CpuBlockPool:
    """Swap space: a plain free list with reference counts (sharing survives a swap round trip)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocksError("the CPU swap space is full")
        block = self._free.pop()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] < 0:
            raise RuntimeError(f"CPU block {block} freed more often than it was taken")
        if self.ref_counts[block] == 0:
            self._free.append(block)
