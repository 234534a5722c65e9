"""The Triton exit step against the PyTorch reference (exit_rules), in fp32, fp16 and bf16.

(Past 600 lines: one specification of the two kernels and their wrappers, every dtype, policy
and block size, opcheck and compile; split by kernel it would repeat its helpers.)

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py). The interpreter is slow, so the shapes below are a covering subset of
B in {1, 3, 17, 64, 257}, H in {64, 384, 768, 1024}, C in {1, 2, 3, 7}, not the product.

Every kernel output starts poisoned (NaN / sentinels, twice with different values),
so an element the kernel does not write fails the comparison.

Tolerances: the kernel is compared with an fp64 reference; its error may be at most
twice the error of the same PyTorch computation run in the low precision (plus a few
units in the last place). In fp32 decisions and integer state equal the reference
exactly; float state matches to a few ulps (exp/sigmoid implementations differ in the
last bit; compiled on a GPU, Triton's approximate exp, log and division widen that to
FLOAT_ULPS, below). In fp16/bf16 a decision may differ from the fp64 decision only where the
fp64 decision quantity lies within rounding (the tolerance above) of its threshold.
"""

import copy
import math

import pytest
import torch

triton = pytest.importorskip("triton")

import threshold_helpers  # noqa: E402
from conftest import KERNEL_DEVICE, TRITON_COMPILED, on_device, on_kernel_device  # noqa: E402

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.backends import compaction  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import exit_decide as tkd  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import exit_head as tkh  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import exit_step as tk  # noqa: E402
from earlyexit_kernels.backends.triton_kernels._common import poisoned_outputs  # noqa: E402
from earlyexit_kernels.backends.write_back import WriteBack  # noqa: E402
from earlyexit_kernels.engine.step.heads import LambdaHaltingHead  # noqa: E402
from earlyexit_kernels.methods import exit_rules  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: masked -inf lanes

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_LAYERS = 6


# ----------------------------------------------------------------------------- helpers


def make_policy(name: str, batch: int):
    g = torch.Generator().manual_seed(7)
    return {
        "entropy": lambda: eek.Entropy(0.6),
        "entropy_norm_per_layer": lambda: eek.Entropy((0.2, 0.5, 0.4, 0.3, 0.6, 0.1), normalized=True),
        "maxprob": lambda: eek.MaxProb(0.6),
        "maxprob_temp": lambda: eek.MaxProb((0.5, 0.6, 0.7, 0.5, 0.6, 0.7), temperature=(0.5, 1.0, 2.0, 1.5, 0.7, 1.2)),
        "patience": lambda: eek.Patience(2),
        "patience_reg": lambda: eek.Patience(1, regression_threshold=0.5),
        "qexit": lambda: eek.QExit(0.4),
        "qexit_stochastic": lambda: eek.QExit(0.5, stochastic=True, seed=3),
        "voting": lambda: eek.Voting(2),
        "dact": lambda: eek.DACT(),
        "skipgates": lambda: eek.SkipGates(entropy_threshold=0.7),
        "scheduled": lambda: eek.Scheduled(torch.randint(1, NUM_LAYERS + 1, (batch,), generator=g)),
    }[name]()


def make_head(hidden: int, labels: int, dtype, seed: int):
    """Pooler and classifier weights whose logits spread over a few units."""
    g = torch.Generator().manual_seed(seed)
    wp = (torch.randn(hidden, hidden, generator=g) * (1.5 / math.sqrt(hidden))).to(dtype)
    bp = (torch.randn(hidden, generator=g) * 0.1).to(dtype)
    wi = (torch.randn(labels, hidden, generator=g) * (2.5 / math.sqrt(hidden))).to(dtype)
    bi = (torch.randn(labels, generator=g) * 0.2).to(dtype)
    return wp, bp, wi, bi


def make_cls(batch: int, hidden: int, dtype, seed: int, layout: str = "strided"):
    """[CLS] rows as a non-contiguous view: of [B, S, H] hidden states, or transposed."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        full = torch.randn(batch, 5, hidden, generator=g).to(dtype)
        return full[:, 0]
    full = torch.randn(hidden, batch + 3, generator=g).to(dtype)
    return full.t()[1 : batch + 1]  # stride (1, B + 3)


def halting_fn_for(policy, hidden: int, dtype, seed: int):
    if not policy.needs_halting_head:
        return None
    torch.manual_seed(seed)
    if isinstance(policy, eek.QExit):
        head = LambdaHaltingHead(hidden, "concat", 1)
        torch.nn.init.normal_(head.out.weight, std=1.0)
    else:
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(head.weight, std=2.0 / math.sqrt(hidden))
    head = head.to(dtype).eval()

    def fn(pooled, previous):
        head.to(pooled.device)  # where the kernels run (a GPU, or the CPU under the interpreter)
        with torch.no_grad():
            if isinstance(head, LambdaHaltingHead):
                return head(pooled, previous)
            return head(pooled).squeeze(-1)

    fn.head = head
    return fn


def random_state(policy, batch: int, labels: int, hidden: int, dtype, seed: int):
    """A plausible mid-run state, so one step exercises every branch."""
    g = torch.Generator().manual_seed(seed)
    state = exit_rules.init_state(policy, batch, labels, hidden, NUM_LAYERS, CPU, pooled_dtype=dtype)
    if "counter" in state:
        state["counter"] = torch.randint(0, 2, (batch,), generator=g, dtype=torch.int32)
    if "prev_pred" in state:
        state["prev_pred"] = torch.randint(-1, labels, (batch,), generator=g)
    if "prev_value" in state:
        state["prev_value"] = torch.randn(batch, generator=g)
    if "cdf" in state:
        lam = torch.rand(batch, generator=g) * 0.4
        state["cdf"], state["remaining"] = lam, 1.0 - lam
        state["prev_pooled"] = torch.tanh(torch.randn(batch, hidden, generator=g)).to(dtype)
    if "votes" in state:
        state["votes"] = torch.randint(0, 2, (batch, labels), generator=g, dtype=torch.int32)
        state["prob_sum"] = torch.rand(batch, labels, generator=g)
    if "accumulated" in state:
        acc = torch.rand(batch, labels, generator=g)
        state["accumulated"] = acc / acc.sum(-1, keepdim=True)
        state["pi"] = torch.rand(batch, generator=g) * 0.8 + 0.1
    return state


def poisoned(fn, *args):
    """Run ``fn(*args)`` with every kernel output pre-filled by two different sentinels; both runs must agree."""
    with poisoned_outputs("a"):
        first = fn(*args)
    with poisoned_outputs("b"):
        second = fn(*args)
    _assert_identical(first, second)
    return first


def _assert_identical(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_identical(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            _assert_identical(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert a == b


# Float32 state and returned values against the reference, in units in the last place (of the
# value, or of 1 for probabilities). Interpreted: 8 (exp/sigmoid implementations differ in the last
# bit). Compiled (conftest.TRITON_COMPILED): exp of logits up to |x| = 20 costs 2 + 20 ulp, then a
# division (2), a sum over the labels and a log; 64 ulp is about twice that chain's worst case.
# A log of a value near 1 turns the relative error into an absolute one: the same bound as atol.
FLOAT_ULPS = 64 if TRITON_COMPILED else 8
RETURNED_ATOL = FLOAT_ULPS * 2**-23 if TRITON_COMPILED else 1e-7


def ulps_close(actual, expected, ulps: int = FLOAT_ULPS):
    """Float32 state: equal up to ``ulps`` units in the last place (of the value, or of 1 for probabilities)."""
    torch.testing.assert_close(actual, expected, rtol=ulps * 2**-23, atol=ulps * 2**-23, equal_nan=True)


def assert_state_equal_fp32(state_k, state_r):
    assert state_k.keys() == state_r.keys()
    for key, ref in state_r.items():
        got = state_k[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        if ref.dtype.is_floating_point and key != "uniforms":
            ulps_close(got.float(), ref.float())
        else:
            assert torch.equal(got, ref), key


def decision_quantity(policy, layer, logits, halting, state):
    """The quantity each decision compares with its threshold, in float64: ``(q, threshold)``."""
    return threshold_helpers.decision_quantity(policy, layer, NUM_LAYERS, logits, halting, state)


# No decision quantity this close to its threshold where the tests demand equal decisions: on a
# GPU the kernel's exp and the reference's differ in the last bits, and logits computed by the
# kernel differ by the summation order too.
# The same logits on both sides: 8 float32 ulps of 1; compiled, an entropy of up to ln(7) carries
# FLOAT_ULPS of relative error (about 1.5e-5), so the data must stay further away.
CLEAR_GIVEN = 5e-5 if TRITON_COMPILED else 1e-6
CLEAR_COMPUTED = 5e-5  # logits from the head (fp32 sums in another order): 5x the 1e-5 they may differ by


def assert_clear(policy, layer, logits, halting, state, margin):
    if layer == NUM_LAYERS:
        return
    if isinstance(policy, eek.Voting) or (isinstance(policy, eek.Patience) and not policy.is_regression):
        if margin == CLEAR_GIVEN:
            return  # the argmax of given logits involves no rounding: ties go to the first label everywhere
    q, threshold = decision_quantity(policy, layer, logits, halting, state)
    if q is not None and torch.isfinite(q).any():
        gap = float((q[torch.isfinite(q)] - threshold).abs().min())
        assert gap > margin, f"{policy} layer {layer}: a value {gap:.3g} from its threshold (move it or the data)"


def assert_decisions_within_rounding(exits, exits64, q64, threshold, tol):
    """In low precision a decision may differ from the fp64 one only where q64 is within tol of the threshold."""
    differ = exits != exits64
    if differ.any():
        gap = (q64[differ] - threshold).abs()
        assert bool((gap <= tol).all()), (
            f"{int(differ.sum())} decisions differ from fp64 with |q - threshold| up to {gap.max().item():.3g} "
            f"> rounding tolerance {tol:.3g}"
        )
    return differ


def rounding_tol(dtype, err_torch, scale):
    """Kernel error bound: twice PyTorch's own low-precision error, at least a few ulps of the dtype."""
    return 2.0 * float(err_torch) + 4.0 * torch.finfo(dtype).eps * max(float(scale), 1e-3)


# ----------------------------------------------------------------------------- the rule checker itself


def test_near_threshold_rule_rejects_far_mismatch_and_accepts_near_one():
    q64 = torch.tensor([0.10, 0.50, 0.9000, 0.5004], dtype=torch.float64)
    exits64 = q64 < 0.5
    near = exits64.clone()
    near[3] = ~near[3]  # q = 0.5004: within 1e-3 of the threshold
    assert assert_decisions_within_rounding(near, exits64, q64, 0.5, 1e-3).sum() == 1
    far = exits64.clone()
    far[2] = ~far[2]  # q = 0.9: far from the threshold
    with pytest.raises(AssertionError, match="decisions differ"):
        assert_decisions_within_rounding(far, exits64, q64, 0.5, 1e-3)


# ----------------------------------------------------------------------------- fused head + exit step, fp32 chains

FP32_CASES = [
    # policy, B, H, C
    ("entropy", 3, 384, 3),
    ("entropy_norm_per_layer", 17, 64, 7),
    ("maxprob", 1, 64, 2),
    ("maxprob_temp", 64, 768, 2),
    ("patience", 257, 64, 3),
    ("patience_reg", 17, 384, 1),
    ("qexit", 3, 1024, 1),
    ("qexit_stochastic", 64, 64, 2),
    ("voting", 17, 768, 7),
    ("dact", 64, 384, 2),
    ("skipgates", 1, 1024, 3),
    ("scheduled", 257, 64, 1),
]


@pytest.mark.parametrize("name,batch,hidden,labels", FP32_CASES)
def test_head_exit_step_fp32_matches_reference_over_layers(name, batch, hidden, labels):
    """Several layers in a row, each backend on its own state: decisions and state equal in fp32."""
    policy = make_policy(name, batch)
    state_r = exit_rules.init_state(policy, batch, labels, hidden, NUM_LAYERS, CPU)
    state_k = dict(state_r)
    halting_fn = halting_fn_for(policy, hidden, torch.float32, seed=5)
    layers = (1, 2, 3) if batch > 100 else (1, 2, 3, NUM_LAYERS)
    for step, layer in enumerate(layers):
        wp, bp, wi, bi = make_head(hidden, labels, torch.float32, seed=10 + step)
        cls = make_cls(
            batch, hidden, torch.float32, seed=20 + step, layout="strided" if step % 2 == 0 else "transposed"
        )
        ref = exit_rules.head_exit_step(policy, layer, NUM_LAYERS, cls, wp, bp, wi, bi, state_r, halting_fn)
        assert_clear(policy, layer, ref[2], ref[3], state_r, CLEAR_COMPUTED)
        got = poisoned(
            on_kernel_device(tk.head_exit_step),
            policy,
            layer,
            NUM_LAYERS,
            cls,
            wp,
            bp,
            wi,
            bi,
            dict(state_k),
            halting_fn,
        )
        exits_r, returned_r, logits_r, halting_r, state_r = ref
        exits_k, returned_k, logits_k, halting_k, state_k = got
        assert exits_k.dtype == torch.bool and returned_k.dtype == torch.float32 and logits_k.dtype == torch.float32
        assert torch.equal(exits_k, exits_r), f"layer {layer}"
        if layer == NUM_LAYERS:
            assert bool(exits_k.all())
        torch.testing.assert_close(logits_k, logits_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(returned_k, returned_r, rtol=1e-5, atol=1e-5)
        if halting_r is not None:
            torch.testing.assert_close(halting_k, halting_r, rtol=1e-5, atol=1e-5)
        assert state_k.keys() == state_r.keys()
        for key, ref_v in state_r.items():
            assert state_k[key].dtype == ref_v.dtype, key
            if ref_v.dtype.is_floating_point:
                torch.testing.assert_close(state_k[key], ref_v, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(state_k[key], ref_v), key


# ----------------------------------------------------------------------------- fused head + exit step, fp16 / bf16

LOWP_CASES = [
    ("entropy", 64, 768, 3),
    ("maxprob_temp", 17, 1024, 2),
    ("patience", 257, 384, 7),
    ("patience_reg", 17, 64, 1),
    ("qexit", 17, 768, 2),
    ("qexit_stochastic", 1, 384, 1),
    ("voting", 64, 64, 3),
    ("dact", 64, 384, 7),
    ("entropy_norm_per_layer", 257, 1024, 7),
    ("scheduled", 3, 64, 1),
]


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("name,batch,hidden,labels", LOWP_CASES)
def test_head_exit_step_low_precision_within_rounding(dtype_name, name, batch, hidden, labels):
    dtype = DTYPES[dtype_name]
    policy = make_policy(name, batch)
    layer = NUM_LAYERS - 1
    wp, bp, wi, bi = make_head(hidden, labels, dtype, seed=31)
    cls = make_cls(batch, hidden, dtype, seed=32)
    state = random_state(policy, batch, labels, hidden, dtype, seed=33)
    halting_fn = halting_fn_for(policy, hidden, dtype, seed=34)

    # fp64 reference on the same (rounded) inputs, and PyTorch in the low precision.
    w64 = [t.double() for t in (wp, bp, wi, bi)]
    pooled64 = torch.tanh(torch.nn.functional.linear(cls.double(), w64[0], w64[1]))
    logits64 = torch.nn.functional.linear(pooled64, w64[2], w64[3])
    halting64 = None
    if halting_fn is not None:
        halting64 = _halting64(halting_fn, pooled64, state.get("prev_pooled"))
    ref = exit_rules.head_exit_step(policy, layer, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn)
    got = poisoned(
        lambda: on_kernel_device(tk.head_exit_step)(
            policy, layer, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn
        )
    )
    exits_t, returned_t, logits_t, halting_t, state_t = ref
    exits_k, returned_k, logits_k, halting_k, state_k = got

    assert logits_k.dtype == dtype and returned_k.dtype == torch.float32 and exits_k.dtype == torch.bool
    assert state_k.keys() == state_t.keys()
    for key in state_t:
        assert state_k[key].dtype == state_t[key].dtype and state_k[key].shape == state_t[key].shape, key

    # Logits: the kernel's error against fp64 is bounded by PyTorch's own low-precision error.
    err_t = (logits_t.double() - logits64).abs().max()
    err_k = (logits_k.double() - logits64).abs().max()
    tol = rounding_tol(dtype, err_t, logits64.abs().max())
    assert err_k <= tol, f"kernel logits error {err_k:.3g} > {tol:.3g} (PyTorch {dtype_name}: {err_t:.3g})"
    if "prev_pooled" in state_k:
        p_err_t = (state_t["prev_pooled"].double() - pooled64).abs().max()
        p_err_k = (state_k["prev_pooled"].double() - pooled64).abs().max()
        assert p_err_k <= rounding_tol(dtype, p_err_t, 1.0)

    # Decisions: only near the threshold may they differ from the fp64 decision.
    q64, thr = decision_quantity(policy, layer, logits64, halting64, state)
    exits64, _, state64 = exit_rules.exit_step(policy, layer, NUM_LAYERS, logits64, halting64, dict(state))
    if q64 is None:  # Scheduled: exact
        assert torch.equal(exits_k, exits64)
        return
    q_t, _ = decision_quantity(policy, layer, logits_t, halting_t, state)
    q_tol = rounding_tol(dtype, (q_t - q64).abs().max(), q64.abs().max())
    assert_decisions_within_rounding(exits_t, exits64, q64, thr, q_tol)  # PyTorch obeys the rule too
    differ = assert_decisions_within_rounding(exits_k, exits64, q64, thr, q_tol)
    assert int(differ.sum()) <= max(2, batch // 8), "too many decisions changed by rounding"

    # Returned logits (log-scores for Voting, ln a for DACT) close to fp64 except on ambiguous rows.
    ambiguous = (q64 - thr).abs() <= q_tol
    _, returned64, _ = exit_rules.exit_step(policy, layer, NUM_LAYERS, logits64, halting64, dict(state))
    clear = ~ambiguous[:, None] & torch.isfinite(returned64)
    r_err_t = ((returned_t.double() - returned64.double()).abs() * clear).nan_to_num().max()
    r_err_k = ((returned_k.double() - returned64.double()).abs() * clear).nan_to_num().max()
    assert r_err_k <= rounding_tol(dtype, r_err_t, returned64[clear].abs().max() if clear.any() else 1.0)

    # Integer state may differ only on the rows whose decision quantity is ambiguous.
    for key, ref_v in state64.items():
        got_v = state_k[key]
        if not ref_v.dtype.is_floating_point:
            rows_differ = (got_v != ref_v).reshape(batch, -1).any(-1)
            assert not bool((rows_differ & ~ambiguous).any()), key
        elif key not in ("uniforms", "prev_pooled"):
            s_err_t = (state_t[key].double() - ref_v.double()).abs().max()
            s_err_k = (got_v.double() - ref_v.double()).abs().max()
            assert s_err_k <= rounding_tol(dtype, s_err_t, 1.0), key


def _halting64(halting_fn, pooled64, prev_pooled):
    """The halting head evaluated in float64 on the fp64 pooled vector."""
    head64 = copy.deepcopy(halting_fn.head).cpu().double()
    with torch.no_grad():
        if isinstance(head64, LambdaHaltingHead):
            return head64(pooled64, prev_pooled.double())
        return head64(pooled64).squeeze(-1)


# ----------------------------------------------------------------------------- exit step alone (given logits)

STEP_CASES = [
    # policy, B, C, dtype
    ("entropy", 257, 7, "fp16"),
    ("entropy_norm_per_layer", 3, 2, "bf16"),
    ("maxprob_temp", 17, 3, "fp32"),
    ("patience", 64, 2, "bf16"),
    ("patience_reg", 1, 1, "fp16"),
    ("qexit", 257, 1, "fp32"),
    ("qexit_stochastic", 17, 2, "fp16"),
    ("voting", 3, 7, "fp32"),
    ("dact", 257, 3, "bf16"),
    ("skipgates", 64, 3, "fp32"),
    ("scheduled", 17, 2, "fp16"),
]


def _logits_with_nonfinite(batch, labels, dtype, seed):
    """Strided [B, C] logits (every other column of a wider tensor) with NaN / inf rows."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(batch, 2 * labels, generator=g) * 2.0).to(dtype)
    z = wide[:, ::2]
    if batch >= 3:
        z[1, 0] = float("nan")
        z[2, labels - 1] = float("inf")
    return z


@pytest.mark.parametrize("name,batch,labels,dtype_name", STEP_CASES)
def test_exit_step_equals_reference_on_same_logits(name, batch, labels, dtype_name):
    """Given the same logits both sides compute in fp32: decisions and integer state are identical."""
    dtype = DTYPES[dtype_name]
    policy = make_policy(name, batch)
    g = torch.Generator().manual_seed(50)
    for layer in (2, NUM_LAYERS):
        z = _logits_with_nonfinite(batch, labels, dtype, seed=layer)
        state = random_state(policy, batch, labels, 16, dtype, seed=51)
        halting = None
        if policy.needs_halting_head:
            halting = (torch.randn(batch, generator=g) * 2).to(dtype)
            if batch >= 4:
                halting[3] = float("nan")
        assert_clear(policy, layer, z, halting, state, CLEAR_GIVEN)
        exits_r, returned_r, state_r = exit_rules.exit_step(policy, layer, NUM_LAYERS, z, halting, dict(state))
        exits_k, returned_k, state_k = poisoned(
            lambda z=z, halting=halting, state=state, layer=layer: on_kernel_device(tk.exit_step)(
                policy, layer, NUM_LAYERS, z, halting, dict(state)
            )
        )
        assert torch.equal(exits_k, exits_r)
        torch.testing.assert_close(returned_k, returned_r, rtol=FLOAT_ULPS * 2**-23, atol=RETURNED_ATOL, equal_nan=True)
        assert_state_equal_fp32(state_k, state_r)
        if batch >= 3 and layer < NUM_LAYERS and name != "scheduled":  # a schedule ignores the logits
            assert not bool(exits_k[1]) and not bool(exits_k[2]), "a non-finite row exited"


def _write_back_target(active: int, batch: int, labels: int) -> WriteBack:
    outs = (torch.zeros(batch, labels), torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
    return WriteBack(torch.arange(active), torch.ones(active, dtype=torch.long), None, *outs)


@pytest.mark.parametrize("name", ["entropy", "patience", "voting", "dact"])
def test_exit_step_write_back_order_matches_survivor_index(name):
    batch, labels = 257, 3
    policy = make_policy(name, batch)
    state = random_state(policy, batch, labels, 16, torch.float32, seed=60)
    z = torch.randn(batch, labels, generator=torch.Generator().manual_seed(61)) * 3
    halting = torch.randn(batch) if policy.needs_halting_head else None
    exits_r, _, _ = exit_rules.exit_step(policy, 3, NUM_LAYERS, z, halting, dict(state))
    target = _write_back_target(batch, batch, labels)
    exits, _, order, stats = poisoned(
        lambda: on_kernel_device(tk.exit_step_write_back)(policy, 3, NUM_LAYERS, z, halting, dict(state), target)
    )
    assert torch.equal(exits, exits_r)
    keep = ~exits_r
    m = int(keep.sum())
    assert 0 < m < batch, "test data should make some rows exit and some stay"
    assert stats.dtype == torch.int64 and stats.shape == (2,) and int(stats[0]) == m
    assert order.dtype == torch.int64
    assert torch.equal(order[:m], compaction.survivor_index(keep, m))
    assert torch.equal(order[m:], torch.nonzero(exits_r).squeeze(1).flip(0))


def test_head_exit_step_and_write_back_on_an_empty_batch():
    policy = eek.Entropy(0.6)
    wp, bp, wi, bi = make_head(64, 3, torch.float32, seed=70)
    cls = make_cls(0, 64, torch.float32, seed=71)
    exits, returned, logits, halting, state = on_kernel_device(tk.head_exit_step)(
        policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, {}
    )
    assert exits.shape == (0,) and returned.shape == (0, 3) and logits.shape == (0, 3)
    assert halting is None and state == {}
    exits, state, order, stats = on_kernel_device(tk.head_exit_step_write_back)(
        policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, {}, None, _write_back_target(0, 4, 3)
    )
    assert exits.shape == (0,) and order.shape == (0,) and int(stats[0]) == 0 and state == {}


def test_gpu_block_sizes_under_interpreter(monkeypatch):
    """The GPU launch configuration (several column tiles, the fp32 head's 32-wide K loop) on a small case."""
    monkeypatch.setattr(tkh, "FORCE_GPU_BLOCKS", True)
    monkeypatch.setattr(tkd, "FORCE_GPU_BLOCKS", True)
    policy = eek.Voting(1)
    wp, bp, wi, bi = make_head(384, 7, torch.float32, seed=80)
    cls = make_cls(17, 384, torch.float32, seed=81)
    state = random_state(policy, 17, 7, 384, torch.float32, seed=82)
    ref = exit_rules.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state))
    got = poisoned(lambda: on_kernel_device(tk.head_exit_step)(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state)))
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["entropy", "patience", "voting", "dact"])
def test_decision_on_many_programs_with_gpu_blocks(monkeypatch, name):
    """Without the write-back the decision runs one program per 128 rows (three for 257 rows)
    and equals the reference; with it one program lists the survivors in 256-row blocks on 8
    warps. The block sizes do not depend on n (see the cold-start test below)."""
    monkeypatch.setattr(tkh, "FORCE_GPU_BLOCKS", True)
    monkeypatch.setattr(tkd, "FORCE_GPU_BLOCKS", True)
    assert tkd._decide_launch(257, 3, False) == (128, 4, 3, 4)
    assert tkd._decide_launch(257, 3, True) == (256, 4, 1, 8)
    assert tkd._decide_launch(40, 3, True) == (256, 4, 1, 8)
    policy = make_policy(name, 257)
    state = random_state(policy, 257, 3, 16, torch.float32, seed=83)
    z = torch.randn(257, 3, generator=torch.Generator().manual_seed(84)) * 2
    halting = torch.randn(257, generator=torch.Generator().manual_seed(85)) if policy.needs_halting_head else None
    ref = exit_rules.exit_step(policy, 2, NUM_LAYERS, z, halting, dict(state))
    got = poisoned(lambda: on_kernel_device(tk.exit_step)(policy, 2, NUM_LAYERS, z, halting, dict(state)))
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5, equal_nan=True)
    for key in ref[2]:
        torch.testing.assert_close(got[2][key], ref[2][key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- torch.library registration

# With the AOT-dispatch checks: under the interpreter the ops are opaque custom ops (see
# _common.register_op), so AOTAutograd traces their fake kernels, with dynamic sizes too.
_CPU_OPCHECK = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)


def _decide_args(z, state):
    """Patience at layer 2 of 4 with the write-back into a batch of 8: every kind of argument."""
    n, labels = z.shape
    device = z.device
    rows = torch.tensor([6, 0, 3, 7, 2], device=device)[:n]
    runs = torch.full((n,), 2, dtype=torch.long, device=device)
    extents = torch.tensor([5, 9, 2, 7, 4], device=device)[:n]
    outs = (
        torch.zeros(8, labels, device=device),
        torch.zeros(8, dtype=torch.long, device=device),
        torch.zeros(8, dtype=torch.long, device=device),
    )
    state_args = (state["prev_pred"], state["counter"])
    return (z, None, None, *state_args, None, rows, runs, extents, *outs, tkd.PATIENCE_CLS, 2, 4)


# fa, fb, patience, flags: the write-back, and the returned logits too
_DECIDE_SCALARS = (0.0, 0.0, 1, tkd.F_WRITE_BACK | tkd.F_RETURNED)


_CPU_ONLY = pytest.mark.skipif(KERNEL_DEVICE.type != "cpu", reason="with a GPU the CUDA test below checks this")


@_CPU_ONLY
def test_opcheck_cpu():
    """Schema, autograd registration, fake (meta) kernels and AOTAutograd with static and dynamic
    sizes (the op as one node: Triton's interpreter cannot launch on fake tensors; the traced
    launch itself is checked by test_launchers_trace_with_symbolic_sizes and on CUDA below)."""
    policy = eek.Patience(1)
    state = random_state(policy, 5, 3, 16, torch.float32, seed=90)
    z = torch.randn(5, 3)
    torch.library.opcheck(
        torch.ops.earlyexit.exit_decide.default, _decide_args(z, state) + _DECIDE_SCALARS, test_utils=_CPU_OPCHECK
    )
    cls = make_cls(5, 64, torch.float32, seed=91)
    wp, bp, wi, _ = make_head(64, 3, torch.float32, seed=92)
    torch.library.opcheck(torch.ops.earlyexit.exit_head.default, (cls, wp, bp, wi, True), test_utils=_CPU_OPCHECK)


class _RecordedLaunch:
    """Stands in for ``wrap_triton``: records ``kernel[grid](*args, **kwargs)`` instead of launching."""

    def __init__(self, launches):
        self.launches = launches

    def __call__(self, kernel):
        return _RecordedLaunch._Indexed(self.launches, kernel)

    class _Indexed:
        def __init__(self, launches, kernel):
            self.launches, self.kernel = launches, kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.mark.parametrize("gpu_blocks", [False, True], ids=["interpreter_blocks", "gpu_blocks"])
def test_launchers_trace_with_symbolic_sizes(monkeypatch, gpu_blocks):
    """On a GPU, torch.compile with dynamic shapes (compaction changes n every layer) runs the
    ops' launchers on fake tensors whose sizes are SymInts. The block sizes must come out as plain
    ints without hashing a SymInt (an lru_cache on n raised ``unhashable type: non-nested SymInt``)
    and without specializing the graph to one n: here n traced as 5 stays symbolic."""
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(tkh, "FORCE_GPU_BLOCKS", gpu_blocks)
    monkeypatch.setattr(tkd, "FORCE_GPU_BLOCKS", gpu_blocks)
    launches = []
    record = _RecordedLaunch(launches)
    policy = eek.Patience(1)
    wp, bp, wi, bi = make_head(64, 3, torch.float32, seed=92)
    cls = make_cls(5, 64, torch.float32, seed=91).contiguous()
    state = random_state(policy, 5, 3, 64, torch.float32, seed=90)

    def step(cls, wp, bp, wi, bi, prev_pred, counter):
        zpart, _ = tkh._run_head(record, cls, wp, bp, wi, False, True)
        s = (prev_pred, counter)
        return tkd._run_decide(
            record,
            zpart,
            bi,
            None,
            *s,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            tkd.PATIENCE_CLS,
            2,
            4,
            0.0,
            0.0,
            1,
            tkd.F_PARTIALS | tkd.F_LOGITS | tkd.F_RETURNED,
            True,
        )

    make_fx(step, tracing_mode="symbolic")(cls, wp, bp, wi, bi, state["prev_pred"], state["counter"])
    assert len(launches) == 2
    for _, _, kwargs in launches:
        constexprs = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
        assert all(type(v) in (int, bool) for v in constexprs.values()), constexprs
    (head_grid, head_args, head_kw), (_, _, decide_kw) = launches
    assert head_kw["BLOCK_M"] == tkh._head_blocks(5, 64, True)[0]
    assert decide_kw["BLOCK_M"] == tkd._decide_launch(5, 3, False)[0] and decide_kw["BLOCK_C"] == 4
    assert any(isinstance(a, torch.SymInt) for a in head_args), "n was specialized to a constant"
    assert isinstance(head_grid[0], torch.SymInt), "the grid was specialized to one n"


def _compiled_at_two_batch_sizes(device: torch.device, compiler: str):
    policy = eek.Patience(1)
    wp, bp, wi, bi = (t.to(device) for t in make_head(64, 3, torch.float32, seed=92))

    def step(cls, st):
        return tk.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, st)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=compiler, fullgraph=True)
    for batch in (5, 9):
        cls = make_cls(batch, 64, torch.float32, seed=batch).to(device)
        st = {k: v.to(device) for k, v in random_state(policy, batch, 3, 64, torch.float32, seed=batch).items()}
        torch._dynamo.mark_dynamic(cls, 0)
        for value in st.values():
            torch._dynamo.mark_dynamic(value, 0)
        got = compiled(cls, dict(st))
        ref = exit_rules.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(st))
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[4]["counter"], ref[4]["counter"])


@_CPU_ONLY
def test_compile_aot_eager_with_a_dynamic_batch_cpu():
    """The user's view of the same defect: a compiled exit step called at two batch sizes with the
    batch dimension dynamic (AOTAutograd, as Inductor uses it; ``aot_eager`` runs on the CPU)."""
    _compiled_at_two_batch_sizes(CPU, "aot_eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compiles Triton kernels for a GPU")
def test_compile_inductor_with_a_dynamic_batch_cuda():
    """On a GPU the ops are triton_ops: Inductor traces their launchers with a symbolic batch."""
    _compiled_at_two_batch_sizes(torch.device("cuda"), "inductor")


@_CPU_ONLY
@pytest.mark.parametrize("write_back", [False, True], ids=["step", "step_write_back"])
def test_compile_fullgraph_captures_one_exit_step_cpu(write_back):
    """Dynamo captures a whole exit step as one graph (no graph break, no host sync) and runs it.

    The ``eager`` compiler backend runs the captured graph as it is; Inductor and AOT
    tracing need CUDA (below) because the interpreter cannot run on fake tensors.
    """
    policy = eek.Patience(1)
    wp, bp, wi, bi = make_head(64, 3, torch.float32, seed=92)
    cls = make_cls(5, 64, torch.float32, seed=91)
    state = random_state(policy, 5, 3, 64, torch.float32, seed=90)

    def buffers():
        rows = torch.tensor([6, 0, 3, 7, 2])
        outs = (torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
        return WriteBack(rows, torch.full((5,), 2), None, *outs)

    def step(cls, state, target):
        if write_back:
            return tk.head_exit_step_write_back(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, state, None, target)
        return tk.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, state)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    target_c, target_e = buffers(), buffers()
    got = compiled(cls, dict(state), target_c)
    ref = step(cls, dict(state), target_e)
    assert torch.equal(got[0], ref[0])
    for a, b in zip(target_c[3:], target_e[3:]):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="full opcheck and torch.compile need CUDA: "
    "the Triton interpreter cannot trace kernel launches with fake tensors",
)
def test_opcheck_and_compile_cuda():
    dev = torch.device("cuda")
    policy = eek.Patience(1)
    state = {k: v.to(dev) for k, v in random_state(policy, 5, 3, 16, torch.float32, seed=90).items()}
    z = torch.randn(5, 3, device=dev)
    torch.library.opcheck(torch.ops.earlyexit.exit_decide.default, _decide_args(z, state) + _DECIDE_SCALARS)
    wp, bp, wi, bi = (t.to(dev) for t in make_head(64, 3, torch.float32, seed=92))
    cls = make_cls(5, 64, torch.float32, seed=91).to(dev)
    torch.library.opcheck(torch.ops.earlyexit.exit_head.default, (cls, wp, bp, wi, True))

    for policy in (eek.Entropy(0.6), eek.Patience(1), eek.Voting(2)):
        st = exit_rules.init_state(policy, 5, 3, 64, NUM_LAYERS, dev)

        def step(cls, st, policy=policy):
            return tk.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, st)

        compiled = torch.compile(step, fullgraph=True)
        got = compiled(cls, dict(st))
        ref = exit_rules.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(st))
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)

    def settle(cls, st, target, policy=policy):
        return tk.head_exit_step_write_back(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, st, None, target)

    def buffers():
        rows = torch.tensor([6, 0, 3, 7, 2], device=dev)
        outs = (torch.zeros(8, 3, device=dev), torch.zeros(8, dtype=torch.long, device=dev))
        return WriteBack(rows, torch.full((5,), 2, device=dev), None, outs[0], outs[1], outs[1].clone())

    target_c, target_e = buffers(), buffers()
    got = torch.compile(settle, fullgraph=True)(cls, dict(st), target_c)
    ref = settle(cls, dict(st), target_e)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[3], ref[3])
    for a, b in zip(target_c[3:], target_e[3:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- hardening (issue 11)


NAN_CASES = [
    ("entropy", 2),
    ("entropy", 3),
    ("maxprob_temp", 2),
    ("patience", 2),
    ("patience", 3),
    ("patience_reg", 1),
    ("qexit", 1),
    ("qexit", 2),
    ("voting", 2),
    ("voting", 3),
    ("dact", 2),
    ("skipgates", 2),
]


@pytest.mark.parametrize("name,labels", NAN_CASES)
def test_non_finite_logits_never_crash_and_match_reference(name, labels):
    """All-NaN rows (with C = 2 the interpreter's argmax used to raise), partly NaN and inf rows."""
    policy = make_policy(name, 6)
    z = torch.randn(6, labels, generator=torch.Generator().manual_seed(3)) * 2
    z[0] = float("nan")
    z[1, 0] = float("nan")
    z[2, -1] = float("inf")
    z[3] = float("-inf")
    state = random_state(policy, 6, labels, 16, torch.float32, seed=4)
    halting = torch.randn(6) if policy.needs_halting_head else None
    if halting is not None:
        halting[4] = float("nan")
    for layer in (2, NUM_LAYERS):
        ref = exit_rules.exit_step(policy, layer, NUM_LAYERS, z, halting, dict(state))
        got = on_kernel_device(tk.exit_step)(policy, layer, NUM_LAYERS, z, halting, dict(state))
        assert torch.equal(got[0], ref[0]), (layer, got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1], rtol=FLOAT_ULPS * 2**-23, atol=RETURNED_ATOL, equal_nan=True)
        assert_state_equal_fp32(got[2], ref[2])


@pytest.mark.parametrize("name", ["patience", "voting", "dact"])
def test_head_with_a_nan_row_matches_reference(name):
    """The fused head on a [CLS] row of NaN (C = 2): NaN logits, no crash, the reference's decisions."""
    policy = make_policy(name, 5)
    wp, bp, wi, bi = make_head(64, 2, torch.float32, seed=5)
    cls = make_cls(5, 64, torch.float32, seed=6)
    cls[2] = float("nan")
    state = random_state(policy, 5, 2, 64, torch.float32, seed=7)
    halting_fn = halting_fn_for(policy, 64, torch.float32, seed=8)
    ref = exit_rules.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn)
    got = on_kernel_device(tk.head_exit_step)(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn)
    assert bool(torch.isnan(got[2][2]).all()) and not bool(got[0][2])
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_strided_biases():
    """Pooler and head biases as strided views (every other / every third element of a buffer)."""
    policy = eek.Voting(1)
    wp, _, wi, _ = make_head(64, 3, torch.float32, seed=90)
    g = torch.Generator().manual_seed(91)
    bp = (torch.randn(128, generator=g) * 0.5)[::2]
    bi = (torch.randn(9, generator=g) * 2.0)[::3]
    assert bp.stride(0) == 2 and bi.stride(0) == 3
    cls = make_cls(9, 64, torch.float32, seed=92)
    state = random_state(policy, 9, 3, 64, torch.float32, seed=93)
    ref = exit_rules.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state))
    got = on_kernel_device(tk.head_exit_step)(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state))
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], ref[0])
    assert_state_equal_fp32(got[4], ref[4])


def _target(active, batch, labels, dtype=torch.float32, extents=True):
    g = torch.Generator().manual_seed(active)
    rows = torch.randperm(batch, generator=g)[:active]
    return WriteBack(
        rows,
        torch.randint(1, 4, (active,), generator=g),
        torch.randint(1, 30, (active,), generator=g) if extents else None,
        torch.zeros(batch, labels, dtype=dtype),
        torch.zeros(batch, dtype=torch.long),
        torch.zeros(batch, dtype=torch.long),
    )


def _copy(target):
    return WriteBack(*(t.clone() if t is not None else None for t in target))


OPS_PATH_POLICIES = ["entropy_norm_per_layer", "maxprob_temp", "patience", "patience_reg", "qexit_stochastic", "dact"]


@pytest.mark.parametrize("name", OPS_PATH_POLICIES)
def test_eager_launches_equal_the_registered_ops(name, monkeypatch):
    """Eager calls launch directly; torch.compile runs the registered ops: both give the same bits."""
    batch, labels, hidden = 17, 1 if name == "patience_reg" else 3, 64
    policy = make_policy(name, batch)
    wp, bp, wi, bi = make_head(hidden, labels, torch.float32, seed=100)
    cls = make_cls(batch, hidden, torch.float32, seed=101)
    state = random_state(policy, batch, labels, hidden, torch.float32, seed=102)
    halting_fn = halting_fn_for(policy, hidden, torch.float32, seed=103)
    z = torch.randn(batch, labels, generator=torch.Generator().manual_seed(104)) * 2
    halting = torch.randn(batch) if policy.needs_halting_head else None
    target = _target(batch, 40, labels)

    def run_all():
        t1, t2 = _copy(target), _copy(target)
        return (
            on_kernel_device(tk.exit_step)(policy, 3, NUM_LAYERS, z, halting, dict(state)),
            on_kernel_device(tk.head_exit_step)(policy, 3, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn),
            on_kernel_device(tk.exit_step_write_back)(policy, 3, NUM_LAYERS, z, halting, dict(state), t1),
            on_kernel_device(tk.head_exit_step_write_back)(
                policy, 3, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn, t2
            ),
            t1,
            t2,
        )

    def forbidden(*args, **kwargs):
        raise AssertionError("an eager call went through the registered op")

    with monkeypatch.context() as m:
        m.setattr(torch.ops.earlyexit, "exit_decide", forbidden)
        m.setattr(torch.ops.earlyexit, "exit_head", forbidden)
        direct = poisoned(run_all)
    monkeypatch.setattr(tk, "_use_ops", lambda: True)
    through_ops = poisoned(run_all)
    _assert_identical(direct, through_ops)


def test_a_dispatch_mode_sees_the_ops():
    """Under a dispatch mode (fake tensors, make_fx, op counting) the wrappers call the registered ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    from earlyexit_kernels.backends.triton_kernels import compact as tc

    policy = eek.Entropy(0.6)
    weights = [t.to(KERNEL_DEVICE) for t in make_head(64, 3, torch.float32, seed=110)]
    cls = make_cls(5, 64, torch.float32, seed=111).to(KERNEL_DEVICE)
    hidden = torch.randn(5, 6, 32, device=KERNEL_DEVICE)
    target = WriteBack(*(t.to(KERNEL_DEVICE) if t is not None else None for t in _target(5, 8, 3)))
    with Recording():
        tk.head_exit_step_write_back(policy, 2, NUM_LAYERS, cls, *weights, {}, None, target)
        tc.compact(hidden, None, torch.tensor([0, 3], device=KERNEL_DEVICE), 4)
    assert {"exit_head", "exit_decide", "compact"} <= set(seen), seen


def _kernel_spy(monkeypatch, module, name, launches):
    """Record every launch of ``module.name`` as (kernel name, positional args, kwargs, guard device)."""
    kernel = getattr(module, name)
    original = kernel.run

    def run(*args, grid, warmup, **kwargs):
        launches.append((name, args, kwargs, _GUARD[-1] if _GUARD else None))
        return original(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kernel, "run", run)
    return kernel


_GUARD: list = []


def _param_names(kernel):
    if hasattr(kernel, "params"):  # compiled (a JITFunction has arg_names too since Triton 3.6)
        names = [p.name for p in kernel.params]
        return names, {p.name for p in kernel.params if p.do_not_specialize}
    return kernel.arg_names, set(kernel.kwargs.get("do_not_specialize") or ())  # the interpreter


def test_per_call_integers_do_not_make_new_kernel_variants(monkeypatch):
    """Triton compiles one variant per specialization key: an integer equal to 1 or a multiple
    of 16 gets its own. The row count, layer, layers left, batch size and trimmed length change
    from call to call and must not be in the key (computed here as Triton computes it)."""
    from earlyexit_kernels.backends.triton_kernels import compact as tc

    monkeypatch.setattr(tc, "FORCE_GPU_BLOCKS", True)  # a block of 4 positions for every length below
    launches = []
    kernels = {
        "_head_kernel": _kernel_spy(monkeypatch, tkh, "_head_kernel", launches),
        "_decide_kernel": _kernel_spy(monkeypatch, tkd, "_decide_kernel", launches),
        "_compact_kernel": _kernel_spy(monkeypatch, tc, "_compact_kernel", launches),
    }
    policy = eek.Patience(1)
    dev = KERNEL_DEVICE
    weights = [t.to(dev) for t in make_head(64, 3, torch.float32, seed=120)]
    hidden = torch.randn(16, 40, 1024, device=dev)
    # rows 1, 2, 15, 16 (one block of 16 rows), layers 1, 16, 17 of 33, batches 1, 32, 33, 48
    for n, layer, batch, length in ((1, 1, 1, 4), (2, 16, 32, 16), (15, 17, 33, 17), (16, 32, 48, 33)):
        cls = torch.randn(n, 5, 64, device=dev)[:, 0]
        state = exit_rules.init_state(policy, n, 3, 64, 33, dev)
        target = WriteBack(
            torch.arange(n, device=dev),
            torch.ones(n, dtype=torch.long, device=dev),
            None,
            torch.zeros(batch, 3, device=dev),
            torch.zeros(batch, dtype=torch.long, device=dev),
            torch.zeros(batch, dtype=torch.long, device=dev),
        )
        tk.head_exit_step_write_back(policy, layer, 33, cls, *weights, state, None, target)
        tc.compact(hidden[:2], None, torch.tensor([1, 0], device=dev), length)
    keys = _specialization_keys(launches, kernels)
    assert set(keys) == set(kernels)
    for name, variants in keys.items():
        assert len(variants) == 1, f"{name}: {len(variants)} compiled variants for one configuration"


def _specialization_keys(launches, kernels) -> dict[str, set]:
    """Per kernel, the distinct (specialization, constexprs) keys Triton would compile."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    keys: dict[str, set] = {}
    for name, args, kwargs, _ in launches:
        names, unspecialized = _param_names(kernels[name])
        spec = tuple(
            native_specialize_impl(BaseBackend, value, False, names[i] not in unspecialized, True)
            for i, value in enumerate(args)
        )
        keys.setdefault(name, set()).add((spec, tuple(sorted(kwargs.items()))))
    return keys


@pytest.mark.parametrize("write_back", [False, True], ids=["step", "write_back"])
def test_row_counts_and_lengths_do_not_make_new_variants_on_a_gpu(monkeypatch, write_back):
    """The cold start: with the GPU's block sizes, row counts in different powers of two (1 to
    300, as compaction leaves them) and masks of any length (a multiple of 16 or not) launch one
    compiled variant per kernel; block sizes chosen from n and a specialized mask stride compiled
    15-25 variants over a process's first batches."""
    from earlyexit_kernels.backends.triton_kernels import compact as tc

    monkeypatch.setattr(tkh, "FORCE_GPU_BLOCKS", True)
    monkeypatch.setattr(tkd, "FORCE_GPU_BLOCKS", True)
    monkeypatch.setattr(tc, "FORCE_GPU_BLOCKS", True)
    launches = []
    kernels = {
        "_head_kernel": _kernel_spy(monkeypatch, tkh, "_head_kernel", launches),
        "_decide_kernel": _kernel_spy(monkeypatch, tkd, "_decide_kernel", launches),
        "_compact_kernel": _kernel_spy(monkeypatch, tc, "_compact_kernel", launches),
    }
    policy = eek.Entropy(0.6)
    dev = KERNEL_DEVICE
    weights = [t.to(dev) for t in make_head(64, 3, torch.float32, seed=121)]
    for n, full, length in ((1, 33, 4), (17, 48, 16), (40, 64, 47), (100, 40, 33), (300, 96, 80)):
        cls = torch.randn(n, 5, 64, device=dev)[:, 0]
        if write_back:
            target = WriteBack(*(t.to(dev) if t is not None else None for t in _write_back_target(n, n + 3, 3)))
            tk.head_exit_step_write_back(policy, 2, NUM_LAYERS, cls, *weights, {}, None, target)
        else:
            tk.head_exit_step(policy, 2, NUM_LAYERS, cls, *weights, {})
        hidden, mask = torch.randn(3, full, 32, device=dev), torch.ones(3, full, dtype=torch.long, device=dev)
        tc.compact(hidden, mask, torch.tensor([2, 0], device=dev), length)
    keys = _specialization_keys(launches, kernels)
    assert set(keys) == set(kernels)
    for name, variants in keys.items():
        assert len(variants) == 1, f"{name}: {len(variants)} compiled variants for one model"


def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Triton launches on the current device: each launch must be inside a guard for its tensors'
    device (checked here by recording the guard; on two GPUs by test_model_on_second_gpu)."""
    import contextlib

    from earlyexit_kernels.backends.triton_kernels import compact as tc

    @contextlib.contextmanager
    def recording_guard(tensor):
        _GUARD.append(tensor.device)
        try:
            yield
        finally:
            _GUARD.pop()

    monkeypatch.setattr(tkh, "device_guard", recording_guard)
    monkeypatch.setattr(tkd, "device_guard", recording_guard)
    monkeypatch.setattr(tc, "device_guard", recording_guard)
    launches = []
    _kernel_spy(monkeypatch, tkh, "_head_kernel", launches)
    _kernel_spy(monkeypatch, tkd, "_decide_kernel", launches)
    _kernel_spy(monkeypatch, tc, "_compact_kernel", launches)
    policy = eek.Entropy(0.6)
    dev = KERNEL_DEVICE
    weights = [t.to(dev) for t in make_head(64, 3, torch.float32, seed=130)]
    cls = make_cls(5, 64, torch.float32, seed=131).to(dev)
    target = WriteBack(*(t.to(dev) if t is not None else None for t in _target(5, 8, 3)))
    tk.head_exit_step_write_back(policy, 2, NUM_LAYERS, cls, *weights, {}, None, target)
    tk.exit_step(policy, 2, NUM_LAYERS, torch.randn(5, 3, device=dev), None, {})
    tc.compact(torch.randn(4, 6, 32, device=dev), None, torch.tensor([0, 3], device=dev), 4)
    assert [name for name, *_ in launches] == ["_head_kernel", "_decide_kernel", "_decide_kernel", "_compact_kernel"]
    for name, args, _, guarded in launches:
        assert guarded is not None and guarded == args[0].device, name


_TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (a model on cuda:1 while cuda:0 is current)"
)


@_TWO_GPUS
def test_model_on_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every kernel runs on cuda:1 and reads the right memory."""
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    for name in ("entropy", "patience", "dact"):
        policy = make_policy(name, 17)
        wp, bp, wi, bi = make_head(384, 3, torch.float32, seed=140)
        cls = make_cls(17, 384, torch.float32, seed=141)
        state = random_state(policy, 17, 3, 384, torch.float32, seed=142)
        halting_fn = halting_fn_for(policy, 384, torch.float32, seed=143)
        ref = exit_rules.head_exit_step(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn)
        got = on_device(tk.head_exit_step, dev)(policy, 2, NUM_LAYERS, cls, wp, bp, wi, bi, dict(state), halting_fn)
        assert torch.cuda.current_device() == 0
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
        target, expected = _target(17, 40, 3), _target(17, 40, 3)
        got_wb = on_device(tk.exit_step_write_back, dev)(policy, 2, NUM_LAYERS, ref[2], ref[3], dict(state), target)
        exits, _, order, stats = write_back_reference(policy, ref[2], ref[3], dict(state), expected)
        assert torch.equal(got_wb[0], exits) and torch.equal(got_wb[3], stats)
        for a, b in zip(target[3:], expected[3:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def write_back_reference(policy, logits, halting, state, target):
    from earlyexit_kernels.backends import write_back as wb

    return wb.exit_step_write_back(policy, 2, NUM_LAYERS, logits, halting, state, target)
