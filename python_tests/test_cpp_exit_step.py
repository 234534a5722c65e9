"""The C++ CPU exit step (``backend="cpp"``) against the PyTorch reference (exit_rules)."""

import math

import pytest
import torch
from conftest import on_device
from threshold_helpers import decision_quantity

import earlyexit_kernels as eek
from earlyexit_kernels.backends import compaction, cpp_backend
from earlyexit_kernels.backends.write_back import WriteBack, write_back
from earlyexit_kernels.methods import exit_rules

pytestmark = pytest.mark.exact  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)

L = 6
CPU = torch.device("cpu")
CLEAR = 1e-6  # no decision quantity this close to its threshold: 8 float32 ulps of 1, beyond expf's error
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require_cpp():
    if not eek.backends()["cpp"]:
        pytest.fail(f"the C++ backend must be built for these tests: {eek.backend_status()['cpp']}")


_require_cpp()


def _per_layer(low, high):
    return tuple(low + (high - low) * i / (L - 1) for i in range(L))


# (name, factory(batch), allowed label counts)
POLICIES = [
    ("entropy", lambda b: eek.Entropy(0.6), (2, 3, 7)),
    ("entropy_norm_per_layer", lambda b: eek.Entropy(_per_layer(0.3, 0.8), normalized=True), (2, 3, 7)),
    ("maxprob", lambda b: eek.MaxProb(0.7), (2, 3, 7)),
    ("maxprob_temperature", lambda b: eek.MaxProb(_per_layer(0.5, 0.9), temperature=_per_layer(0.5, 2.0)), (2, 3, 7)),
    ("patience", lambda b: eek.Patience(2), (2, 3, 7)),
    ("patience_regression", lambda b: eek.Patience(2, regression_threshold=0.8), (1,)),
    ("qexit", lambda b: eek.QExit(0.4), (1, 2, 3, 7)),
    ("qexit_stochastic", lambda b: eek.QExit(0.4, stochastic=True, seed=5), (1, 2, 3, 7)),
    ("voting", lambda b: eek.Voting(2), (2, 3, 7)),
    ("dact", lambda b: eek.DACT(), (2, 3, 7)),
    ("skipgates", lambda b: eek.SkipGates(entropy_threshold=_per_layer(0.4, 0.9)), (2, 3, 7)),
    ("scheduled", lambda b: eek.Scheduled(torch.arange(b) % L + 1), (1, 2, 3, 7)),
]
BATCHES = (1, 3, 17, 64, 257)


def _logits(batch, num_labels, layer, generator, dtype, contiguous=True):
    """Random logits with a few non-finite rows; a prefix of rows repeats the previous
    layer's argmax often enough for Patience and Voting to exit."""
    scale = 3.0 if num_labels > 1 else 0.6
    z = torch.randn(batch, num_labels, generator=generator, dtype=torch.float64) * scale
    if num_labels > 1:
        z[: batch // 2, 0] += 4.0  # agreeing rows
    if batch >= 3 and layer in (2, 4):
        z[1, 0] = math.nan
        z[2, -1] = math.inf if layer == 2 else -math.inf
    z = z.to(dtype)
    if not contiguous:  # same values through a transposed (strided) view
        z = z.t().contiguous().t()
        assert not z.is_contiguous() or num_labels == 1 or batch == 1
    return z


def _halting(batch, layer, generator):
    h = torch.randn(batch, generator=generator) * 2.0 - 0.5
    if batch >= 4 and layer == 3:
        h[3] = math.nan
    return h


def _assert_state_equal(ref, got):
    assert ref.keys() == got.keys()
    for key in ref:
        assert ref[key].dtype == got[key].dtype, key
        assert ref[key].shape == got[key].shape, key
        if ref[key].dtype.is_floating_point:
            # a few ulps: the reference uses vectorised exp/log
            torch.testing.assert_close(got[key], ref[key], rtol=2e-6, atol=1e-7, equal_nan=True, msg=key)
        else:
            assert torch.equal(got[key], ref[key]), key


def _assert_clear(policy, layer, z, h, state):
    """Exact decisions are only defined where no value lies within rounding of its threshold
    (CUDA's expf and the reference's vectorised exp differ in the last bits). The argmax of given
    logits (Patience, Voting) involves no rounding: ties go to the first label everywhere."""
    if layer == L or isinstance(policy, eek.Voting) or (isinstance(policy, eek.Patience) and not policy.is_regression):
        return
    q, threshold = decision_quantity(policy, layer, L, z, h, state)
    if q is not None and torch.isfinite(q).any():
        margin = float((q[torch.isfinite(q)] - threshold).abs().min())
        assert margin > CLEAR, f"{policy} layer {layer}: a value {margin:.3g} from its threshold"


def _run_both(policy, batch, num_labels, dtype, contiguous=True, seed=0, device=CPU):
    """The kernels (on ``device``: the CPU or, with the CUDA build, the GPU) against the reference, layer by layer."""
    exit_step = on_device(cpp_backend.exit_step, device)
    generator = torch.Generator().manual_seed(seed)
    ref_state = exit_rules.init_state(policy, batch, num_labels, 8, L, CPU)
    got_state = dict(ref_state)
    decided = 0
    for layer in range(1, L + 1):
        z = _logits(batch, num_labels, layer, generator, dtype, contiguous)
        h = _halting(batch, layer, generator) if policy.needs_halting_head else None
        _assert_clear(policy, layer, z, h, ref_state)
        ref_exits, ref_ret, ref_state = exit_rules.exit_step(policy, layer, L, z, h, ref_state)
        exits, ret, got_state = exit_step(policy, layer, L, z, h, got_state)
        assert exits.dtype == torch.bool and ret.dtype == torch.float32
        assert torch.equal(exits, ref_exits), f"layer {layer}: {exits.tolist()} != {ref_exits.tolist()}"
        torch.testing.assert_close(ret, ref_ret, rtol=2e-6, atol=1e-6, equal_nan=True)
        _assert_state_equal(ref_state, got_state)
        decided += int(ref_exits.sum()) if layer < L else 0
    return decided


@pytest.mark.parametrize("name,factory,labels", POLICIES, ids=[p[0] for p in POLICIES])
def test_exit_step_matches_reference_fp32(name, factory, labels):
    exits_before_last = 0
    for batch in BATCHES:
        for num_labels in labels:
            exits_before_last += _run_both(factory(batch), batch, num_labels, torch.float32, seed=batch + num_labels)
    assert exits_before_last > 0, "the inputs never exercise an early exit"


@pytest.mark.skipif(not eek.backends()["cuda"], reason=f"CUDA kernels: {eek.backend_status()['cuda']}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_exit_step_matches_reference(dtype):
    cuda = torch.device("cuda")
    for _, factory, labels in POLICIES:
        for batch in (1, 17, 257):
            _run_both(factory(batch), batch, labels[-1], dtype, seed=batch, device=cuda)
        _run_both(factory(17), 17, labels[-1], dtype, contiguous=False, seed=5, device=cuda)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,factory,labels", POLICIES, ids=[p[0] for p in POLICIES])
def test_exit_step_low_precision_logits_exact(name, factory, labels, dtype):
    # fp16/bf16 logits convert exactly to float32, so decisions and state must match exactly
    for batch in (3, 64):
        _run_both(factory(batch), batch, labels[-1], dtype, seed=7)


@pytest.mark.parametrize("name,factory,labels", POLICIES, ids=[p[0] for p in POLICIES])
def test_exit_step_non_contiguous_logits(name, factory, labels):
    _run_both(factory(17), 17, labels[-1], torch.float32, contiguous=False, seed=3)


# ---------------------------------------------------------------------------------------
# Fused head + exit step.


def _head_weights(hidden, num_labels, dtype, generator):
    wp = torch.randn(hidden, hidden, generator=generator, dtype=torch.float64) / math.sqrt(hidden)
    bp = torch.randn(hidden, generator=generator, dtype=torch.float64) * 0.1
    w = torch.randn(num_labels, hidden, generator=generator, dtype=torch.float64) * 3.0 / math.sqrt(hidden)
    b = torch.randn(num_labels, generator=generator, dtype=torch.float64) * 0.5
    return [t.to(dtype) for t in (wp, bp, w, b)]


def _cls_view(batch, hidden, dtype, generator):
    """[CLS] rows as a strided view of a [B, S, H] tensor, like the engine passes them."""
    states = torch.randn(batch, 3, hidden, generator=generator, dtype=torch.float64).to(dtype)
    return states[:, 0]


HEAD_SHAPES = [(1, 64), (3, 384), (17, 768), (64, 1024), (257, 64), (257, 384)]
HEAD_POLICIES = [POLICIES[0], POLICIES[2], POLICIES[4], POLICIES[5], POLICIES[6], POLICIES[8], POLICIES[9]]


def _halting_fn(pooled, previous):
    # a halting head that reads both pooled vectors, like PALBERT's Lambda layer
    return (pooled.float().mean(-1) - 0.5 * previous.float().mean(-1)) * 40.0 if previous is not None else None


def _dact_halting(pooled, previous=None):
    return pooled.float().mean(-1) * 40.0 + 1.0


@pytest.mark.parametrize("name,factory,labels", HEAD_POLICIES, ids=[p[0] for p in HEAD_POLICIES])
def test_head_exit_step_matches_reference_fp32(name, factory, labels):
    generator = torch.Generator().manual_seed(11)
    for batch, hidden in HEAD_SHAPES:
        num_labels = labels[-1] if batch % 2 else labels[0]
        policy = factory(batch)
        weights = _head_weights(hidden, num_labels, torch.float32, generator)
        halting_fn = None
        if isinstance(policy, eek.QExit):
            halting_fn = _halting_fn
        elif isinstance(policy, eek.DACT):
            halting_fn = _dact_halting
        ref_state = exit_rules.init_state(policy, batch, num_labels, hidden, L, CPU)
        got_state = dict(ref_state)
        for layer in range(1, L + 1):
            x = _cls_view(batch, hidden, torch.float32, generator)
            assert not x.is_contiguous() or batch == 1
            ref = exit_rules.head_exit_step(policy, layer, L, x, *weights, ref_state, halting_fn)
            got = cpp_backend.head_exit_step(policy, layer, L, x, *weights, got_state, halting_fn)
            ref_exits, ref_ret, ref_logits, ref_halting, ref_state = ref
            exits, ret, logits, halting, got_state = got
            assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            if ref_halting is None:
                assert halting is None
            else:
                torch.testing.assert_close(halting, ref_halting, rtol=1e-4, atol=1e-4)
            assert torch.equal(exits, ref_exits), f"{batch}x{hidden} layer {layer}"
            torch.testing.assert_close(ret, ref_ret, rtol=1e-4, atol=1e-5, equal_nan=True)
            assert ref_state.keys() == got_state.keys()
            for key in ref_state:
                assert got_state[key].dtype == ref_state[key].dtype, key
                if ref_state[key].dtype.is_floating_point:
                    torch.testing.assert_close(got_state[key], ref_state[key], rtol=1e-4, atol=1e-5, equal_nan=True)
                else:
                    assert torch.equal(got_state[key], ref_state[key]), key


# ---------------------------------------------------------------------------------------
# Low precision: errors relative to PyTorch's own, decisions only flip near the threshold.


def _quantities(policy, logits):
    """The quantity each sequence's decision compares with the threshold, from float64."""
    z = logits.double()
    if isinstance(policy, eek.Entropy):
        log_p = z.log_softmax(-1)
        return -(log_p.exp() * log_p).sum(-1)
    if isinstance(policy, eek.MaxProb):
        return z.softmax(-1).amax(-1)
    raise TypeError(policy)


def decisions_agree_within_rounding(ref_exits, got_exits, quantity64, threshold, band):
    """True when every differing decision belongs to a row whose float64 quantity lies
    within ``band`` of the threshold (the dtype's rounding can move it across)."""
    differs = ref_exits != got_exits
    near = (quantity64 - threshold).abs() <= band
    return bool((~differs | near).all())


def test_decision_rule_rejects_far_flips_and_accepts_near_ones():
    quantity = torch.tensor([0.10, 0.499, 0.90], dtype=torch.float64)
    ref = quantity < 0.5
    assert decisions_agree_within_rounding(ref, ref.clone(), quantity, 0.5, 0.01)
    near_flip = ref.clone()
    near_flip[1] = ~near_flip[1]
    assert decisions_agree_within_rounding(ref, near_flip, quantity, 0.5, 0.01)
    far_flip = ref.clone()
    far_flip[0] = ~far_flip[0]
    assert not decisions_agree_within_rounding(ref, far_flip, quantity, 0.5, 0.01)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_head_low_precision_error_and_decisions(dtype):
    generator = torch.Generator().manual_seed(21)
    flips_checked = 0
    for batch, hidden in [(17, 64), (64, 384), (257, 768), (3, 1024)]:
        for policy in (eek.Entropy(0.55), eek.MaxProb(0.8)):
            num_labels = 3
            weights = _head_weights(hidden, num_labels, dtype, generator)
            x = _cls_view(batch, hidden, dtype, generator)
            # float64 reference from the same (rounded) inputs
            pooled64 = torch.tanh(torch.nn.functional.linear(x.double(), weights[0].double(), weights[1].double()))
            logits64 = torch.nn.functional.linear(pooled64, weights[2].double(), weights[3].double())
            state = exit_rules.init_state(policy, batch, num_labels, hidden, L, CPU)
            ref_exits, _, ref_logits, _, _ = exit_rules.head_exit_step(policy, 2, L, x, *weights, state)
            exits, ret, logits, _, _ = cpp_backend.head_exit_step(policy, 2, L, x, *weights, state)
            cpp_pooled, _ = torch.ops.earlyexit.cpp_head(x, *weights)
            ref_pooled = torch.tanh(torch.nn.functional.linear(x, weights[0], weights[1]))
            assert logits.dtype == dtype and cpp_pooled.dtype == dtype
            eps = torch.finfo(dtype).eps
            torch_err = (ref_logits.double() - logits64).abs().max().item()
            cpp_err = (logits.double() - logits64).abs().max().item()
            assert cpp_err <= 2.0 * torch_err + eps * logits64.abs().max().item(), (cpp_err, torch_err)
            torch_perr = (ref_pooled.double() - pooled64).abs().max().item()
            cpp_perr = (cpp_pooled.double() - pooled64).abs().max().item()
            assert cpp_perr <= 2.0 * torch_perr + eps, (cpp_perr, torch_perr)
            # decisions: only where the float64 quantity is within the dtype's effect of the threshold
            q64 = _quantities(policy, logits64)
            q_torch = _quantities(policy, ref_logits)
            band = 4.0 * (q_torch - q64).abs().max().item() + 1e-6
            assert decisions_agree_within_rounding(ref_exits, exits, q64, policy.threshold, band)
            assert torch.equal(ret, logits.float())
            flips_checked += int((ref_exits != exits).sum())
    assert flips_checked <= 20


# ---------------------------------------------------------------------------------------
# Poisoned outputs, write-back and survivor list.


@pytest.fixture
def poisoned_empty():
    """torch.empty (and at::empty in the extension) fills new memory with NaN / max int."""
    import torch.utils.deterministic as det

    old_mode, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all()
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode)
        det.fill_uninitialized_memory = old_fill


@pytest.mark.parametrize("name,factory,labels", POLICIES, ids=[p[0] for p in POLICIES])
def test_outputs_fully_written_with_poisoned_allocations(name, factory, labels, poisoned_empty):
    _run_both(factory(64), 64, labels[0], torch.float32, seed=13)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_back_and_survivors(dtype):
    generator = torch.Generator().manual_seed(5)
    policy = eek.Entropy(0.7)
    batch, active, num_labels = 40, 23, 3
    lowered = cpp_backend.lower_policy(policy, L)
    for layer in (2, L):
        rows = torch.randperm(batch, generator=generator)[:active]
        runs = torch.randint(1, layer + 1, (active,), generator=generator)
        z = _logits(active, num_labels, layer, generator, dtype)
        out_logits = torch.full((batch, num_labels), math.nan, dtype=dtype)
        out_exit = torch.full((batch,), -7, dtype=torch.long)
        out_runs = torch.full((batch,), -9, dtype=torch.long)
        ref = WriteBack(rows, runs, None, out_logits.clone(), out_exit.clone(), out_runs.clone())
        exits, ret, _, _, survivors, count = torch.ops.earlyexit.cpp_exit_step(
            z,
            None,
            [],
            lowered.kind,
            lowered.flags | cpp_backend.FLAG_SURVIVORS,
            layer,
            L,
            lowered.int_param,
            lowered.scalar,
            lowered.per_layer,
            rows,
            runs,
            out_logits,
            out_exit,
            out_runs,
        )
        ref_exits, ref_ret, _ = exit_rules.exit_step(policy, layer, L, z, None, {})
        assert torch.equal(exits, ref_exits)
        write_back(ref, ref_exits, ref_ret, layer)
        torch.testing.assert_close(out_logits, ref.logits, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(out_exit, ref.exit_layer)
        assert torch.equal(out_runs, ref.layers_run)
        keep = ~ref_exits
        n_keep = int(keep.sum())
        assert int(count) == n_keep
        assert torch.equal(survivors[:n_keep], compaction.survivor_index(keep, n_keep))
        assert torch.equal(survivors[n_keep:], torch.nonzero(ref_exits).flatten().flip(0))  # a permutation
        assert 0 < int(ref_exits.sum()) and (layer == L or n_keep > 0)


def test_count_is_minus_one_without_survivor_flag():
    lowered = cpp_backend.lower_policy(eek.MaxProb(0.5), L)
    out = torch.ops.earlyexit.cpp_exit_step(
        torch.randn(5, 3), None, [], lowered.kind, lowered.flags, 1, L, 0, 0.0, lowered.per_layer
    )
    assert out[4].numel() == 0 and int(out[5]) == -1


def test_bad_arguments_raise():
    policy = eek.Patience(2)
    state = exit_rules.init_state(policy, 4, 3, 8, L, CPU)
    state["counter"] = state["counter"].long()
    with pytest.raises(RuntimeError, match="counter"):
        cpp_backend.exit_step(policy, 1, L, torch.randn(4, 3), None, state)
    with pytest.raises(RuntimeError, match="halting"):
        cpp_backend.exit_step(
            eek.DACT(), 1, L, torch.randn(4, 3), None, exit_rules.init_state(eek.DACT(), 4, 3, 8, L, CPU)
        )
    with pytest.raises(RuntimeError, match="dtype"):
        x = torch.randn(2, 8)
        cpp_backend.head_exit_step(
            eek.Entropy(0.5), 1, L, x, torch.randn(8, 8).double(), torch.randn(8), torch.randn(3, 8), torch.randn(3), {}
        )


def test_empty_batch():
    policy = eek.Voting(2)
    state = exit_rules.init_state(policy, 0, 3, 8, L, CPU)
    exits, ret, new_state = cpp_backend.exit_step(policy, 1, L, torch.empty(0, 3), None, state)
    assert exits.shape == (0,) and ret.shape == (0, 3) and new_state["votes"].shape == (0, 3)


# ---------------------------------------------------------------------------------------
# torch.library registration: the ops run for real on the CPU, so every opcheck test runs.


def _op_args(policy, write_back: bool):
    """cpp_exit_step's arguments at layer 2 of L for 5 rows of a batch of 8 (write-back optional)."""
    lowered = cpp_backend.lower_policy(policy, L)
    state = exit_rules.init_state(policy, 5, 3, 8, L, CPU)
    halting = torch.randn(5) if policy.needs_halting_head else None
    flags = lowered.flags | cpp_backend.FLAG_SURVIVORS
    args = (torch.randn(5, 3), halting, [state[k] for k in lowered.state_in], lowered.kind, flags, 2, L)
    args += (lowered.int_param, lowered.scalar, lowered.per_layer)
    if write_back:
        outs = (torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
        args += (torch.tensor([6, 0, 3, 7, 2]), torch.full((5,), 2), *outs)
    return args


@pytest.mark.parametrize("write_back", [False, True], ids=["step", "write_back"])
@pytest.mark.parametrize("policy", [eek.Entropy(0.6), eek.Patience(1), eek.QExit(0.4), eek.Voting(2)], ids=repr)
def test_opcheck_exit_step(policy, write_back):
    torch.library.opcheck(torch.ops.earlyexit.cpp_exit_step.default, _op_args(policy, write_back))


def test_opcheck_head_and_compact():
    g = torch.Generator().manual_seed(3)
    x, wp, bp = torch.randn(5, 16, generator=g), torch.randn(16, 16, generator=g), torch.randn(16, generator=g)
    w, b = torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    torch.library.opcheck(torch.ops.earlyexit.cpp_head.default, (x, wp, bp, w, b))
    policy_args = _op_args(eek.Patience(1), write_back=True)[2:]
    torch.library.opcheck(torch.ops.earlyexit.cpp_head_exit_step.default, (x, wp, bp, w, b, None, *policy_args))
    hidden, mask = torch.randn(5, 7, 16, generator=g), torch.ones(5, 7, dtype=torch.long)
    torch.library.opcheck(torch.ops.earlyexit.cpp_compact.default, (hidden, mask, torch.tensor([0, 3]), 4))


def test_compile_fullgraph_exit_step_write_back():
    """Inductor compiles a function around one fused step with write-back, as one graph."""
    policy = eek.Patience(1)
    logits = torch.randn(5, 3)
    state = exit_rules.init_state(policy, 5, 3, 8, L, CPU)

    def buffers():
        outs = (torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
        return WriteBack(torch.tensor([6, 0, 3, 7, 2]), torch.full((5,), 2), torch.arange(3, 8), *outs)

    def step(logits, state, target):
        return cpp_backend.exit_step_write_back(policy, 2, L, logits, None, state, target)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    target_c, target_e = buffers(), buffers()
    state_c = exit_rules.exit_step(policy, 1, L, logits, None, dict(state))[2]
    got = compiled(logits, dict(state_c), target_c)
    ref = step(logits, dict(state_c), target_e)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[3], ref[3])
    assert int(got[3][0]) == int((~ref[0]).sum()) < 5  # the same logits twice: some rows exit
    for a, b in zip(target_c[3:], target_e[3:]):
        assert torch.equal(a, b)


def test_write_back_rejects_rows_outside_the_batch():
    args = list(_op_args(eek.Entropy(0.6), write_back=True))
    args[10] = torch.tensor([6, 0, 3, 8, 2])  # the batch has 8 rows
    with pytest.raises(RuntimeError, match=r"rows must index the batch of 8, got values in \[0, 8\]"):
        torch.ops.earlyexit.cpp_exit_step(*args)
