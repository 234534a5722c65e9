"""The continuous engine's paged token pool: the C++ gather and scatter against the index-op reference."""

import numpy as np
import pytest
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.continuous.token_pool import TokenPool

pytestmark = pytest.mark.exact  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)

if not eek.backends()["cpp"]:
    pytest.fail(f"the C++ backend must be built for these tests: {eek.backend_status()['cpp']}", pytrace=False)

CPU = torch.device("cpu")
SLOTS, MAX_LENGTH, HIDDEN = 12, 70, 24


def _pools(dtype, seed=0):
    """A reference pool and a C++ one, same slots, pages and contents; the last slot is a pad slot (length 0)."""
    generator = np.random.default_rng(seed)
    lengths = generator.integers(1, MAX_LENGTH + 1, size=SLOTS - 1)
    pools = [TokenPool(SLOTS, MAX_LENGTH, HIDDEN, dtype, CPU, fast=fast) for fast in (False, True)]
    for pool in pools:
        pool.take(list(range(SLOTS - 1)), lengths)
    contents = torch.randn(pools[0].pool.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    contents[0] = 0  # NULL
    for pool in pools:
        pool.pool.copy_(contents)
    return pools, lengths


def _expected_rows(pool: TokenPool, slots, padded_length):
    """Row by row from the page table: the slot's tokens, then zeros."""
    out = torch.zeros(len(slots), padded_length, HIDDEN, dtype=pool.pool.dtype)
    for i, slot in enumerate(slots):
        for position in range(min(int(pool.lengths[slot]), padded_length)):
            page = pool.page_table[slot, position // pool.page_size]
            out[i, position] = pool.pool[page * pool.page_size + position % pool.page_size]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_reads_each_slots_tokens_and_zeros_after(dtype):
    (reference, fast), lengths = _pools(dtype)
    for slots in ([0], [3, 1, 7], [SLOTS - 1, 2, SLOTS - 1], list(range(SLOTS - 1))):
        padded_length = int(max(lengths[s] if s < SLOTS - 1 else 1 for s in slots))
        for pool in (reference, fast):
            hidden, mask = pool.gather(slots, padded_length)
            assert hidden.shape == (len(slots), padded_length, HIDDEN) and hidden.dtype == dtype
            assert torch.equal(hidden, _expected_rows(pool, slots, padded_length))
            expected_mask = torch.arange(padded_length)[None] < torch.from_numpy(pool.lengths[slots])[:, None]
            assert mask.dtype == torch.bool and torch.equal(mask, expected_mask)


def test_gather_takes_rows_from_earlier_outputs_where_told():
    (reference, fast), _ = _pools(torch.float32, seed=1)
    residents = [torch.randn(4, MAX_LENGTH, HIDDEN), torch.randn(2, MAX_LENGTH, HIDDEN)]
    slots, resident_of, row_of = [5, 0, 9, 2, 7], [-1, 0, 1, -1, 0], [-1, 3, 1, -1, 0]
    padded_length = int(reference.lengths[slots].max())
    expected = _expected_rows(reference, slots, padded_length)
    for i, (of, row) in enumerate(zip(resident_of, row_of)):
        if of >= 0:
            length = int(reference.lengths[slots[i]])
            expected[i, :length] = residents[of][row, :length]
    for pool in (reference, fast):
        hidden, _ = pool.gather(slots, padded_length, residents, resident_of, row_of)
        assert torch.equal(hidden, expected)


def test_scatter_writes_each_rows_tokens_and_skips_rows_marked_minus_one():
    (reference, fast), _ = _pools(torch.float32, seed=2)
    slots = [4, -1, 8, 1]
    written = [slot for slot in slots if slot >= 0]
    hidden = torch.randn(len(slots), MAX_LENGTH, HIDDEN)
    untouched = reference.gather([6, 3], MAX_LENGTH)[0]
    for pool in (reference, fast):
        pool.scatter(slots, hidden)
    assert torch.equal(reference.pool[2:], fast.pool[2:])  # the reference writes skipped positions to SCRATCH
    for pool in (reference, fast):
        got, mask = pool.gather(written, MAX_LENGTH)
        expected = hidden[[0, 2, 3]] * mask[..., None]
        assert torch.equal(got, expected)
        assert torch.equal(pool.gather([6, 3], MAX_LENGTH)[0], untouched)


def test_pages_are_reused_after_release_and_the_pool_grows_when_short():
    pool = TokenPool(4, 64, 8, torch.float32, CPU, fast=True)
    pool.take([0, 1], np.array([40, 17]))
    size = pool.pool.shape[0]
    assert size >= 16 + 16 * (3 + 2)
    pool.scatter([0, 1], torch.ones(2, 40, 8))
    pool.release([0])
    pool.take([2], np.array([33]))  # the three pages slot 0 gave back
    assert pool.pool.shape[0] == size
    assert set(pool.page_table[2, :3]) <= set(range(1, size // 16))
    hidden, _ = pool.gather([1], 17)
    assert torch.equal(hidden, torch.ones(1, 17, 8))


def test_bad_arguments_get_errors_that_name_them():
    (_, fast), _ = _pools(torch.float32)
    with pytest.raises(RuntimeError, match="slot 99 is out of range"):
        fast.gather([99], 4)
    with pytest.raises(RuntimeError, match="one entry per slot"):
        fast.gather([0, 1], 4, [torch.zeros(1, 4, HIDDEN)], [0], [0])
    with pytest.raises(RuntimeError, match="is not a row of resident 0"):
        fast.gather([0], MAX_LENGTH, [torch.zeros(1, MAX_LENGTH, HIDDEN)], [0], [5])
    with pytest.raises(RuntimeError, match="but 1 residents are given"):
        fast.gather([0], MAX_LENGTH, [torch.zeros(1, MAX_LENGTH, HIDDEN)], [1], [0])
    with pytest.raises(RuntimeError, match="hidden holds"):
        fast.scatter([0], torch.zeros(1, int(fast.lengths[0]) - 1 if fast.lengths[0] > 1 else 0, HIDDEN))
    with pytest.raises(RuntimeError, match="pool's H and dtype"):
        fast.scatter([0], torch.zeros(1, MAX_LENGTH, HIDDEN + 1))
