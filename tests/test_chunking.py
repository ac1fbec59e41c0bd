"""Adaptive chunk sizes: one item first, then at most GROWTH times the chunk before, toward
about TARGET_CHUNK_SECONDS of work, and enough chunks per worker to balance."""
from pmap.chunking import CHUNKS_PER_WORKER, GROWTH, MAX_CHUNK, PER_ITEM_OVERHEAD, TARGET_CHUNK_SECONDS, ChunkSizer


def test_the_first_chunk_is_one_item_and_one_fast_item_does_not_make_a_huge_chunk():
    sizer = ChunkSizer(None, workers=4, total=None)
    assert sizer.size() == 1
    sizer.observe(1, 1e-9)
    assert sizer.size() == GROWTH


def test_chunks_grow_by_growth_per_step_up_to_the_cap():
    sizer = ChunkSizer(None, workers=4, total=None)
    sizes = []
    for _ in range(12):
        sizes.append(sizer.size())
        sizer.observe(sizes[-1], 0.0)  # free items: only the growth and the cap bound the chunk
    assert sizes[:4] == [1, GROWTH, GROWTH ** 2, GROWTH ** 3]
    assert max(sizes) == MAX_CHUNK


def test_the_chunk_aims_at_the_target_time():
    sizer = ChunkSizer(None, workers=1, total=None)
    for _ in range(10):
        sizer.observe(sizer.size(), sizer.size() * 1e-3)  # 1 ms per item
    assert sizer.size() == int(TARGET_CHUNK_SECONDS / (1e-3 + PER_ITEM_OVERHEAD))


def test_a_known_length_leaves_every_worker_several_chunks():
    sizer = ChunkSizer(None, workers=4, total=10_000)
    for _ in range(10):
        sizer.observe(sizer.size(), 1e-9)
    assert sizer.size() == -(-10_000 // (4 * CHUNKS_PER_WORKER))


def test_an_explicit_chunksize_is_kept():
    sizer = ChunkSizer(7, workers=2, total=100)
    sizer.observe(7, 1.0)
    assert sizer.size() == 7
