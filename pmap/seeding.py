"""Random numbers per item: a stream for item i of a `seed=` run, derived from (seed, i) alone,
and a random state of its own for every worker process.

Item i's stream is numpy's `SeedSequence(seed, spawn_key=(i,))`, the i-th child of
`SeedSequence(seed).spawn(...)`: it does not depend on the backend, the worker, the chunk size,
the order of completion, a retry or a resumed run. Its words come from the pure-Python twin of
SeedSequence below (the same numbers, checked against numpy in the tests), so `item_seed()` and
the module-level `random` are the same with or without numpy installed, and a run pays for numpy's
Generator only when the function asks for one (`rng()`).
"""
from __future__ import annotations

import contextvars
import os
import random
import sys
import warnings
from typing import Any, Callable

# numpy's SeedSequence constants (numpy/random/bit_generator.pyx)
_MASK32 = 0xFFFF_FFFF
_POOL_SIZE = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_XSHIFT = 16
_SEED_MASK = (1 << 63) - 1  # item_seed() fits a signed 64-bit integer (torch, JAX, C libraries)

_CURRENT: contextvars.ContextVar["ItemStream | None"] = contextvars.ContextVar("pmap_item_stream", default=None)


def check_seed(seed: Any) -> None:
    """A `seed=` value: None, or a non-negative integer (numpy's SeedSequence entropy)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be a non-negative integer or None, not {type(seed).__name__}")
    if seed.__index__() < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def _uint32_words(n: int) -> list[int]:
    """An integer as numpy's SeedSequence reads it: 32-bit words, least significant first."""
    words = []
    while True:
        words.append(n & _MASK32)
        n >>= 32
        if not n:
            return words


class _Pool:
    """SeedSequence's entropy pool for `seed`, with item indices mixed in one at a time. The
    seed's part is mixed once per run; an item pays only for its index's words."""

    __slots__ = ("pool", "hash_const", "legacy_keys", "random_key")

    def __init__(self, seed: int):
        run_entropy = _uint32_words(seed)
        run_entropy += [0] * (_POOL_SIZE - len(run_entropy))  # padded so, as a spawn key follows
        hash_const = _INIT_A
        pool = []
        for word in run_entropy[:_POOL_SIZE]:
            value, hash_const = _hashmix(word, hash_const)
            pool.append(value)
        for src in range(_POOL_SIZE):
            for dst in range(_POOL_SIZE):
                if src != dst:
                    value, hash_const = _hashmix(pool[src], hash_const)
                    pool[dst] = _mix(pool[dst], value)
        self.pool, self.hash_const = pool, hash_const
        self._mix_in(run_entropy[_POOL_SIZE:])
        # The seed's own words (SeedSequence(seed).generate_state(6)) key the module-level
        # generators' seeds, which join them with the index: no per-item hashing in Python.
        own = _generate(self.pool, 6)
        self.legacy_keys = own[:2]
        self.random_key = own[2] | own[3] << 32 | own[4] << 64 | own[5] << 96

    def random_seed(self, index: int) -> int:
        """The seed of the module-level `random` for item `index`: the seed's 128-bit key with
        the index above it, which random.seed hashes into its state (MT19937's init_by_array)."""
        return index << 128 | self.random_key

    def legacy_seed(self, index: int) -> int:
        """The 32-bit seed of numpy's legacy global state for item `index`. numpy seeds it from
        an integer below 2**32 in about a microsecond, and from anything longer in ten, so it is
        a permutation of the index keyed by the seed: no two items of a run share one."""
        k1, k2 = self.legacy_keys
        folded = (index ^ (index >> 32)) & _MASK32 if index >> 32 else index
        return _fmix32(_fmix32(folded ^ k1) ^ k2)

    def _mix_in(self, words: list[int]) -> None:
        pool, hash_const = self.pool, self.hash_const
        for word in words:
            for dst in range(_POOL_SIZE):
                value, hash_const = _hashmix(word, hash_const)
                pool[dst] = _mix(pool[dst], value)
        self.hash_const = hash_const

    def words_for(self, index: int, n: int) -> list[int]:
        """`SeedSequence(seed, spawn_key=(index,)).generate_state(n)` as Python ints. The mixing
        is spelled out inline: it runs for every item."""
        pool = list(self.pool)
        hash_const = self.hash_const
        for word in _uint32_words(index):
            for dst in range(_POOL_SIZE):
                value = word ^ hash_const
                hash_const = (hash_const * _MULT_A) & _MASK32
                value = (value * hash_const) & _MASK32
                value ^= value >> _XSHIFT
                mixed = (_MIX_MULT_L * pool[dst] - _MIX_MULT_R * value) & _MASK32
                pool[dst] = mixed ^ (mixed >> _XSHIFT)
        return _generate(pool, n)


def _generate(pool: list[int], n: int) -> list[int]:
    """SeedSequence.generate_state(n) of an entropy pool."""
    out = []
    hash_const = _INIT_B
    for k in range(n):
        value = pool[k % _POOL_SIZE] ^ hash_const
        hash_const = (hash_const * _MULT_B) & _MASK32
        value = (value * hash_const) & _MASK32
        out.append(value ^ (value >> _XSHIFT))
    return out


def _fmix32(h: int) -> int:
    """MurmurHash3's finaliser: a bijection of 32-bit integers that scatters their bits."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _hashmix(value: int, hash_const: int) -> tuple[int, int]:
    value ^= hash_const
    hash_const = (hash_const * _MULT_A) & _MASK32
    value = (value * hash_const) & _MASK32
    return value ^ (value >> _XSHIFT), hash_const


def _mix(x: int, y: int) -> int:
    result = (_MIX_MULT_L * x - _MIX_MULT_R * y) & _MASK32
    return result ^ (result >> _XSHIFT)


class ItemStream:
    """Item `index`'s randomness in a run of `seed`: its seed and generator, made when first asked for."""

    __slots__ = ("pool", "seed", "index", "_item_seed", "_rng")

    def __init__(self, pool: _Pool, seed: int, index: int):
        self.pool, self.seed, self.index = pool, seed, index
        self._item_seed = None
        self._rng = None

    def item_seed(self) -> int:
        if self._item_seed is None:
            low, high = self.pool.words_for(self.index, 2)
            self._item_seed = (low | high << 32) & _SEED_MASK
        return self._item_seed

    def rng(self):
        if self._rng is None:
            np = _numpy("pmap.rng()")
            self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(self.index,))))
        return self._rng

    def seed_globals(self) -> None:
        """Seed the module-level `random` and numpy's legacy global state for this item."""
        random.seed(self.pool.random_seed(self.index))
        numpy_seed = _numpy_legacy_seed()
        if numpy_seed is not None:
            numpy_seed(self.pool.legacy_seed(self.index))


def _numpy(what: str):
    try:
        import numpy
    except ImportError:
        raise ImportError(f"{what} returns a numpy.random.Generator, and numpy is not installed: "
                          "pip install 'pmap[numpy]', or use random.Random(pmap.item_seed())") from None
    return numpy


def _current(what: str) -> ItemStream:
    stream = _CURRENT.get()
    if stream is None:
        raise RuntimeError(f"{what} works only inside a function that pmap runs with seed=..., "
                           "e.g. pmap.pmap(func, items, seed=0); here no such item is running")
    return stream


def rng():
    """The running item's own `numpy.random.Generator`, in a run given `seed=`.

    Item i's generator is `numpy.random.default_rng(numpy.random.SeedSequence(seed).spawn(i + 1)[i])`,
    whatever backend, worker, chunk size or retry ran it. The same object is returned for every call
    within one run of the item.

    Raises
    ------
    RuntimeError
        Outside a function that pmap runs with `seed=`.
    ImportError
        numpy is not installed (use `random.Random(pmap.item_seed())`).
    """
    return _current("pmap.rng()").rng()


def item_seed() -> int:
    """The running item's seed, an integer in [0, 2**63), in a run given `seed=`: for other
    generators (`random.Random(pmap.item_seed())`, `torch.manual_seed(pmap.item_seed())`).

    It depends only on the run's seed and the item's index in the input.

    Raises
    ------
    RuntimeError
        Outside a function that pmap runs with `seed=`.
    """
    return _current("pmap.item_seed()").item_seed()


# How a backend's items meet the module-level generators (`Backend.random_globals`):
OWN = "own"        # each item runs alone in a worker process of pmap's: seeded per item
CALLER = "caller"  # each item runs alone, in the caller's process: seeded per item, restored after the run
SHARED = "shared"  # items run at once in one process: the generators are shared and left alone
_WATCHED_ITEMS = 4  # items of a shared run whose use of the module-level generators is checked


class Seeded:
    """The function of a `seed=` run: it takes `(index, item)` (or, `pass_pair`, a pair that is
    itself the item, as the command line's are), makes the item's stream current, seeds the
    module-level generators where `random_globals` allows, and calls `func`."""

    def __init__(self, func: Callable, seed: int, random_globals: str, pass_pair: bool = False):
        self.func = func
        self.seed = seed
        self.random_globals = random_globals
        self.pass_pair = pass_pair
        self._pool = _Pool(seed)
        self._watched = 0
        self._warned = False

    def __reduce__(self):
        return (type(self), (self.func, self.seed, self.random_globals, self.pass_pair))

    def _enter(self, pair):
        stream = ItemStream(self._pool, self.seed, pair[0])
        if self.random_globals == SHARED:
            before = _watch() if self._watched < _WATCHED_ITEMS and not self._warned else None
        else:
            stream.seed_globals()
            before = None
        return _CURRENT.set(stream), before, pair if self.pass_pair else pair[1]

    def _leave(self, token, before) -> None:
        _CURRENT.reset(token)
        if before is not None:
            self._watched += 1
            if _watch() != before and not self._warned:
                self._warned = True
                warnings.warn("an item of this seed= run used the module-level random or numpy.random "
                              "generators, which items running at once on this backend share, so those "
                              "numbers are not reproducible: draw from pmap.rng() (or "
                              "random.Random(pmap.item_seed())), or run on a process backend",
                              RuntimeWarning)

    def __call__(self, pair):
        token, before, item = self._enter(pair)
        try:
            return self.func(item)
        finally:
            self._leave(token, before)


class SeededAsync(Seeded):
    """`Seeded` for an `async def` function."""

    async def __call__(self, pair):
        token, before, item = self._enter(pair)
        try:
            return await self.func(item)
        finally:
            self._leave(token, before)


_numpy_seed: Any = False  # numpy.random.seed once looked up; None without numpy


def _numpy_legacy_seed():
    """numpy.random.seed, importing numpy where it is installed: a function that imports numpy
    itself would otherwise draw its first item's numbers from an unseeded state. Looked up once
    per process; None where numpy is not installed."""
    global _numpy_seed
    if _numpy_seed is False:
        try:
            import numpy.random
            _numpy_seed = numpy.random.seed
        except ImportError:  # no numpy here: only `random` is seeded
            _numpy_seed = None
    return _numpy_seed


def _watch() -> tuple:
    """Where the module-level generators stand (to tell whether an item drew from them)."""
    numpy_random = sys.modules.get("numpy.random")
    numpy_state = None
    if numpy_random is not None:
        _, key, pos, *_ = numpy_random.get_state()
        numpy_state = (pos, key.tobytes())
    return random.getstate(), numpy_state


class CallerState:
    """The caller's module-level random states, put back after a run that seeded them per item."""

    def __init__(self):
        _numpy_legacy_seed()  # imported now, if at all, so that its state is put back too
        numpy_random = sys.modules.get("numpy.random")
        self.random_state = random.getstate()
        self.numpy_random = numpy_random
        self.numpy_state = numpy_random.get_state() if numpy_random is not None else None

    def restore(self) -> None:
        random.setstate(self.random_state)
        if self.numpy_random is not None:
            self.numpy_random.set_state(self.numpy_state)


def fresh_worker_state() -> None:
    """A new worker process draws its own numbers: a forked one starts with a copy of its parent's
    numpy global state (CPython reseeds only `random` after a fork), and a forkserver's children
    with a copy of the server's. Once per worker process, from the OS's entropy."""
    random.seed(os.urandom(32))
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
