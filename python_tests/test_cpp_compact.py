"""The C++ CPU compaction gather against compaction.compact."""

import pytest
import torch
from conftest import compact_past_two_to_the_31, on_device

import earlyexit_kernels as eek
from earlyexit_kernels.backends import compaction, cpp_backend

pytestmark = pytest.mark.exact  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)

if not eek.backends()["cpp"]:
    pytest.fail(f"the C++ backend must be built for these tests: {eek.backend_status()['cpp']}", pytrace=False)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU = torch.device("cpu")


def _inputs(n, seq, hidden, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(n, seq, hidden, generator=generator).to(dtype)
    lengths = torch.randint(1, seq + 1, (n,), generator=generator)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    keep = torch.rand(n, generator=generator) < 0.6
    index = compaction.survivor_index(keep, int(keep.sum()))
    return states, mask, index


def _check(hidden, mask, index, seq_len, device=CPU):
    ref_h, ref_m = compaction.compact(hidden, mask, index, seq_len)
    got_h, got_m = on_device(cpp_backend.compact, device)(hidden, mask, index, seq_len)
    assert got_h.dtype == ref_h.dtype and got_h.shape == ref_h.shape and got_h.is_contiguous()
    assert torch.equal(got_h, ref_h)
    if mask is None:
        assert got_m is None
    else:
        assert got_m.dtype == ref_m.dtype and torch.equal(got_m, ref_m)


@pytest.mark.skipif(not eek.backends()["cuda"], reason="needs the CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_compact_matches_reference(dtype):
    for n in (1, 17, 257):
        for hidden, seq in [(64, 7), (768, 5), (1024, 3)]:
            states, mask, index = _inputs(n, seq, hidden, dtype, seed=n + hidden)
            _check(states, mask, index, seq, torch.device("cuda"))
            _check(states, None, index, seq - 1, torch.device("cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 17, 64, 257])
def test_compact_matches_reference(dtype, n):
    for hidden, seq in [(64, 7), (384, 12), (768, 5), (1024, 3)]:
        states, mask, index = _inputs(n, seq, hidden, dtype, seed=n + hidden)
        for seq_len in (1, max(1, seq - 2), seq, seq + 3):
            _check(states, mask, index, seq_len)
        _check(states, None, index, seq)


def test_compact_non_contiguous_and_odd_layouts():
    states, mask, index = _inputs(33, 9, 40, torch.float32, seed=1)
    big = torch.randn(66, 9, 40)
    _check(big[::2], mask, index, 6)  # strided rows
    _check(states.transpose(1, 2).contiguous().transpose(1, 2), mask, index, 6)  # permuted inner dims
    _check(states[:, :, 1:], mask, index, 4)  # storage offset, unaligned rows
    odd = torch.randn(33, 9, 3, dtype=torch.float16)  # 6-byte rows: no 16-byte path
    _check(odd, mask.bool(), index, 5)
    _check(states, mask[:, ::1].t().contiguous().t(), index, 7)  # strided mask
    _check(states, mask, torch.flip(index, [0]), 9)  # any order, repeated rows allowed
    _check(states, mask, index.repeat(2), 9)
    _check(states, mask, index.int(), 9)


def test_compact_empty_and_errors():
    states, mask, _ = _inputs(5, 4, 8, torch.float32, seed=2)
    _check(states, mask, torch.empty(0, dtype=torch.long), 3)
    with pytest.raises(RuntimeError, match="out of range"):
        cpp_backend.compact(states, mask, torch.tensor([0, 5]), 3)
    with pytest.raises(RuntimeError, match="out of range"):
        cpp_backend.compact(states, mask, torch.tensor([-1]), 3)
    with pytest.raises(RuntimeError, match="mask"):
        cpp_backend.compact(states, mask[:, :2], torch.tensor([0]), 3)


def test_compact_poisoned_allocations():
    import torch.utils.deterministic as det

    old_mode, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(3)).all()
        for dtype in DTYPES:
            states, mask, index = _inputs(64, 11, 72, dtype, seed=3)
            _check(states, mask, index, 8)
            got, _ = cpp_backend.compact(states, mask, index, 8)
            assert not torch.isnan(got).any()
    finally:
        torch.use_deterministic_algorithms(old_mode)
        det.fill_uninitialized_memory = old_fill


@pytest.mark.skipif(not eek.backends()["cuda"], reason="needs the CUDA kernels (a [n, S, H] tensor past 2^31 elements)")
def test_cuda_compact_past_two_to_the_31_elements():
    """B * S * H > 2^31 (int32 offsets would wrap): the last rows and positions land where they belong."""
    compact_past_two_to_the_31(cpp_backend.compact)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not eek.backends()["cuda"], reason="needs two CUDA devices")
def test_cuda_compact_on_second_gpu():
    torch.cuda.set_device(0)
    states, mask, index = _inputs(17, 9, 768, torch.float16, seed=8)
    _check(states, mask, index, 7, torch.device("cuda", 1))
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("with_mask", [True, False])
def test_rows_that_stay_in_place_are_not_copied(with_mask):
    hidden, mask, _ = _inputs(9, 7, 16, torch.float32, seed=3)
    mask = mask if with_mask else None
    prefix = torch.arange(5)
    _check(hidden, mask, prefix, 7)
    got_h, got_m = cpp_backend.compact(hidden, mask, prefix, 7)
    assert got_h.data_ptr() == hidden.data_ptr()  # a view of the first 5 rows
    assert mask is None or got_m.data_ptr() == mask.data_ptr()
    # a row that moves, or a trimmed position, makes a copy
    for index, length in ((torch.tensor([0, 1, 3]), 7), (prefix, 6)):
        _check(hidden, mask, index, length)
        assert cpp_backend.compact(hidden, mask, index, length)[0].data_ptr() != hidden.data_ptr()
