"""The CUDA C++ kernels (csrc/cuda, bound by csrc/bindings_cuda.cpp) against the reference.

Each test runs twice: on a GPU (``gpu``, the CUDA build of ``earlyexit_kernels._C``) and in
the CPU emulation of the CUDA execution model (``emulated``, python_tests/cuda_emulation:
the same kernel and binding source compiled with g++, every CUDA thread a fiber, blocks in
turn; it needs the CUDA toolkit's headers, not a GPU). The emulation checks the kernels'
logic: indexing, tiling, the warp reductions and the survivor scan, shared memory use,
launch configuration; timing and the memory model it cannot check.

Covered: the head op (``cpp_head``) at H = 768 and 1024 and at sizes that leave partial
tiles or force the scalar path (H not a multiple of the 16-byte word, unaligned weights),
the fused head + rule with write-back and the survivor list (``cpp_head_exit_step``), the
whole per-layer step from the layer's output (``cpp_pooled_head_exit_step``: pooling, LayerNorm,
tanh or GELU head of any width), the
rule alone with and without the survivor list over more rows than one scan chunk, and
empty batches.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from threshold_helpers import decision_quantity

import earlyexit_kernels as eek
from earlyexit_kernels.backends import compaction, cpp_backend, survivor_gather
from earlyexit_kernels.backends.write_back import WriteBack, write_back
from earlyexit_kernels.methods import exit_rules

sys.path.insert(0, str(Path(__file__).parent / "cuda_emulation"))
import emulation  # noqa: E402

L = 6
CPU = torch.device("cpu")


def _gpu_reason():
    if not eek.backends()["cuda"]:
        return f"the CUDA kernels: {eek.backend_status()['cuda']}"
    return None


WHERE = [
    pytest.param("gpu", marks=pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))),
    pytest.param(
        "emulated",
        marks=pytest.mark.skipif(emulation.reason() is not None, reason=f"CUDA emulation: {emulation.reason()}"),
    ),
]


def _moved(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


class Ops:
    """``torch.ops.earlyexit.cpp_*`` on the GPU, or their emulation on the CPU; CPU tensors in
    and out. Tensor arguments keep their strides where they are views of a moved buffer."""

    def __init__(self, where: str):
        self.where = where
        self.device = torch.device("cuda") if where == "gpu" else CPU
        self.ns = torch.ops.earlyexit if where == "gpu" else emulation.load()

    def __call__(self, name, *args, outs=()):
        """Run op ``name``; the tensors in ``outs`` (written in place by the op) are copied back.
        ``per_layer`` stays on the CPU, as the op requires."""
        schema = getattr(torch.ops.earlyexit, name).default._schema
        names = [a.name for a in schema.arguments]
        moved = [a if names[i] == "per_layer" else self._move(a) for i, a in enumerate(args)]
        result = getattr(self.ns, name)(*moved)
        for original in outs:
            index = next(i for i, a in enumerate(args) if a is original)
            original.copy_(moved[index])
        return _moved(result, CPU)

    def _move(self, value):
        if isinstance(value, torch.Tensor) and value.device != self.device:
            if value._base is not None and value._base.is_contiguous() and value._base.storage_offset() == 0:
                base = value._base.to(self.device)
                return base.as_strided(value.shape, value.stride(), value.storage_offset())
            return value.to(self.device)
        if isinstance(value, list):
            return [self._move(v) for v in value]
        return value


@pytest.fixture(params=WHERE)
def ops(request):
    return Ops(request.param)


def _head_weights(hidden, labels, dtype, g, unaligned=False):
    wp = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    bp = torch.randn(hidden, generator=g, dtype=torch.float64) * 0.1
    w = torch.randn(labels, hidden, generator=g, dtype=torch.float64) * 3.0 / math.sqrt(hidden)
    b = torch.randn(labels, generator=g, dtype=torch.float64) * 0.5
    wp, bp, w, b = (t.to(dtype) for t in (wp, bp, w, b))
    if unaligned:  # one element into a buffer: not 16-byte aligned, the kernel's scalar path
        buffer = torch.empty(hidden * hidden + 1, dtype=dtype)
        buffer[1:].copy_(wp.flatten())
        wp = buffer[1:].view(hidden, hidden)
    return wp, bp, w, b


def _cls(batch, hidden, dtype, g):
    return torch.randn(batch, 3, hidden, generator=g, dtype=torch.float64).to(dtype)[:, 0]


HEAD_CASES = [
    # rows, H, labels, dtype, unaligned weights
    (17, 768, 3, torch.float32, False),
    (9, 768, 2, torch.float16, False),
    (3, 1024, 7, torch.bfloat16, False),
    (33, 1024, 2, torch.float32, False),  # several row blocks and tiles
    (5, 100, 3, torch.float16, False),  # partial tile; H not a multiple of 8: scalar path
    (6, 40, 1, torch.float32, True),  # one partial tile, unaligned weights: scalar path
    (1, 64, 2, torch.bfloat16, True),
]


@pytest.mark.parametrize("rows,hidden,labels,dtype,unaligned", HEAD_CASES)
def test_head_matches_reference(ops, rows, hidden, labels, dtype, unaligned):
    """pooled and logits against float64 on the same rounded inputs: no worse than PyTorch's own
    computation in the same dtype (fp32: 1e-5)."""
    g = torch.Generator().manual_seed(rows * hidden + labels)
    weights = _head_weights(hidden, labels, dtype, g, unaligned)
    x = _cls(rows, hidden, dtype, g)
    pooled, logits = ops("cpp_head", x, *weights)
    assert pooled.dtype == dtype and logits.dtype == dtype
    assert pooled.shape == (rows, hidden) and logits.shape == (rows, labels)
    w64 = [t.double() for t in weights]
    pooled64 = torch.tanh(torch.nn.functional.linear(x.double(), w64[0], w64[1]))
    ref_pooled = torch.tanh(torch.nn.functional.linear(x, weights[0], weights[1]))
    ref_logits = torch.nn.functional.linear(ref_pooled, weights[2], weights[3])
    # logits from the kernel's own pooled values: the second product's error alone
    logits64 = torch.nn.functional.linear(pooled.double(), w64[2], w64[3])
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        torch.testing.assert_close(pooled.double(), pooled64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits.double(), logits64, rtol=1e-5, atol=1e-5)
    else:
        torch_err = (ref_pooled.double() - pooled64).abs().max().item()
        assert (pooled.double() - pooled64).abs().max().item() <= 2 * torch_err + eps
        torch_err = (ref_logits.double() - torch.nn.functional.linear(ref_pooled.double(), w64[2], w64[3])).abs()
        bound = 2 * torch_err.max().item() + eps * logits64.abs().max().item()
        assert (logits.double() - logits64).abs().max().item() <= bound


def _target(active, batch, labels, dtype, g):
    rows = torch.randperm(batch, generator=g)[:active]
    return WriteBack(
        rows,
        torch.randint(1, 3, (active,), generator=g),
        None,
        torch.full((batch, labels), 1234.5, dtype=dtype),
        torch.full((batch,), -7, dtype=torch.long),
        torch.full((batch,), -9, dtype=torch.long),
    )


def _clone(target):
    return WriteBack(*(t.clone() if t is not None else None for t in target))


FUSED = [
    ("entropy", eek.Entropy(0.9), 3),
    ("maxprob", eek.MaxProb(0.55, temperature=1.5), 2),
    ("patience", eek.Patience(1), 3),
    ("voting", eek.Voting(2), 7),
    ("scheduled", eek.Scheduled(torch.tensor([2, 3, 2, 6, 4, 2, 5, 3, 6, 2, 4, 5, 3])), 2),
]


@pytest.mark.parametrize("name,policy,labels", FUSED, ids=[f[0] for f in FUSED])
@pytest.mark.parametrize("hidden,dtype", [(768, torch.float32), (1024, torch.float16)], ids=["768-fp32", "1024-fp16"])
def test_head_exit_step_with_write_back_and_survivors(ops, name, policy, labels, hidden, dtype):
    """The fused op (head, rule, write-back, stable survivor list) against the reference on
    layers 2 and L, starting from a mid-run state."""
    rows, batch = 13, 20
    g = torch.Generator().manual_seed(hidden + labels)
    weights = _head_weights(hidden, labels, dtype, g)
    lowered = cpp_backend.lower_policy(policy, L)
    state = exit_rules.init_state(policy, rows, labels, hidden, L, CPU)
    x = _cls(rows, hidden, dtype, g)
    state = exit_rules.head_exit_step(policy, 1, L, x, *weights, state)[4]
    for layer in (2, L):
        x = _cls(rows, hidden, dtype, g)
        target = _target(rows, batch, labels, dtype, g)
        expected = _clone(target)
        ref = exit_rules.head_exit_step(policy, layer, L, x, *weights, dict(state))
        if layer < L and dtype == torch.float32:
            q, threshold = decision_quantity(policy, layer, L, ref[2], None, state)
            if q is not None:  # the kernel's logits differ in the last bits: no value near a threshold
                assert float((q - threshold).abs().min()) > 5e-5
        args = (x, *weights, None, [state[k] for k in lowered.state_in])
        args += cpp_backend._rule_args(lowered, layer, L, target)
        exits, returned, logits, pooled, state0, state1, survivors, count = ops(
            "cpp_head_exit_step", *args, outs=target[3:]
        )
        got_state = cpp_backend._updated(state, lowered, state0, state1)
        if dtype == torch.float32:
            assert torch.equal(exits, ref[0]), (layer, exits, ref[0])
            torch.testing.assert_close(logits, ref[2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(returned, ref[1], rtol=1e-4, atol=1e-5)
            ref_exits, ref_returned = ref[0], ref[1]
        else:  # decisions on the kernel's own logits, which test_head_matches_reference checks
            q, threshold = decision_quantity(policy, layer, L, logits, None, state)
            if layer < L and q is not None and not isinstance(policy, (eek.Patience, eek.Voting)):
                assert float((q - threshold).abs().min()) > 1e-6  # expf and exp differ in the last bits
            ref_exits, ref_returned, _ = exit_rules.exit_step(policy, layer, L, logits, None, dict(state))
            assert torch.equal(exits, ref_exits)
            torch.testing.assert_close(returned, ref_returned, rtol=1e-6, atol=1e-6)
            _, _, ref_state = exit_rules.exit_step(policy, layer, L, logits, None, dict(state))
            ref = (*ref[:4], ref_state)
        for key, value in ref[4].items():
            assert got_state[key].dtype == value.dtype, key
            torch.testing.assert_close(got_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
        write_back(expected, ref_exits, ref_returned, layer)
        for got_buffer, ref_buffer in zip(target[3:], expected[3:]):
            torch.testing.assert_close(got_buffer, ref_buffer, rtol=1e-5, atol=1e-5)
        keep = ~ref_exits
        m = int(keep.sum())
        assert int(count) == m and torch.equal(survivors[:m], compaction.survivor_index(keep, m))
        assert torch.equal(survivors[m:], torch.nonzero(ref_exits).flatten().flip(0))  # a permutation
        assert pooled.shape == (rows, hidden)
        if layer < L:
            assert 0 < m < rows, "the data should make some rows leave and some stay"
        state = got_state


@pytest.mark.parametrize("survivors", [True, False], ids=["survivors", "no_survivors"])
@pytest.mark.parametrize("rows", [1, 17, 1500])  # 1500: two chunks of the one-block scan
def test_rule_on_given_logits(ops, rows, survivors):
    """cpp_exit_step on strided logits with non-finite rows: decisions, state, the survivor list
    (or a count of -1 when it is not asked for)."""
    g = torch.Generator().manual_seed(rows)
    policy = eek.Patience(1)
    lowered = cpp_backend.lower_policy(policy, L)
    state = exit_rules.init_state(policy, rows, 3, 8, L, CPU)
    state["prev_pred"] = torch.randint(-1, 3, (rows,), generator=g)
    z = (torch.randn(rows, 6, generator=g) * 2)[:, ::2]
    if rows >= 3:
        z[1, 0], z[2, 2] = float("nan"), float("inf")
    flags = lowered.flags | (cpp_backend.FLAG_SURVIVORS if survivors else 0)
    args = (z, None, [state[k] for k in lowered.state_in], lowered.kind, flags, 3, L, lowered.int_param)
    exits, returned, state0, state1, order, count = ops("cpp_exit_step", *args, lowered.scalar, lowered.per_layer)
    ref_exits, ref_returned, ref_state = exit_rules.exit_step(policy, 3, L, z, None, dict(state))
    assert torch.equal(exits, ref_exits)
    torch.testing.assert_close(returned, ref_returned, equal_nan=True)
    assert torch.equal(state0, ref_state["prev_pred"]) and torch.equal(state1, ref_state["counter"])
    if survivors:
        m = int((~ref_exits).sum())
        assert int(count) == m and torch.equal(order[:m], compaction.survivor_index(~ref_exits, m))
        assert torch.equal(order[m:], torch.nonzero(ref_exits).flatten().flip(0))  # a permutation
        if rows > 1:
            assert 0 < m < rows
    else:
        assert int(count) == -1 and order.numel() == 0


# kind, pooling, rows, length, H, M, dtype: H 768 with its 16-byte path, 100 and 40 on the scalar
# path with partial tiles, M wider and narrower than H, a row block cut short
POOLED_CASES = [
    ("mlp", "mean", 13, 9, 768, 384, torch.float32),
    ("mlp", "cls", 5, 4, 100, 52, torch.float32),
    ("model", "mean", 9, 7, 40, 40, torch.float32),
    ("mlp", "mean", 11, 6, 64, 96, torch.bfloat16),
    ("model", "cls", 3, 5, 64, 64, torch.float16),
]


@pytest.mark.parametrize("kind,pooling,rows,length,hidden,width,dtype", POOLED_CASES)
def test_pooled_head_exit_step_matches_reference(ops, kind, pooling, rows, length, hidden, width, dtype):
    """The whole per-layer step (pooling and LayerNorm, head, rule, write-back, survivors) on the
    layer's output [n, S, H] with padding, an empty row and NaN in a padded position, against
    :func:`~earlyexit_kernels.backends.pooled_head.pooled_head_exit_step`: the logits within a few
    times PyTorch's own error in the dtype against float64, the decisions on the op's own logits."""
    from pooled_head_cases import head_as, layer_output, make_head

    from earlyexit_kernels.backends import pooled_head

    policy = eek.Entropy(0.7)
    head = make_head(kind, pooling, hidden, width, 3, seed=hidden + width, dtype=dtype)
    x, mask = layer_output(rows, length, hidden, seed=rows, dtype=dtype)
    lowered = cpp_backend.lower_policy(policy, L)
    state = exit_rules.init_state(policy, rows, 3, hidden, L, CPU)
    target = _target(rows, rows + 5, 3, dtype, torch.Generator().manual_seed(rows))
    expected = _clone(target)
    norm = (head.norm_weight, head.norm_bias) if head.norm_weight is not None else (None, None)
    args = (x, mask, int(pooling == "mean"), *norm, head.norm_eps, head.dense_weight.t(), head.dense_bias)
    args += (int(head.activation == "gelu"), head.out_weight, head.out_bias, None, [])
    args += cpp_backend._rule_args(lowered, 2, L, target)
    exits, returned, logits, _, _, _, survivors, count = ops("cpp_pooled_head_exit_step", *args, outs=target[3:])
    with torch.no_grad():
        theirs = pooled_head.pooled_head_exit_step(policy, 2, L, x, mask, head, dict(state))[2]
        exact, _ = pooled_head.pooled_head_logits(x.double(), mask, head_as(head, torch.float64))
    assert torch.isfinite(logits).all(), "padding was read"
    error = (logits.double() - exact).abs().max().item()
    own = (theirs.double() - exact).abs().max().item()
    half_ulp = exact.abs().max().item() * {torch.float32: 2.0**-24, torch.float16: 2.0**-11}.get(dtype, 2.0**-8)
    assert error <= 2 * own + 2 * half_ulp + 1e-6, f"error {error:.2e} against PyTorch's {own:.2e}"
    ref_exits, ref_returned, _ = exit_rules.exit_step(policy, 2, L, logits, None, dict(state))
    assert torch.equal(exits, ref_exits)
    torch.testing.assert_close(returned, ref_returned, rtol=1e-6, atol=1e-6)
    write_back(expected, ref_exits, ref_returned, 2)
    for got_buffer, ref_buffer in zip(target[3:], expected[3:]):
        torch.testing.assert_close(got_buffer, ref_buffer, rtol=1e-5, atol=1e-5)
    m = int((~ref_exits).sum())
    assert int(count) == m and torch.equal(survivors[:m], compaction.survivor_index(~ref_exits, m))


def test_empty_batches(ops):
    weights = _head_weights(64, 3, torch.float32, torch.Generator().manual_seed(0))
    pooled, logits = ops("cpp_head", torch.empty(0, 64), *weights)
    assert pooled.shape == (0, 64) and logits.shape == (0, 3)
    lowered = cpp_backend.lower_policy(eek.Entropy(0.5), L)
    for flags, expected in ((lowered.flags | cpp_backend.FLAG_SURVIVORS, 0), (lowered.flags, -1)):
        out = ops("cpp_exit_step", torch.empty(0, 3), None, [], lowered.kind, flags, 2, L, 0, 0.0, lowered.per_layer)
        assert out[0].shape == (0,) and int(out[5]) == expected
        out = ops(
            "cpp_head_exit_step",
            torch.empty(0, 64),
            *weights,
            None,
            [],
            lowered.kind,
            flags,
            2,
            L,
            0,
            0.0,
            lowered.per_layer,
        )
        assert out[2].shape == (0, 3) and int(out[7]) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compact(ops, dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 7, 72, generator=g).to(dtype)
    mask = (torch.arange(7)[None, :] < torch.randint(1, 8, (9,), generator=g)[:, None]).long()
    index = torch.tensor([8, 0, 3, 4])
    for h, m in ((hidden, mask), (hidden[:, :, 1:], None), (hidden[::2], mask[::2])):
        ref_h, ref_m = compaction.compact(h, m, index[index < h.shape[0]], 5)
        got_h, got_m = ops("cpp_compact", h, m, index[index < h.shape[0]], 5)
        assert torch.equal(got_h, ref_h)
        if m is not None:
            assert torch.equal(got_m, ref_m)


@pytest.mark.parametrize("hidden, dtype", [(8, torch.bfloat16), (6, torch.float32), (5, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("n", [0, 3, 40])
def test_gather_survivors(ops, n, hidden, dtype):
    # 16-byte, 4-byte and 1-byte copies (a row of 8 bf16, of 6 floats, of 5 bf16), rows of a
    # bucket in the targets' longer buffers, the count also into host memory where given
    from test_survivor_gather import bucket, outputs

    order, exits, rows, sources, targets = bucket(n=n, hidden=hidden, dtype=dtype, seed=n + hidden)
    ref_targets = [t.clone() for t in targets]
    ref_rows, ref_count = outputs(n)
    survivor_gather.gather_survivors(order, exits, rows, n, ref_rows, ref_count, sources, ref_targets)

    def there(t):
        return t.to(ops.device)

    bases = [there(t._base) if t._base is not None else there(t) for t in targets]
    moved = [b.as_strided(t.shape, t.stride(), t.storage_offset()) for b, t in zip(bases, targets)]
    next_rows, count = (there(t) for t in outputs(n))
    host_count = torch.full((1,), -7, dtype=torch.long, pin_memory=ops.where == "gpu")
    ops.ns.cpp_gather_survivors(
        there(order), there(exits), there(rows), n, next_rows, count, [there(s) for s in sources], moved, host_count
    )
    if ops.where == "gpu":
        torch.cuda.synchronize()
    assert torch.equal(next_rows.cpu(), ref_rows) and torch.equal(count.cpu(), ref_count)
    assert torch.equal(host_count, ref_count)
    assert all(torch.equal(got.cpu(), want) for got, want in zip(moved, ref_targets))


# ----------------------------------------------------------------------------- shared memory per architecture

A100_OPTIN, H100_OPTIN = 163 * 1024, 227 * 1024  # a block's opt-in dynamic shared memory


def test_cuda_head_shared_memory_per_architecture():
    """The CUDA head stages 8 [CLS] rows: fp32 heads past H = 5152 do not fit an A100's blocks
    (H = 7200 on an H100); the backend runs such heads in PyTorch instead of failing to launch."""
    assert cpp_backend.cuda_head_fits(5152, torch.float32, A100_OPTIN)
    assert not cpp_backend.cuda_head_fits(5160, torch.float32, A100_OPTIN)
    assert not cpp_backend.cuda_head_fits(6144, torch.float32, A100_OPTIN)
    assert cpp_backend.cuda_head_fits(6144, torch.float32, H100_OPTIN)
    assert cpp_backend.cuda_head_fits(6144, torch.bfloat16, A100_OPTIN)
    assert not cpp_backend.cuda_head_fits(7208, torch.float32, H100_OPTIN)


@pytest.mark.skipif(emulation.reason() is not None, reason=f"CUDA emulation: {emulation.reason()}")
@pytest.mark.parametrize("dtype, hidden", [(torch.float32, 1536), (torch.float16, 3072)], ids=["fp32", "fp16"])
def test_emulated_head_launch_obeys_the_architecture_s_shared_memory(monkeypatch, dtype, hidden):
    """The emulation takes the opt-in limit as a parameter (an H100's by default): at a limit
    that holds exactly ``hidden`` the head launches, 8 features more and it is refused, as
    ``cuda_head_fits`` predicts (past 48 KiB, where the launcher must raise the kernel's limit)."""
    ops = emulation.load()
    limit = cpp_backend.cuda_head_shared_bytes(hidden, dtype)
    assert limit > 48 * 1024
    monkeypatch.setenv("EEK_EMU_OPTIN_SHARED_BYTES", str(limit))
    g = torch.Generator().manual_seed(3)
    for width, fits in ((hidden, True), (hidden + 8, False)):
        assert cpp_backend.cuda_head_fits(width, dtype, limit) is fits
        weights = _head_weights(width, 2, dtype, g)
        x = _cls(1, width, dtype, g)
        if fits:
            pooled, logits = ops.cpp_head(x, *weights)
            assert pooled.shape == (1, width) and logits.shape == (1, 2)
        else:
            with pytest.raises(RuntimeError, match="CUDA launch failed"):
                ops.cpp_head(x, *weights)


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_cuda_backend_runs_a_head_too_wide_for_shared_memory_in_torch():
    """On a GPU: the first fp32 width the CUDA head cannot stage on this device still runs
    (the head in PyTorch, the rule in CUDA) and decides as the reference."""
    device = torch.device("cuda")
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    hidden = next(h for h in range(4096, 16384, 8) if not cpp_backend.cuda_head_fits(h, torch.float32, optin))
    g = torch.Generator().manual_seed(4)
    wp, bp, wi, bi = (t.to(device) for t in _head_weights(hidden, 3, torch.float32, g))
    x = _cls(5, hidden, torch.float32, g).to(device)
    policy = eek.Entropy(0.5)
    state = exit_rules.init_state(policy, 5, 3, hidden, L, device)
    got = cpp_backend.head_exit_step(policy, 2, L, x, wp, bp, wi, bi, dict(state))
    ref = exit_rules.head_exit_step(policy, 2, L, x, wp, bp, wi, bi, dict(state))
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], ref[0])
