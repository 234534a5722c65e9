"""The graphed step's bookkeeping after an exit layer in one op: ``cpp_gather_survivors`` == its reference.

After the exit kernel has settled a layer, the graphed step moves every row of its bucket into the
other half of its double buffer in the kernel's survivor order: the rows that leave are marked dead,
the live ones counted, and each per-row tensor (hidden states, mask, extents, the policy's state)
gathered. :func:`earlyexit_kernels.backends.survivor_gather.gather_survivors` is that in PyTorch ops;
the C++ op (and the CUDA kernel, in ``test_cuda_kernels.py``) must write the same bits, and refuse
what it cannot do with a message that says what to fix.
"""

import pytest
import torch
from conftest import _moved, backend_device

import earlyexit_kernels as eek
from earlyexit_kernels.backends import cpp_backend
from earlyexit_kernels.backends.registry import resolve_backend
from earlyexit_kernels.backends.survivor_gather import MAX_TENSORS, gather_survivors


def fast(name):
    """The backend's gather, or the test skipped with why it is not here. Where the backend's kernels run on
    another device than the CPU (compiled Triton on a GPU: :func:`conftest.backend_device`), the gather is
    called there on copies of the tensors (views kept views of their moved buffers, the host count pinned)
    and what it wrote is copied back, whole buffers included, so that the tests read it on the CPU."""
    if not eek.backends()[name]:
        pytest.skip(f"backend {name!r}: {eek.backend_status()[name]}")
    device = backend_device(name)
    gather = resolve_backend(name, device).gather_survivors
    if device.type == "cpu":
        return gather

    def on_device(order, exits, rows, dead, next_rows, count, sources, targets, host_count=None):
        moved = [_moved(t, device) for t in (order, exits, rows, next_rows, count)]
        sources_d = [_moved(t, device) for t in sources]
        targets_d = [_moved(t, device) for t in targets]
        pinned = None if host_count is None else host_count.pin_memory()
        gather(*moved[:3], dead, moved[3], moved[4], sources_d, targets_d, pinned)
        torch.cuda.synchronize(device)
        next_rows.copy_(moved[3].cpu())
        count.copy_(moved[4].cpu())
        for target, written in zip(targets, targets_d):
            if target._base is not None and written._base is not None:
                target._base.copy_(written._base.cpu())  # the whole buffer: writes outside the view show
            else:
                target.copy_(written.cpu())
        if host_count is not None:
            host_count.copy_(pinned)

    return on_device


FAST = ["cpp", "triton"]


def bucket(n=13, length=7, capacity_length=9, hidden=12, seed=0, dtype=torch.bfloat16):
    """A bucket's rows as the graphed step holds them: ``n`` rows, the live ones first, then the dead
    (``rows == n``), the targets views of longer buffers (rows contiguous, row strides of the longer
    length). The exit kernel decides on dead rows too: some of them "exit"."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)
    rows[int(0.7 * n) :] = n  # dead rows
    exits = torch.rand(n, generator=g) < 0.4
    order = torch.cat([torch.nonzero(~exits).flatten(), torch.nonzero(exits).flatten().flip(0)])
    sources = [
        torch.randn(n, length, hidden, generator=g).to(dtype),
        (torch.rand(n, length, generator=g) < 0.8).long(),
        torch.randint(0, 9, (n, 3), generator=g, dtype=torch.int32),
        torch.randn(n, generator=g),
    ]
    buffers = [
        torch.zeros(n + 3, capacity_length, hidden, dtype=dtype),
        torch.zeros(n + 3, capacity_length, dtype=torch.long),
        torch.zeros(n + 3, 3, dtype=torch.int32),
        torch.zeros(n + 3),
    ]
    targets = [buffers[0][:n, :length], buffers[1][:n, :length], buffers[2][:n], buffers[3][:n]]
    return order, exits, rows, sources, targets


def outputs(n):
    return torch.full((n,), -7, dtype=torch.long), torch.full((1,), -7, dtype=torch.long)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [0, 1, 13, 70])
def test_the_op_writes_the_references_bits(backend, n, dtype):
    gather = fast(backend)
    order, exits, rows, sources, targets = bucket(n=n, dtype=dtype, seed=n)
    ref_targets = [t.clone() for t in targets]
    ref_rows, ref_count = outputs(n)
    gather_survivors(order, exits, rows, n, ref_rows, ref_count, sources, ref_targets)

    next_rows, count = outputs(n)
    host_count = torch.full((1,), -7, dtype=torch.long)
    gather(order, exits, rows, n, next_rows, count, sources, targets, host_count)

    assert torch.equal(next_rows, ref_rows) and torch.equal(count, ref_count) and torch.equal(host_count, ref_count)
    assert all(torch.equal(got, want) for got, want in zip(targets, ref_targets))
    # what the step means: the rows that leave are dead, the live stayers first, counted
    assert int(count) == int(((rows != n) & ~exits).sum())
    assert (next_rows[: int(count)] != n).all() and (next_rows[int(count) :] == n).all()


@pytest.mark.parametrize("backend", FAST)
def test_only_the_rows_of_the_bucket_are_written(backend):
    gather = fast(backend)
    order, exits, rows, sources, targets = bucket(n=10)
    whole = targets[0]._base.clone()
    next_rows, count = outputs(10)
    gather(order, exits, rows, 10, next_rows, count, sources, targets)
    after = targets[0]._base
    assert torch.equal(after[10:], whole[10:]) and torch.equal(after[:10, 7:], whole[:10, 7:])


@pytest.mark.parametrize("backend", FAST)
def test_odd_sized_rows_and_more_tensors_than_one_triton_launch_takes(backend):
    # bytes, not words: a row of 5 bf16 (10 bytes) and bool state; 8 tensors (Triton: two launches)
    gather = fast(backend)
    order, exits, rows, sources, targets = bucket(n=9, hidden=5, seed=2)
    g = torch.Generator().manual_seed(7)
    extra = [
        torch.rand(9, 3, generator=g) < 0.5,
        torch.randint(0, 5, (9,), generator=g),
        torch.randn(9, 2, generator=g),
    ]
    extra.append(torch.randn(9, 1, generator=g).half())
    sources, targets = sources + extra, targets + [torch.zeros_like(t) for t in extra]
    ref_targets = [t.clone() for t in targets]
    ref_rows, ref_count = outputs(9)
    gather_survivors(order, exits, rows, 9, ref_rows, ref_count, sources, ref_targets)
    next_rows, count = outputs(9)
    gather(order, exits, rows, 9, next_rows, count, sources, targets)
    assert torch.equal(next_rows, ref_rows) and torch.equal(count, ref_count)
    assert all(torch.equal(got, want) for got, want in zip(targets, ref_targets))


def test_the_cpp_backend_gathers_with_the_op_and_the_torch_backend_with_the_reference():
    fast("cpp")
    cpu = torch.device("cpu")
    assert resolve_backend("cpp", cpu).gather_survivors is cpp_backend.gather_survivors
    assert resolve_backend("torch", cpu).gather_survivors is None  # the graphed step runs the reference


def call(order, exits, rows, sources, targets, *, n=None, next_rows=None, count=None, host_count=None):
    fast("cpp")
    n = order.shape[0] if n is None else n
    default_rows, default_count = outputs(order.shape[0])
    torch.ops.earlyexit.cpp_gather_survivors(
        order,
        exits,
        rows,
        n,
        default_rows if next_rows is None else next_rows,
        default_count if count is None else count,
        sources,
        targets,
        host_count,
    )


def test_an_order_out_of_range_is_refused_before_anything_is_written():
    order, exits, rows, sources, targets = bucket(n=6)
    before = [t.clone() for t in targets]
    order[2] = 6
    with pytest.raises(RuntimeError, match=r"order\[2\] = 6 is not a row of 6"):
        call(order, exits, rows, sources, targets)
    assert all(torch.equal(t, b) for t, b in zip(targets, before))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, t: (s, t[:-1]), "4 sources but 3 targets"),
        (lambda s, t: (s, [t[0][:, :3], *t[1:]]), "must have the same shape"),
        (lambda s, t: (s, [t[0].float(), *t[1:]]), "must have the same dtype"),
        (lambda s, t: ([s[0].transpose(1, 2), *s[1:]], [t[0].transpose(1, 2), *t[1:]]), "each row must be contiguous"),
        (lambda s, t: (s * 4, t * 4), f"at most {MAX_TENSORS} tensors a call"),
    ],
    ids=["count", "shape", "dtype", "layout", "too many"],
)
def test_tensors_the_op_cannot_move_are_refused_with_what_to_fix(change, message):
    order, exits, rows, sources, targets = bucket(n=6)
    sources, targets = change(sources, targets)
    with pytest.raises(RuntimeError, match=message):
        call(order, exits, rows, sources, targets)


def test_bookkeeping_tensors_of_the_wrong_kind_are_refused():
    order, exits, rows, sources, targets = bucket(n=6)
    with pytest.raises(RuntimeError, match=r"exits must be a contiguous \[6\] Bool"):
        call(order, exits.long(), rows, sources, targets)
    with pytest.raises(RuntimeError, match=r"next_rows must be a contiguous \[6\] Long"):
        call(order, exits, rows, sources, targets, next_rows=torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="count must be one int64"):
        call(order, exits, rows, sources, targets, count=torch.zeros(2, dtype=torch.long))


def test_the_reference_refuses_the_same_lists():
    order, exits, rows, sources, targets = bucket(n=6)
    next_rows, count = outputs(6)
    with pytest.raises(ValueError, match="4 sources but 3 targets"):
        gather_survivors(order, exits, rows, 6, next_rows, count, sources, targets[:-1])
    with pytest.raises(ValueError, match=f"at most {MAX_TENSORS} tensors"):
        gather_survivors(order, exits, rows, 6, next_rows, count, sources * 4, targets * 4)


@pytest.mark.parametrize("backend", FAST)
def test_a_state_whose_rows_are_strided_elements_is_gathered_too(backend):
    # a 1-D state's row is one element: any row stride (a column of a wider tensor) is a layout the ops take
    gather = fast(backend)
    order, exits, rows, sources, targets = bucket(n=7, seed=4)
    wide = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    sources, targets = [*sources, wide[:, 1]], [*targets, torch.zeros(7, 2)[:, 0]]
    ref_targets = [t.clone() for t in targets]
    ref_rows, ref_count = outputs(7)
    gather_survivors(order, exits, rows, 7, ref_rows, ref_count, sources, ref_targets)
    next_rows, count = outputs(7)
    gather(order, exits, rows, 7, next_rows, count, sources, targets)
    assert torch.equal(next_rows, ref_rows) and all(torch.equal(g, w) for g, w in zip(targets, ref_targets))
