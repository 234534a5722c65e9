"""The CPU's float32 exit head (``cpp_packed_head_exit_step``, csrc/cpu/pooler_head_cpu.cpp).

The head against float64 PyTorch, with an error bound set by float32 PyTorch's own error;
a row's outputs whatever batch it is in; tanh's special values; the rule after it the same
as the generic C++ op's; every instruction-set version this CPU runs; the backend's
routing and prepared per-layer step; the errors it gives.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.backends import cpp_backend
from earlyexit_kernels.methods import exit_rules

pytestmark = pytest.mark.exact  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)

if not eek.backends()["cpp"]:
    pytest.fail(f"the C++ backend must be built for these tests: {eek.backend_status()['cpp']}", pytrace=False)

OP = torch.ops.earlyexit.cpp_packed_head_exit_step.default
L = 6
# (rows, hidden): blocks of 4 rows and a short last block; H a multiple of 32, of 16 only, of 8
# only, and of neither (the one-vector and the one-at-a-time columns)
SHAPES = [(1, 7), (3, 40), (5, 64), (17, 312), (32, 128), (33, 384), (64, 768), (130, 100)]


def _weights(hidden, labels, seed):
    g = torch.Generator().manual_seed(seed)
    wp = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
    bp = torch.randn(hidden, generator=g) * 0.1
    w = torch.randn(labels, hidden, generator=g) * 3.0 / math.sqrt(hidden)
    b = torch.randn(labels, generator=g) * 0.5
    return wp, bp, w, b


def _cls_rows(rows, hidden, seed, scale=2.0):
    """[CLS] rows as a strided view of [rows, 3, H], as the engine passes them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 3, hidden, generator=g) * scale)[:, 0]


def _rule_args(policy, layer=2):
    lowered = cpp_backend.lower_policy(policy, L)
    return lowered, cpp_backend._rule_args(lowered, layer, L, None)


def _head(x, wp, bp, w, b, policy=None, state=()):
    _, args = _rule_args(policy or eek.Entropy(0.4))
    return OP(x, wp.t().contiguous(), bp, w, b, None, list(state), *args)


@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_head_error_within_pytorch_float32_error(rows, hidden):
    wp, bp, w, b = _weights(hidden, 3, seed=hidden)
    x = _cls_rows(rows, hidden, seed=rows)
    _, _, logits, pooled, *_ = _head(x, wp, bp, w, b)
    pooled64 = torch.tanh(torch.nn.functional.linear(x.double(), wp.double(), bp.double()))
    logits64 = torch.nn.functional.linear(pooled64, w.double(), b.double())
    torch_pooled = torch.tanh(torch.nn.functional.linear(x, wp, bp))
    torch_logits = torch.nn.functional.linear(torch_pooled, w, b)
    for got, torch32, exact in ((pooled, torch_pooled, pooled64), (logits, torch_logits, logits64)):
        assert got.dtype == torch.float32 and got.shape == exact.shape
        ours = (got.double() - exact).abs().max().item()
        theirs = (torch32.double() - exact).abs().max().item()
        assert ours <= 4 * theirs + 1e-6, f"error {ours:.2e} against PyTorch float32's {theirs:.2e}"


def test_a_row_gets_the_same_bits_in_any_batch():
    wp, bp, w, b = _weights(128, 2, seed=1)
    x = _cls_rows(13, 128, seed=2)
    _, _, logits, pooled, *_ = _head(x, wp, bp, w, b)
    for start, stop in ((0, 1), (5, 6), (3, 9), (12, 13), (1, 13)):
        _, _, part_logits, part_pooled, *_ = _head(x[start:stop], wp, bp, w, b)
        assert torch.equal(part_pooled, pooled[start:stop]) and torch.equal(part_logits, logits[start:stop])


def test_tanh_over_a_dense_range_and_at_special_values():
    # identity pooler and classifier on one feature: pooled = logits = tanh(x)
    eye, zero = torch.ones(1, 1), torch.zeros(1)
    x = torch.linspace(-12.0, 12.0, 100_001)
    _, _, _, pooled, *_ = _head(x[:, None], eye, zero, eye, zero)
    exact = torch.tanh(x.double())
    relative = ((pooled[:, 0].double() - exact).abs() / exact.abs().clamp_min(1e-300)).max().item()
    assert relative < 3 * torch.finfo(torch.float32).eps  # measured: about 1 eps
    special = torch.tensor([0.0, 1e-30, -1e-30, 0.6249, 0.6251, 9.5, -9.5, 40.0, float("inf"), -float("inf")])
    _, _, _, pooled, *_ = _head(special[:, None], eye, zero, eye, zero)
    torch.testing.assert_close(pooled[:, 0], torch.tanh(special), rtol=2.5e-7, atol=0)
    assert pooled[-3:, 0].tolist() == [1.0, 1.0, -1.0]  # rounds to 1 from about 9.01 on
    _, _, _, pooled, *_ = _head(torch.tensor([[float("nan")]]), eye, zero, eye, zero)
    assert math.isnan(pooled.item())


@pytest.mark.parametrize("policy", [eek.Entropy(0.5), eek.MaxProb(0.7), eek.Patience(1), eek.Voting(2)], ids=repr)
def test_rule_matches_the_generic_op_on_the_same_logits(policy):
    wp, bp, w, b = _weights(96, 3, seed=4)
    lowered, args = _rule_args(policy)
    state = exit_rules.init_state(policy, 21, 3, 96, L, torch.device("cpu"))
    state_list = [state[k] for k in lowered.state_in]
    for layer in (1, 2, 3):
        x = _cls_rows(21, 96, seed=layer)
        lowered, args = _rule_args(policy, layer)
        got = OP(x, wp.t().contiguous(), bp, w, b, None, state_list, *args)
        exits, returned, state0, state1, _, _ = torch.ops.earlyexit.cpp_exit_step(got[2], None, state_list, *args)
        assert torch.equal(got[0], exits) and torch.equal(got[1], returned)
        assert torch.equal(got[4], state0) and torch.equal(got[5], state1)
        state_list = [got[4], got[5]][: len(lowered.state_in)]  # these kinds read what they write


def test_opcheck():
    wp, bp, w, b = _weights(16, 3, seed=5)
    lowered, args = _rule_args(eek.Patience(1))
    state = exit_rules.init_state(eek.Patience(1), 5, 3, 16, L, torch.device("cpu"))
    torch.library.opcheck(
        OP, (_cls_rows(5, 16, seed=6), wp.t().contiguous(), bp, w, b, None, [state[k] for k in lowered.state_in], *args)
    )


_ISA_SCRIPT = """
import json, math, sys, torch
import earlyexit_kernels as eek, earlyexit_kernels._C as C
from earlyexit_kernels.backends import cpp_backend
g = torch.Generator().manual_seed(0)
result = {"isa": C.CPU_HEAD_ISA}
for rows, hidden in [(5, 40), (9, 312), (32, 128)]:
    x = torch.randn(rows, 3, hidden, generator=g)[:, 0] * 2
    wp = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
    bp, w, b = torch.randn(hidden, generator=g) * 0.1, torch.randn(2, hidden, generator=g) / 4, torch.randn(2, generator=g)
    lowered = cpp_backend.lower_policy(eek.Entropy(0.4), 6)
    out = torch.ops.earlyexit.cpp_packed_head_exit_step(x, wp.t().contiguous(), bp, w, b, None, [], *cpp_backend._rule_args(lowered, 2, 6, None))
    exact = torch.tanh(torch.nn.functional.linear(x.double(), wp.double(), bp.double()))
    ours = (out[3].double() - exact).abs().max().item()
    theirs = (torch.tanh(torch.nn.functional.linear(x, wp, bp)).double() - exact).abs().max().item()
    one = torch.ops.earlyexit.cpp_packed_head_exit_step(x[1:2], wp.t().contiguous(), bp, w, b, None, [], *cpp_backend._rule_args(lowered, 2, 6, None))
    result[f"{rows}x{hidden}"] = [ours, theirs, bool(torch.equal(one[3], out[3][1:2]))]
print(json.dumps(result))
"""


def _isa_run(isa):
    env = dict(os.environ, EARLYEXIT_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", ["portable", "avx2_fma", "avx512"])
def test_every_instruction_set_version_this_cpu_runs(isa):
    result = _isa_run(isa)
    if result["isa"] != isa:
        assert isa != "portable", "the portable version runs everywhere"
        pytest.skip(f"this CPU does not run the {isa} version (it runs {result['isa']})")
    for shape, values in result.items():
        if shape == "isa":
            continue
        ours, theirs, same_row = values
        assert ours <= 4 * theirs + 1e-6, f"{isa} {shape}: error {ours:.2e} against PyTorch float32's {theirs:.2e}"
        assert same_row, f"{isa} {shape}: a row's values changed with its batch"


def test_backend_runs_it_at_inference_and_torch_under_autograd():
    wp, bp, w, b = _weights(64, 2, seed=7)
    x = _cls_rows(6, 64, seed=8)
    with torch.no_grad():
        assert cpp_backend._cpu_head_in_cpp(x, None)
        exits, returned, logits, halting, state = cpp_backend.head_exit_step(
            eek.Entropy(0.4), 2, L, x, wp, bp, w, b, {}
        )
    _, _, op_logits, *_ = _head(x, wp, bp, w, b)
    assert torch.equal(logits, op_logits) and halting is None
    assert not cpp_backend._cpu_head_in_cpp(x, None)  # grad on: torch's head, whose logits carry gradients
    assert not cpp_backend._cpu_head_in_cpp(x.double(), None)
    with torch.no_grad():
        assert not cpp_backend._cpu_head_in_cpp(x, lambda pooled, previous: pooled.sum(-1))


def test_prepared_step_is_the_op_with_the_weights_made_ready():
    wp, bp, w, b = _weights(48, 3, seed=9)
    policy = eek.Patience(2)
    step = cpp_backend.prepare_head_exit_step(policy, 2, L, wp, bp, w, b)
    state = exit_rules.init_state(policy, 7, 3, 48, L, torch.device("cpu"))
    x = _cls_rows(7, 48, seed=10)
    with torch.no_grad():
        exits, returned, new_state = step(x, state)
        ref = cpp_backend.head_exit_step(policy, 2, L, x, wp, bp, w, b, state)
    assert torch.equal(exits, ref[0]) and torch.equal(returned, ref[1])
    assert new_state.keys() == ref[4].keys() and all(torch.equal(new_state[k], ref[4][k]) for k in new_state)
    assert cpp_backend.prepare_head_exit_step(policy, 2, L, wp.double(), bp.double(), w.double(), b.double()) is None


def test_transposed_pooler_is_packed_once_and_again_after_an_update():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    first = cpp_backend.transposed_pooler(weight)
    assert first is cpp_backend.transposed_pooler(weight)
    assert torch.equal(first, weight.detach().t())
    with torch.no_grad():
        weight.add_(1.0)
    again = cpp_backend.transposed_pooler(weight)
    assert again is not first and torch.equal(again, weight.detach().t())


def test_bad_input_gets_a_clear_error():
    wp, bp, w, b = _weights(16, 2, seed=11)
    x = _cls_rows(4, 16, seed=12)
    with pytest.raises(RuntimeError, match="float32 expected"):
        _head(x.half(), wp.half(), bp.half(), w.half(), b.half())
    with pytest.raises(RuntimeError, match=r"pooler_weight must be \[H, H\]"):
        _head(x, wp[:, :8], bp, w, b)
    with pytest.raises(RuntimeError, match="dtype"):
        _head(x, wp.double(), bp, w, b)


def test_large_heads_go_to_torch_gemm_on_every_thread(monkeypatch):
    wp, bp, w, b = _weights(32, 2, seed=13)
    monkeypatch.setattr(cpp_backend, "CPU_HEAD_MAX_WORK", 4 * 32 * 32 * torch.get_num_threads())
    step = cpp_backend.prepare_head_exit_step(eek.Entropy(0.4), 2, L, wp, bp, w, b)
    with torch.no_grad():
        for rows, in_cpp in ((4, True), (5, False)):
            x = _cls_rows(rows, 32, seed=rows)
            assert cpp_backend._cpu_head_in_cpp(x, None) is in_cpp
            exits, returned, _ = step(x, {})
            torch_logits = cpp_backend._torch_head(x, wp, bp, w, b)[1]
            op_logits = _head(x, wp, bp, w, b)[2]
            ref = cpp_backend.head_exit_step(eek.Entropy(0.4), 2, L, x, wp, bp, w, b, {})
            assert torch.equal(ref[2], op_logits if in_cpp else torch_logits)
            assert torch.equal(exits, ref[0]) and torch.equal(returned, ref[1])


def test_an_inference_tensor_weight_is_transposed_every_call():
    with torch.inference_mode():
        weight = torch.randn(8, 8)
        first = cpp_backend.transposed_pooler(weight)
        weight.add_(1.0)  # no version counter on an inference tensor: nothing cached to go stale
        assert torch.equal(cpp_backend.transposed_pooler(weight), weight.t()) and not torch.equal(first, weight.t())
