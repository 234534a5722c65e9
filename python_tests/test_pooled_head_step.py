"""The fused per-layer step of an internal exit head (``cpp_pooled_head_exit_step``).

One call pools each row ([CLS] or the masked mean), runs the head (the model's tanh pooler and a
Linear, or the MLP head: LayerNorm, Linear, GELU, Linear), applies the rule, writes the exiting
rows back and lists the survivors. Against its PyTorch reference
(:func:`earlyexit_kernels.backends.pooled_head.pooled_head_exit_step`, same signature): the
logits within a few times PyTorch float32's own error against float64, the decisions and state
equal, the write-back equal; a row's bits whatever batch it is in; the engines' use of it; its errors.
"""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from pooled_head_cases import (
    DECISION_ROWS,
    decision_case,
    decision_policies,
    layer_output,
    make_head,
    write_back_target,
)
from threshold_helpers import midway, randomize_heads

import earlyexit_kernels as eek
from earlyexit_kernels.backends import cpp_backend, pooled_head
from earlyexit_kernels.backends.pooled_head import FusedExitHead, pooled_head_exit_step
from earlyexit_kernels.methods.exit_rules import init_state

if not eek.backends()["cpp"]:
    pytest.fail(f"the C++ backend must be built for these tests: {eek.backend_status()['cpp']}", pytrace=False)

L = 6
OP_NAME = "earlyexit::cpp_pooled_head_exit_step"


def _float64_logits(hidden, mask, head):
    h64 = FusedExitHead(
        *(
            getattr(head, f).double() if torch.is_tensor(getattr(head, f)) else getattr(head, f)
            for f in head.__dataclass_fields__
        )
    )
    logits, _ = pooled_head.pooled_head_logits(hidden.double(), mask, h64)
    return logits


# (rows, length, H, M): short last blocks of 4 rows; H and M multiples of 8, 16 and of neither
SHAPES = [(1, 3, 8, 8), (5, 7, 40, 24), (9, 16, 64, 64), (17, 33, 100, 52), (32, 40, 384, 384)]


@pytest.mark.parametrize("kind", ["model", "mlp"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("rows,length,hidden,width", SHAPES)
def test_logits_within_pytorch_float32_error(kind, pooling, rows, length, hidden, width):
    head = make_head(kind, pooling, hidden, width if kind == "mlp" else hidden, 3, seed=hidden)
    x, mask = layer_output(rows, length, hidden, seed=rows)
    policy = eek.Entropy(0.5)
    state = init_state(policy, rows, 3, hidden, L, torch.device("cpu"))
    with torch.no_grad():
        _, _, ours, _ = cpp_backend.pooled_head_exit_step(policy, 2, L, x, mask, head, dict(state))
        _, _, theirs, _ = pooled_head_exit_step(policy, 2, L, x, mask, head, dict(state))
    exact = _float64_logits(x, mask, head)
    assert torch.isfinite(ours).all(), "a padded position was read"
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    assert ours_err <= 4 * theirs_err + 1e-5, f"error {ours_err:.2e} against PyTorch float32's {theirs_err:.2e}"


@pytest.mark.parametrize("kind", ["model", "mlp"])
@pytest.mark.parametrize("policy", decision_policies(), ids=repr)
def test_decisions_state_and_write_back_equal_the_reference(kind, policy):
    head, x, mask, state = decision_case(kind, policy)
    rows = DECISION_ROWS

    def run(step):
        target = write_back_target(rows, 3, 3, L)
        with torch.no_grad():
            exits, new_state, order, stats = step(policy, 3, L, x, mask, head, dict(state), target)
        return exits, new_state, order, stats, target

    fast = run(cpp_backend.pooled_head_exit_step_write_back)
    ref = run(pooled_head.pooled_head_exit_step_write_back)
    assert torch.equal(fast[0], ref[0])
    assert 0 < int(fast[0].sum()) < rows, "the test needs rows that leave and rows that stay"
    for key in ref[1]:
        torch.testing.assert_close(fast[1][key], ref[1][key], rtol=1e-4, atol=1e-5)
    # the same survivors in the same order first, then the exiting rows (in any order) and the same stats
    kept = int(ref[3][0])
    # (count, longest), the count alone from the fast op where the target has no extents
    assert torch.equal(fast[3], ref[3][: fast[3].numel()]) and torch.equal(fast[2][:kept], ref[2][:kept])
    assert sorted(fast[2][kept:].tolist()) == sorted(ref[2][kept:].tolist())
    for a, b in zip((fast[4].exit_layer, fast[4].layers_run), (ref[4].exit_layer, ref[4].layers_run)):
        assert torch.equal(a, b)
    torch.testing.assert_close(fast[4].logits, ref[4].logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["model", "mlp"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bfloat16_within_pytorch_bfloat16_error_and_the_same_decisions(kind, pooling):
    rows, length, hidden, width = 29, 14, 64, 48
    head = make_head(kind, pooling, hidden, width if kind == "mlp" else hidden, 3, seed=11)
    head16 = FusedExitHead(
        *(
            getattr(head, f).bfloat16() if torch.is_tensor(getattr(head, f)) else getattr(head, f)
            for f in head.__dataclass_fields__
        )
    )
    x, mask = layer_output(rows, length, hidden, seed=12)
    x16 = x.bfloat16()
    policy = eek.MaxProb(0.7)
    state = init_state(policy, rows, 3, hidden, L, torch.device("cpu"))
    with torch.no_grad():
        fast = cpp_backend.pooled_head_exit_step(policy, 2, L, x16, mask, head16, dict(state))
        ref = pooled_head_exit_step(policy, 2, L, x16, mask, head16, dict(state))
        called = _ops_called(lambda: cpp_backend.pooled_head_exit_step(policy, 2, L, x16, mask, head16, dict(state)))
    assert OP_NAME in called
    assert fast[2].dtype == torch.bfloat16
    exact = _float64_logits(x16.double(), mask, head16)
    ours = (fast[2].double() - exact).abs().max().item()
    theirs = (ref[2].double() - exact).abs().max().item()
    assert ours <= 2 * theirs + 1e-3, f"error {ours:.2e} against PyTorch bfloat16's {theirs:.2e}"
    # the decisions: equal wherever the reference's probability is clear of the threshold by more
    # than two bfloat16 steps of the logits can move it
    top = ref[2].float().softmax(-1).amax(-1)
    clear = (top - policy.threshold).abs() > 0.02
    assert int(clear.sum()) > rows // 2 and 0 < int(ref[0][clear].sum()) < int(clear.sum())
    assert torch.equal(fast[0][clear], ref[0][clear])


def test_a_row_gets_the_same_bits_in_any_batch():
    head = make_head("mlp", "mean", 64, 64, 2, seed=1)
    x, mask = layer_output(13, 9, 64, seed=2)
    policy = eek.Entropy(0.5)

    def logits(rows):
        state = init_state(policy, len(rows), 2, 64, L, torch.device("cpu"))
        with torch.no_grad():
            return cpp_backend.pooled_head_exit_step(policy, 1, L, x[rows], mask[rows], head, state)[2]

    whole = logits(list(range(13)))
    for rows in ([0], [5], [3, 4, 5, 6, 7, 8], [12], [12, 0, 7]):
        assert torch.equal(logits(rows), whole[rows])


def test_no_mask_pools_every_position():
    head = make_head("mlp", "mean", 24, 16, 2, seed=4)
    x, _ = layer_output(6, 5, 24, seed=5)
    x = x.nan_to_num()
    policy = eek.Entropy(0.5)
    state = init_state(policy, 6, 2, 24, L, torch.device("cpu"))
    with torch.no_grad():
        ours = cpp_backend.pooled_head_exit_step(policy, 1, L, x, None, head, dict(state))[2]
        full = cpp_backend.pooled_head_exit_step(policy, 1, L, x, torch.ones(6, 5), head, dict(state))[2]
        theirs = pooled_head_exit_step(policy, 1, L, x, None, head, dict(state))[2]
    assert torch.equal(ours, full)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_no_rows():
    head = make_head("mlp", "mean", 16, 16, 2, seed=1)
    policy = eek.Entropy(0.5)
    state = init_state(policy, 0, 2, 16, L, torch.device("cpu"))
    with torch.no_grad():
        exits, returned, logits, _ = cpp_backend.pooled_head_exit_step(
            policy, 1, L, torch.zeros(0, 4, 16), torch.zeros(0, 4), head, state
        )
    assert exits.shape == (0,) and returned.shape == (0, 2) and logits.shape == (0, 2)


def test_bad_input_says_what_to_fix():
    head = make_head("mlp", "mean", 16, 8, 2, seed=1)
    policy = eek.Entropy(0.5)
    state = init_state(policy, 3, 2, 16, L, torch.device("cpu"))
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"mask must be \[n, S\] = \[3, 4\]"):
        cpp_backend.pooled_head_exit_step(policy, 1, L, torch.zeros(3, 4, 16), torch.ones(3, 5), head, state)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"dense_weight_t must be \[H, M\] with H = 12"):
        cpp_backend.pooled_head_exit_step(policy, 1, L, torch.zeros(3, 4, 12), None, head, state)
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean'"):
        FusedExitHead("max", head.dense_weight, head.dense_bias, "gelu", head.out_weight, head.out_bias)
    with pytest.raises(ValueError, match=r"out_weight must be \[C, 8\]"):
        FusedExitHead("mean", head.dense_weight, head.dense_bias, "gelu", head.out_weight.t(), head.out_bias)


def _ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def _run(policy, backend, batch, pooling, head, all_exits=False, dtype=torch.float32):
    model = tiny_model("bert", num_labels=3, num_layers=L).to(dtype)
    eek.patch(model, policy, backend=backend, pooling=pooling, head=head)
    randomize_heads(model, seed=3)
    with torch.no_grad():  # less sure MLP heads than randomize_heads gives: entropies spread over (0, ln 3)
        for classifier in model.early_exit_heads.classifiers if head == "mlp" else ():
            last = getattr(classifier, "out", classifier)
            last.weight.mul_(0.15)
            last.bias.mul_(0.15)
    ids, mask, tt = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=tt, return_all_exits=all_exits)


@pytest.mark.parametrize("pooling,head", [("mean", "mlp"), ("cls", "mlp"), ("mean", "model"), ("cls", "model")])
def test_the_engine_runs_the_fused_step_and_agrees_with_the_torch_backend(pooling, head):
    batch = tiny_batch(24, 12, seed=5)
    z = _run(eek.Patience(1), "torch", batch, pooling, head, all_exits=True).all_logits.float()
    log_p = z.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)[:-1]
    # between the first layer's values (some rows leave there, some go on), clear of every layer's
    policy = eek.Entropy(midway(entropy, around=entropy[0], min_margin=1e-4))
    expected = _run(policy, "torch", batch, pooling, head)
    called = _ops_called(lambda: _run(policy, "cpp", batch, pooling, head))
    got = _run(policy, "cpp", batch, pooling, head)
    assert OP_NAME in called
    assert torch.equal(got.exit_layer, expected.exit_layer)
    assert len(set(expected.exit_layer.tolist())) > 1, "the test needs rows that leave at different layers"
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)


def test_a_bfloat16_model_runs_the_fused_step_and_mostly_agrees_with_the_torch_backend():
    batch = tiny_batch(24, 12, seed=5)
    z = _run(eek.Patience(1), "torch", batch, "mean", "mlp", all_exits=True).all_logits.float()
    log_p = z.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)[:-1]
    policy = eek.Entropy(midway(entropy, around=entropy[0], min_margin=1e-4))
    expected = _run(policy, "torch", batch, "mean", "mlp", dtype=torch.bfloat16)
    assert OP_NAME in _ops_called(lambda: _run(policy, "cpp", batch, "mean", "mlp", dtype=torch.bfloat16))
    got = _run(policy, "cpp", batch, "mean", "mlp", dtype=torch.bfloat16)
    same = got.exit_layer == expected.exit_layer
    assert int(same.sum()) >= 20, "bfloat16 rounding may move a decision near the threshold, not most of them"
    torch.testing.assert_close(got.logits[same].float(), expected.logits[same].float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("kind", ["model", "mlp"])
@pytest.mark.parametrize("policy", decision_policies(), ids=lambda p: type(p).__name__)
def test_the_prepared_step_is_the_step_bit_for_bit_at_every_size(kind, policy):
    """``prepare_pooled_head_exit_step``: the weights and rule made ready once, as an engine calls one layer's head
    at every layer call. The same exits, outputs and state as the step made at each call, within the fused op's
    reach and past it (where the step runs PyTorch's head), and with the other pooling."""
    from pooled_head_cases import DECISION_LAYERS

    head, x, mask, state = decision_case(kind, policy)
    prepared = cpp_backend.prepare_pooled_head_exit_step(policy, 3, DECISION_LAYERS, head)
    reach = cpp_backend.CPU_POOLED_HEAD_MAX_WORK // (head.dense_weight.numel() * torch.get_num_threads())
    wide = torch.randn(reach + 1, 2, x.shape[2], generator=torch.Generator().manual_seed(1))  # past the fused reach
    assert wide.shape[0] * head.dense_weight.numel() * torch.get_num_threads() > cpp_backend.CPU_POOLED_HEAD_MAX_WORK
    wide_state = init_state(policy, wide.shape[0], 3, x.shape[2], DECISION_LAYERS, torch.device("cpu"))
    with torch.no_grad():
        for hidden, rows_mask, rows_state in ((x, mask, state), (x, None, state), (wide, None, wide_state)):
            exits, returned, _, expected = cpp_backend.pooled_head_exit_step(
                policy, 3, DECISION_LAYERS, hidden, rows_mask, head, dict(rows_state)
            )
            got = prepared(hidden, rows_mask, dict(rows_state))
            # bit for bit, NaN where the step reads the NaN padding the cases put where a mask hides it
            torch.testing.assert_close(got[:2], (exits, returned), rtol=0, atol=0, equal_nan=True)
            assert got[2].keys() == expected.keys()
            torch.testing.assert_close(got[2], expected, rtol=0, atol=0, equal_nan=True)
    cls_head = make_head(kind, "cls", x.shape[2], 32 if kind == "mlp" else x.shape[2], 3, seed=8)
    cls_step = cpp_backend.prepare_pooled_head_exit_step(policy, 3, DECISION_LAYERS, cls_head)
    with torch.no_grad():
        expected = cpp_backend.pooled_head_exit_step(policy, 3, DECISION_LAYERS, x, mask, cls_head, dict(state))
        got = cls_step(x, mask, dict(state))
    torch.testing.assert_close(got[:2], expected[:2], rtol=0, atol=0, equal_nan=True)


def test_no_prepared_step_where_the_head_s_tensors_are_of_two_dtypes():
    head = make_head("mlp", "mean", 48, 32, 3, seed=7)
    mixed = FusedExitHead(**{**vars(head), "out_weight": head.out_weight.double()})
    assert cpp_backend.prepare_pooled_head_exit_step(eek.Entropy(0.5), 3, L, mixed) is None
