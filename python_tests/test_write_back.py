"""Each backend's fused exit step + write-back equals the reference: exit step, then write_back.

The output buffers start poisoned, so a row written at the wrong position, a row written
that did not exit, or an exiting row left unwritten shows up as a difference.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE, on_device

import earlyexit_kernels as eek
from earlyexit_kernels.backends import registry as backend_registry
from earlyexit_kernels.backends.write_back import WriteBack, exit_step_write_back, head_exit_step_write_back, write_back
from earlyexit_kernels.engine.step.heads import LambdaHaltingHead
from earlyexit_kernels.methods import exit_rules

pytestmark = [
    pytest.mark.exact,  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # interpreter: masked -inf lanes
]

FAST = [name for name in ("cpp", "cuda", "triton") if eek.backends()[name]]
DEVICES = {"cpp": torch.device("cpu"), "cuda": torch.device("cuda"), "triton": KERNEL_DEVICE}
BATCH, ACTIVE, LABELS, HIDDEN, LAYERS = 17, 11, 3, 64, 4


def _policies():
    planned = torch.randint(2, LAYERS + 1, (ACTIVE,), generator=torch.Generator().manual_seed(5))
    return {
        "entropy": eek.Entropy(0.8),
        "maxprob": eek.MaxProb(0.6, temperature=1.5),
        "patience": eek.Patience(1),
        "patience_regression": eek.Patience(1, regression_threshold=0.5),
        "qexit": eek.QExit(0.75),
        "voting": eek.Voting(2),
        "dact": eek.DACT(),
        "scheduled": eek.Scheduled(planned),
    }


def _fast(name: str):
    """The backend's two write-back functions on its device, taking and giving CPU tensors."""
    device = DEVICES[name]
    backend = backend_registry.resolve_backend(name, device)
    return backend_registry.Backend(
        name,
        backend.exit_step,
        backend.compact,
        ("cpu",),
        exit_step_write_back=on_device(backend.exit_step_write_back, device),
        head_exit_step_write_back=on_device(backend.head_exit_step_write_back, device),
    )


def _fresh_target(extents: bool, dtype=torch.float32, labels: int = LABELS, seed: int = 0) -> WriteBack:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(BATCH, generator=g)[:ACTIVE]
    runs = torch.randint(1, 3, (ACTIVE,), generator=g)
    ext = torch.randint(1, 40, (ACTIVE,), generator=g) if extents else None
    return WriteBack(
        rows,
        runs,
        ext,
        torch.full((BATCH, labels), 1234.5, dtype=dtype),
        torch.full((BATCH,), -7, dtype=torch.long),
        torch.full((BATCH,), -9, dtype=torch.long),
    )


def _clone(target: WriteBack) -> WriteBack:
    return WriteBack(*(t.clone() if t is not None else None for t in target))


def _logits(policy, seed: int) -> torch.Tensor:
    labels = 1 if getattr(policy, "is_regression", False) else LABELS
    return torch.randn(ACTIVE, labels, generator=torch.Generator().manual_seed(seed)) * 2


def _state_after_layer_one(policy, halting):
    state = exit_rules.init_state(policy, ACTIVE, _logits(policy, 1).shape[1], HIDDEN, LAYERS, torch.device("cpu"))
    return exit_rules.exit_step(policy, 1, LAYERS, _logits(policy, 1), halting, state)[2]


def _assert_same(got, ref, target_got, target_ref):
    exits, state, order, stats = got
    exits_r, state_r, order_r, stats_r = ref
    assert torch.equal(exits, exits_r)
    # (count, longest); a fast backend gives the count alone where there are no extents (nobody reads a longest)
    assert stats.dtype == torch.int64 and stats.shape in ([(2,)] if target_got.extents is not None else [(1,), (2,)])
    assert torch.equal(stats, stats_r[: stats.numel()]), (stats, stats_r)
    count = int(stats_r[0])
    assert torch.equal(order[:count], order_r[:count])
    assert order.dtype == torch.int64 and order.shape == (ACTIVE,)  # order[count:] is unspecified
    torch.testing.assert_close(target_got.logits, target_ref.logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(target_got.exit_layer, target_ref.exit_layer)
    assert torch.equal(target_got.layers_run, target_ref.layers_run)
    assert state.keys() == state_r.keys()
    for key in state_r:
        torch.testing.assert_close(state[key], state_r[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("extents", [False, True], ids=["no_padding", "padded"])
@pytest.mark.parametrize("name", list(_policies()))
def test_exit_step_write_back_matches_reference(backend, extents, name):
    policy = _policies()[name]
    fast = _fast(backend)
    halting = torch.randn(ACTIVE, generator=torch.Generator().manual_seed(2)) if policy.needs_halting_head else None
    state = _state_after_layer_one(policy, halting)
    logits = _logits(policy, 3)
    target_ref = _fresh_target(extents, labels=logits.shape[1])
    target_got = _fresh_target(extents, labels=logits.shape[1])
    ref = exit_step_write_back(policy, 2, LAYERS, logits, halting, dict(state), target_ref)
    got = fast.exit_step_write_back(policy, 2, LAYERS, logits, halting, dict(state), target_got)
    _assert_same(got, ref, target_got, target_ref)


@pytest.mark.parametrize("backend", FAST)
def test_write_back_mixes_exits_and_stays(backend):
    """The policies above leave some rows and keep others at layer 2, so the comparison bites."""
    fast = _fast(backend)
    for name in ("entropy", "maxprob", "patience", "qexit", "voting", "scheduled"):
        policy = _policies()[name]
        halting = torch.randn(ACTIVE, generator=torch.Generator().manual_seed(2)) if policy.needs_halting_head else None
        exits, _, _, stats = fast.exit_step_write_back(
            policy, 2, LAYERS, _logits(policy, 3), halting, _state_after_layer_one(policy, halting), _fresh_target(True)
        )
        assert 0 < int(stats[0]) < ACTIVE, name
        assert int(stats[0]) == int((~exits).sum())


@pytest.mark.parametrize("backend", FAST)
def test_last_layer_writes_every_row(backend):
    fast = _fast(backend)
    policy = eek.Entropy(0.0)
    target = _fresh_target(True)
    state = exit_rules.init_state(policy, ACTIVE, LABELS, HIDDEN, LAYERS, torch.device("cpu"))
    exits, _, _, stats = fast.exit_step_write_back(policy, LAYERS, LAYERS, _logits(policy, 4), None, state, target)
    assert bool(exits.all()) and stats.tolist() == [0, 0]
    written = torch.zeros(BATCH, dtype=torch.bool)
    written[target.rows] = True
    assert torch.equal(target.exit_layer == LAYERS, written)
    assert torch.equal(target.layers_run[target.rows], target.runs)
    assert bool((target.logits[~written] == 1234.5).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", ["entropy", "qexit", "voting"])
def test_head_exit_step_write_back_matches_reference(backend, name, dtype):
    policy = _policies()[name]
    fast = _fast(backend)
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(ACTIVE, 5, HIDDEN, generator=g).to(dtype)
    cls = hidden[:, 0]  # strided, as the engine passes it
    wp, bp = (
        (torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2).to(dtype),
        (torch.randn(HIDDEN, generator=g) * 0.1).to(dtype),
    )
    wi, bi = (
        (torch.randn(LABELS, HIDDEN, generator=g) * 0.5).to(dtype),
        (torch.randn(LABELS, generator=g) * 0.1).to(dtype),
    )
    halting_fn = None
    if policy.needs_halting_head:
        halting_fn = LambdaHaltingHead(HIDDEN, "concat", 1)
        with torch.no_grad():  # spread the halting probabilities, so Q-exit's cdf crosses q for some rows only
            for param in halting_fn.parameters():
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
        halting_fn = halting_fn.to(dtype)
    state = exit_rules.init_state(policy, ACTIVE, LABELS, HIDDEN, LAYERS, torch.device("cpu"), pooled_dtype=dtype)
    target_ref, target_got = _fresh_target(True, dtype), _fresh_target(True, dtype)
    with torch.no_grad():
        # Layer 1 on other [CLS] vectors gives a state (votes, cdf, prev_pooled) under which some rows leave at 2.
        state = exit_rules.head_exit_step(policy, 1, LAYERS, hidden[:, 1], wp, bp, wi, bi, state, halting_fn)[4]
        ref = head_exit_step_write_back(policy, 2, LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn, target_ref)
        got = fast.head_exit_step_write_back(
            policy, 2, LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn, target_got
        )
    if dtype == torch.float32:
        assert 0 < int(ref[3][0]) < ACTIVE, "the data should make some rows leave and some stay"
        _assert_same(got, ref, target_got, target_ref)
        return
    # bf16: a decision may flip only within rounding; where both agree, the outputs agree.
    agree = got[0] == ref[0]
    assert float(agree.float().mean()) >= 0.8
    if bool(agree.all()):
        assert torch.equal(got[3], ref[3][: got[3].numel()])
        assert torch.equal(got[2][: int(ref[3][0])], ref[2][: int(ref[3][0])])
    rows = target_ref.rows[agree & ref[0]]
    torch.testing.assert_close(target_got.logits[rows], target_ref.logits[rows], rtol=2e-2, atol=2e-2)
    assert torch.equal(target_got.exit_layer[rows], target_ref.exit_layer[rows])
    assert torch.equal(target_got.layers_run[rows], target_ref.layers_run[rows])


def test_reference_write_back_empty_batch():
    target = WriteBack(
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(4, LABELS),
        torch.zeros(4, dtype=torch.long),
        torch.zeros(4, dtype=torch.long),
    )
    order, stats = write_back(target, torch.zeros(0, dtype=torch.bool), torch.zeros(0, LABELS), 2)
    assert order.shape == (0,) and stats.tolist() == [0, 0]


@pytest.mark.skipif(not eek.backends()["triton"], reason="triton is not available")
def test_triton_write_back_rejects_bad_buffers():
    fast = _fast("triton")
    policy = eek.Entropy(0.8)
    state = exit_rules.init_state(policy, ACTIVE, LABELS, HIDDEN, LAYERS, torch.device("cpu"))
    target = _fresh_target(False)._replace(rows=torch.arange(ACTIVE, dtype=torch.int32))
    with pytest.raises(ValueError, match="WriteBack.rows must be torch.int64"):
        fast.exit_step_write_back(policy, 2, LAYERS, _logits(policy, 3), None, state, target)
    target = _fresh_target(False)._replace(logits=torch.zeros(BATCH, LABELS + 1))
    with pytest.raises(ValueError, match="WriteBack outputs must be logits"):
        fast.exit_step_write_back(policy, 2, LAYERS, _logits(policy, 3), None, state, target)
    target = _fresh_target(False)._replace(exit_layer=torch.zeros(BATCH, 2, dtype=torch.long)[:, 0])
    with pytest.raises(ValueError, match="WriteBack.exit_layer must be contiguous"):
        fast.exit_step_write_back(policy, 2, LAYERS, _logits(policy, 3), None, state, target)


@pytest.mark.parametrize("backend", [name for name in FAST if name != "cpp"])  # cpp raises, see test_cpp_exit_step
def test_kernel_write_back_never_writes_outside_the_batch(backend):
    """A kernel cannot check indices without a host sync; it skips a bad one instead of writing past B."""
    fast = _fast(backend)
    policy = eek.Entropy(10.0)  # every row exits
    state = exit_rules.init_state(policy, ACTIVE, LABELS, HIDDEN, LAYERS, torch.device("cpu"))
    # The outputs sit inside larger buffers: 4 guard rows on each side must stay as they are.
    guarded = (
        torch.full((BATCH + 8, LABELS), 1234.5),
        torch.full((BATCH + 8,), -7, dtype=torch.long),
        torch.full((BATCH + 8,), -9, dtype=torch.long),
    )
    rows = _fresh_target(False).rows.clone()
    rows[3] = BATCH + 2
    rows[7] = -1
    target = _fresh_target(False)._replace(
        rows=rows, logits=guarded[0][4:-4], exit_layer=guarded[1][4:-4], layers_run=guarded[2][4:-4]
    )
    fast.exit_step_write_back(policy, 2, LAYERS, _logits(policy, 3), None, state, target)
    good = torch.ones(ACTIVE, dtype=torch.bool)
    good[[3, 7]] = False
    assert bool((target.exit_layer[rows[good]] == 2).all())
    assert int((target.exit_layer == 2).sum()) == ACTIVE - 2
    for buffer, sentinel in zip(guarded, (1234.5, -7, -9)):
        assert bool((buffer[:4] == sentinel).all()) and bool((buffer[-4:] == sentinel).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, "model"], ids=["out_fp32", "out_model_dtype"])
@pytest.mark.parametrize("backend", FAST)
def test_head_write_back_writes_the_logits_head_exit_step_returns(backend, dtype, out_dtype):
    """In bf16/fp16 the written logits are the head's logits rounded to the model dtype, bit for bit
    what ``head_exit_step`` returns (and decides on): with every row forced to exit (last layer) the
    whole batch is compared. H = 64 with weights large enough that the fp32 sums are not representable
    in the model dtype, so an unrounded write-back differs."""
    device = DEVICES[backend]
    resolved = backend_registry.resolve_backend(backend, device)
    step = on_device(resolved.head_exit_step, device)
    settle = on_device(resolved.head_exit_step_write_back, device)
    g = torch.Generator().manual_seed(21)
    cls = torch.randn(ACTIVE, 5, HIDDEN, generator=g).to(dtype)[:, 0]
    wp = (torch.randn(HIDDEN, HIDDEN, generator=g) * 0.3).to(dtype)
    bp = (torch.randn(HIDDEN, generator=g) * 0.1).to(dtype)
    wi = (torch.randn(LABELS, HIDDEN, generator=g) * 0.7).to(dtype)
    bi = (torch.randn(LABELS, generator=g) * 0.1).to(dtype)
    policy = eek.Entropy(0.5)
    state = exit_rules.init_state(policy, ACTIVE, LABELS, HIDDEN, LAYERS, torch.device("cpu"))
    target = _fresh_target(False, dtype if out_dtype == "model" else out_dtype)
    with torch.no_grad():
        _, returned, logits, _, _ = step(policy, LAYERS, LAYERS, cls, wp, bp, wi, bi, dict(state))
        exits, _, _, stats = settle(policy, LAYERS, LAYERS, cls, wp, bp, wi, bi, dict(state), None, target)
    assert bool(exits.all()) and int(stats[0]) == 0
    assert logits.dtype == dtype
    assert torch.equal(returned, logits.to(returned.dtype))  # Entropy returns the logits themselves
    written = target.logits[target.rows]
    assert torch.equal(written, logits.to(written.dtype)), (written - logits.to(written.dtype)).abs().max()
