"""The Triton whole per-layer step of an internal exit head, against its PyTorch reference.

:func:`earlyexit_kernels.backends.triton_kernels.pooled_head_step.pooled_head_exit_step` pools
each row ([CLS] or the masked mean), runs the head (the model's tanh pooler and a Linear, or the
MLP head: LayerNorm, Linear, GELU, Linear) and the rule, and with a target writes the exiting rows
back and orders the survivors: at most three launches, nothing read back. Against
:func:`earlyexit_kernels.backends.pooled_head.pooled_head_exit_step` (same signature): the logits
within a few times PyTorch's own error in the same dtype against float64, decisions, state and
write-back equal where no decision quantity sits within rounding of its threshold, every output
written (poisoned buffers), the ops' schemas and fake kernels, the engine's use of it, its errors.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, mlp_head_model, on_kernel_device, tiny_batch  # noqa: E402
from pooled_head_cases import (  # noqa: E402
    DECISION_ROWS,
    decision_case,
    decision_policies,
    head_as,
    layer_output,
    make_head,
    write_back_target,
)
from threshold_helpers import midway  # noqa: E402

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.backends import pooled_head  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import pooled_head_step as tp  # noqa: E402
from earlyexit_kernels.backends.triton_kernels._common import interpreting, poisoned_outputs  # noqa: E402
from earlyexit_kernels.methods.exit_rules import init_state  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: masked -inf lanes

if not eek.backends()["triton"]:
    pytest.skip(f"backend 'triton': {eek.backend_status()['triton']}", allow_module_level=True)

L = 6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _step(policy, layer, hidden, mask, head, state):
    return on_kernel_device(tp.pooled_head_exit_step)(policy, layer, L, hidden, mask, head, state)


# Triton's interpreter rounds float32 to bf16 by truncation (525 of 1,024 random values differ from
# PyTorch's round-to-nearest), so each of the head's three roundings may be off by a whole unit:
# over 36 seeded MLP heads at H = 100 its bf16 error was 3.3-4.3 half-units of the largest logit
# beyond which PyTorch's own was 0.5-1.4. A GPU rounds to nearest.
_BF16_SLACK = 8 if interpreting() else 2

# (rows, length, H, M): H and M powers of two and not, a last row block cut short
SHAPES = [(1, 3, 16, 16), (9, 16, 40, 24), (17, 33, 100, 52)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind,pooling", [("model", "cls"), ("model", "mean"), ("mlp", "cls"), ("mlp", "mean")])
@pytest.mark.parametrize("rows,length,hidden,width", SHAPES)
def test_logits_within_pytorch_own_error(dtype, kind, pooling, rows, length, hidden, width):
    low = DTYPES[dtype]
    head = make_head(kind, pooling, hidden, width if kind == "mlp" else hidden, 3, seed=hidden, dtype=low)
    x, mask = layer_output(rows, length, hidden, seed=rows, dtype=low)
    policy = eek.Entropy(0.5)
    state = init_state(policy, rows, 3, hidden, L, torch.device("cpu"))
    with torch.no_grad(), poisoned_outputs("a"):
        _, _, ours, _ = _step(policy, 2, x, mask, head, dict(state))
        _, _, theirs, _ = pooled_head.pooled_head_exit_step(policy, 2, L, x, mask, head, dict(state))
        exact, _ = pooled_head.pooled_head_logits(x.double(), mask, head_as(head, torch.float64))
    assert ours.dtype == low and torch.isfinite(ours).all(), "an output was not written, or padding was read"
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    half_ulp = exact.abs().max().item() * (2.0**-8 if low == torch.bfloat16 else 2.0**-24)
    assert ours_err <= 2 * theirs_err + _BF16_SLACK * half_ulp + 1e-6, (
        f"error {ours_err:.2e} against PyTorch's {theirs_err:.2e}"
    )


@pytest.mark.parametrize("kind", ["model", "mlp"])
@pytest.mark.parametrize("policy", decision_policies(), ids=repr)
def test_decisions_state_and_write_back_equal_the_reference(kind, policy):
    head, x, mask, state = decision_case(kind, policy)
    rows = DECISION_ROWS

    def run(step, poison="a"):
        target = write_back_target(rows, 3, 3, L)
        with torch.no_grad(), poisoned_outputs(poison):
            exits, new_state, order, stats = step(policy, 3, L, x, mask, head, dict(state), target)
        return exits, new_state, order, stats, target

    expected = run(pooled_head.pooled_head_exit_step_write_back)
    for poison in ("a", "b"):
        got = run(on_kernel_device(tp.pooled_head_exit_step_write_back), poison)
        assert torch.equal(got[0], expected[0])
        assert got[1].keys() == expected[1].keys()
        for key in expected[1]:
            torch.testing.assert_close(got[1][key], expected[1][key], rtol=1e-5, atol=1e-6)
        count = int(expected[3][0])
        assert int(got[3][0]) == count and torch.equal(got[2][:count], expected[2][:count])
        for mine, theirs in zip(got[4][3:], expected[4][3:]):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert 0 < count < rows, "the test needs rows that stay and rows that leave"


def test_the_pooled_rows_ignore_padding_and_an_empty_row_pools_to_zeros():
    # A row's pooled vector depends only on its valid tokens: changing padding changes nothing.
    head = make_head("mlp", "mean", 32, 16, 2, seed=1)
    x, mask = layer_output(6, 10, 32, seed=2)
    policy = eek.Entropy(0.5)
    state = init_state(policy, 6, 2, 32, L, torch.device("cpu"))
    with torch.no_grad():
        _, _, first, _ = _step(policy, 1, x, mask, head, dict(state))
        noisy = torch.where(mask[:, :, None] == 0, torch.full_like(x, 1e4), x)
        _, _, second, _ = _step(policy, 1, noisy, mask, head, dict(state))
        reference, _ = pooled_head.pooled_head_logits(x, mask, head)
    assert torch.equal(first, second)
    torch.testing.assert_close(first[2], reference[2], rtol=1e-5, atol=1e-5)  # row 2 has no valid token


def test_no_mask_means_every_token_is_valid():
    head = make_head("mlp", "mean", 24, 24, 3, seed=4)
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(5))
    policy = eek.MaxProb(0.5)
    state = init_state(policy, 5, 3, 24, L, torch.device("cpu"))
    with torch.no_grad():
        _, _, ours, _ = _step(policy, 1, x, None, head, dict(state))
        _, _, theirs, _ = pooled_head.pooled_head_exit_step(policy, 1, L, x, None, head, dict(state))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_errors_say_what_to_fix():
    head = make_head("mlp", "mean", 16, 8, 2, seed=0)
    x, mask = layer_output(4, 5, 16, seed=0)
    policy = eek.Entropy(0.5)
    state = init_state(policy, 4, 2, 16, L, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"hidden must be \[n, S, H\]"):
        tp.pooled_head_exit_step(policy, 1, L, x[:, 0], mask, head, dict(state))
    with pytest.raises(ValueError, match="takes 16 features, hidden has 12"):
        tp.pooled_head_exit_step(policy, 1, L, x[..., :12], mask, head, dict(state))
    with pytest.raises(ValueError, match=r"mask must be \[4, 5\]"):
        tp.pooled_head_exit_step(policy, 1, L, x, mask[:, :4], head, dict(state))
    with pytest.raises(TypeError, match="must share one dtype"):
        tp.pooled_head_exit_step(policy, 1, L, x.double(), mask, head, dict(state))
    with pytest.raises(ValueError, match="QExit needs a halting head"):
        tp.pooled_head_exit_step(eek.QExit(0.5), 1, L, x, mask, head, {})


_CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.skipif(KERNEL_DEVICE.type != "cpu", reason="the interpreter's opcheck; a GPU runs the launches natively")
def test_opcheck_of_the_pooling_and_the_gelumake_head():
    x, mask = layer_output(5, 7, 32, seed=6)
    head = make_head("mlp", "mean", 32, 16, 3, seed=6)
    x = x.contiguous()
    torch.library.opcheck(
        torch.ops.earlyexit.pool_norm.default,
        (x, mask, head.norm_weight, head.norm_bias, 1e-5, True),
        test_utils=_CPU_OPCHECK,
    )
    torch.library.opcheck(
        torch.ops.earlyexit.pool_norm.default, (x, None, None, None, 1e-5, False), test_utils=_CPU_OPCHECK
    )
    rows = torch.randn(5, 32)
    torch.library.opcheck(
        torch.ops.earlyexit.exit_head.default,
        (rows, head.dense_weight, head.dense_bias, head.out_weight, True, True),
        test_utils=_CPU_OPCHECK,
    )


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_engine_runs_mlp_heads_as_the_fused_step_and_agrees_with_torch():
    """A patched model with mean-pooled MLP heads on the triton backend runs each exiting layer's
    pooling, head and rule as the three kernels (``test_launch_budget.py`` counts them), and its
    exits and logits are the torch backend's."""
    model = mlp_head_model(seed=3).to(KERNEL_DEVICE)
    ids, mask, _ = tiny_batch(10, 14, seed=2)
    inputs = dict(input_ids=ids.to(KERNEL_DEVICE), attention_mask=mask.to(KERNEL_DEVICE))
    with torch.no_grad():
        values = model(**inputs, return_all_exits=True).all_logits[:-1].float().softmax(-1)
        entropies = -(values * values.clamp_min(1e-30).log()).sum(-1)
        policy = eek.Entropy(midway(entropies, around=entropies[0], min_margin=1e-4))
        eek.patch(model, policy, backend="torch")
        expected = model(**inputs)
        # the exact step: on a GPU "auto" is the graphed step, whose replays dispatch no op to see
        eek.patch(model, policy, backend="triton", step="exact")
        got = model(**inputs)  # eager: the kernels launched directly
        with _OpNames() as seen:  # under a dispatch mode the registered ops run instead
            again = model(**inputs)
    assert {"pool_norm", "exit_head", "exit_decide"} <= seen.names
    for out in (got, again):
        assert torch.equal(out.exit_layer, expected.exit_layer)
        torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-5)
    assert len(set(expected.exit_layer.tolist())) >= 2, "the test needs rows leaving at different layers"
