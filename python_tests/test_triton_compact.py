"""The Triton compaction gather against compaction.compact: bit-exact, every element written."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import compact_past_two_to_the_31, on_kernel_device  # noqa: E402

from earlyexit_kernels.backends import compaction  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import compact as tc  # noqa: E402
from earlyexit_kernels.backends.triton_kernels._common import poisoned_outputs  # noqa: E402

CASES = [
    # n, S, H, dtype, mask kind, kept rows, seq_len, layout
    (1, 7, 64, torch.float32, None, [0], 7, "contiguous"),
    (3, 12, 384, torch.float16, "long", [0, 2], 9, "contiguous"),
    (17, 16, 768, torch.bfloat16, "bool", [1, 4, 5, 9, 16], 11, "strided"),
    (64, 9, 1024, torch.float32, "float", list(range(0, 64, 3)), 20, "transposed"),
    (257, 5, 64, torch.float16, "long", list(range(1, 257, 2)), 3, "contiguous"),
    (5, 10, 100, torch.float32, "bool", [4, 3, 0], 10, "strided"),  # H not a power of two, unsorted index
]


def _inputs(n, s, h, dtype, mask_kind, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        hidden = torch.randn(n, s, h, generator=g).to(dtype)
    elif layout == "strided":  # a slice of a longer, wider buffer
        hidden = torch.randn(n, s + 3, h + 8, generator=g).to(dtype)[:, 1 : s + 1, 4 : h + 4]
    else:  # feature dimension not innermost
        hidden = torch.randn(n, h, s, generator=g).to(dtype).transpose(1, 2)
    mask = None
    if mask_kind is not None:
        lengths = torch.randint(1, s + 1, (n,), generator=g)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        mask = {"long": mask, "bool": mask.bool(), "float": mask.float()}[mask_kind]
        if layout == "strided":
            mask = torch.cat([mask, mask], dim=1)[:, ::2]  # non-contiguous mask
    return hidden, mask


@pytest.mark.parametrize("n,s,h,dtype,mask_kind,kept,seq_len,layout", CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_compact_matches_reference(n, s, h, dtype, mask_kind, kept, seq_len, layout, index_dtype):
    hidden, mask = _inputs(n, s, h, dtype, mask_kind, layout)
    index = torch.tensor(kept, dtype=index_dtype)
    ref_h, ref_m = compaction.compact(hidden, mask, index.long(), seq_len)
    with poisoned_outputs("a"):
        got_h, got_m = on_kernel_device(tc.compact)(hidden, mask, index, seq_len)
    with poisoned_outputs("b"):
        got_h2, got_m2 = on_kernel_device(tc.compact)(hidden, mask, index, seq_len)
    for got, got2 in ((got_h, got_h2), (got_m, got_m2)):
        if got is not None:
            assert torch.equal(got, got2)
    assert got_h.is_contiguous() and got_h.dtype == ref_h.dtype and got_h.shape == ref_h.shape
    assert torch.equal(got_h, ref_h)
    if mask is None:
        assert got_m is None
    else:
        assert got_m.dtype == ref_m.dtype and got_m.shape == ref_m.shape and got_m.is_contiguous()
        assert torch.equal(got_m, ref_m)


@pytest.mark.parametrize("h", [100, 768])
def test_compact_gpu_block_sizes_under_interpreter(monkeypatch, h):
    monkeypatch.setattr(tc, "FORCE_GPU_BLOCKS", True)
    hidden, mask = _inputs(6, 19, h, torch.float16, "bool", "strided")
    index = torch.tensor([5, 1, 2])
    with poisoned_outputs("a"):
        got_h, got_m = on_kernel_device(tc.compact)(hidden, mask, index, 17)
    ref_h, ref_m = compaction.compact(hidden, mask, index, 17)
    assert torch.equal(got_h, ref_h) and torch.equal(got_m, ref_m)


def test_compact_empty_index():
    hidden, mask = _inputs(4, 6, 64, torch.float32, "long", "contiguous")
    index = torch.zeros(0, dtype=torch.long)
    got_h, got_m = on_kernel_device(tc.compact)(hidden, mask, index, 5)
    ref_h, ref_m = compaction.compact(hidden, mask, index, 5)
    assert got_h.shape == ref_h.shape and got_m.shape == ref_m.shape


def test_compact_rejects_bad_shapes():
    with pytest.raises(ValueError):
        tc.compact(torch.zeros(2, 3), None, torch.tensor([0]), 3)
    with pytest.raises(TypeError):
        tc.compact(torch.zeros(2, 3, 4), None, torch.tensor([0.0]), 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA test below checks this")
def test_compact_opcheck_cpu():
    """Schema, autograd registration, fake kernel, AOTAutograd with static and dynamic sizes (the
    op as one node under the interpreter, see test_triton_exit_step.test_opcheck_cpu)."""
    hidden, mask = _inputs(5, 6, 32, torch.float32, "bool", "contiguous")
    utils = (
        "test_schema",
        "test_autograd_registration",
        "test_faketensor",
        "test_aot_dispatch_static",
        "test_aot_dispatch_dynamic",
    )
    torch.library.opcheck(
        torch.ops.earlyexit.compact.default, (hidden, mask, torch.tensor([0, 3]), 4), test_utils=utils
    )
    torch.library.opcheck(torch.ops.earlyexit.compact.default, (hidden, None, torch.tensor([4]), 9), test_utils=utils)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter cannot trace launches)")
def test_compact_opcheck_and_compile_cuda():
    hidden, mask = (t.cuda() for t in _inputs(5, 6, 32, torch.float16, "long", "contiguous"))
    index = torch.tensor([0, 3, 4], device="cuda")
    torch.library.opcheck(torch.ops.earlyexit.compact.default, (hidden, mask, index, 4))
    compiled = torch.compile(lambda h, m, i: tc.compact(h, m, i, 4), fullgraph=True)
    got = compiled(hidden, mask, index)
    ref = compaction.compact(hidden, mask, index, 4)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_compact_non_contiguous_index(index_dtype):
    """An index that is a strided view (every other element, or a column) gathers the rows it names."""
    hidden, mask = _inputs(9, 7, 64, torch.float32, "bool", "contiguous")
    wide = torch.tensor([8, -1, 2, -1, 5, -1, 0, -1], dtype=index_dtype)
    for index in (wide[::2], torch.tensor([[7, 1], [3, 1], [4, 1]], dtype=index_dtype)[:, 0]):
        assert not index.is_contiguous()
        ref_h, ref_m = compaction.compact(hidden, mask, index.long(), 6)
        with poisoned_outputs("a"):
            got_h, got_m = on_kernel_device(tc.compact)(hidden, mask, index, 6)
        assert torch.equal(got_h, ref_h) and torch.equal(got_m, ref_m)


def test_compact_rejects_index_on_another_device_or_not_1d():
    hidden = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="1-D"):
        tc.compact(hidden, None, torch.tensor([[0, 1]]), 4)
    with pytest.raises(ValueError, match="device"):
        tc.compact(hidden, None, torch.tensor([0, 1], device="meta"), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a [n, S, H] tensor past 2^31 elements)")
def test_compact_past_two_to_the_31_elements_cuda():
    """B * S * H > 2^31 (int32 offsets would wrap): the last rows and positions land where they belong."""
    compact_past_two_to_the_31(tc.compact)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (tensors on cuda:1, cuda:0 current)")
def test_compact_on_second_gpu():
    torch.cuda.set_device(0)
    hidden, mask = _inputs(17, 16, 768, torch.bfloat16, "bool", "strided")
    index = torch.tensor([1, 4, 5, 9, 16])
    ref_h, ref_m = compaction.compact(hidden, mask, index, 11)
    got_h, got_m = tc.compact(hidden.to("cuda:1"), mask.to("cuda:1"), index.to("cuda:1"), 11)
    assert got_h.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    assert torch.equal(got_h.cpu(), ref_h) and torch.equal(got_m.cpu(), ref_m)
