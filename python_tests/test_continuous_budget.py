"""What one layer call of the continuous engine costs outside the encoder layer: ops and read-backs.

Each op dispatched is a kernel launch on a GPU and each read-back a host sync, so the
counts taken here on the CPU are what a GPU would pay per call. The budgets are today's
counts: a change that adds an op or a sync to the hot path fails here and must say why.
View ops (no launch) are not counted.
"""

import collections

import pytest
import torch
from test_classify import _sequences, spread_model
from torch.utils._python_dispatch import TorchDispatchMode

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.patching.patch import current_adapter

VIEWS = {"view", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute", "detach", "alias"}
VIEWS |= {"lift_fresh", "_unsafe_view", "as_strided", "_reshape_alias"}
READ_BACKS = ("cpu", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")

# Ops per layer call outside the layer (SDPA), where rows may leave. The Triton backend's
# fused head takes one launch for the head, one for the decision and three allocations.
BUDGET = {
    ("entropy", "cpp"): 11,
    ("entropy", "torch"): 22,
    ("entropy", "triton"): 12,
    ("qexit", "cpp"): 21,
    ("qexit", "triton"): 22,
    ("dact", "cpp"): 16,
    ("skipgates", "cpp"): 22,  # the gates of every later layer are read after each call before layer L - 1
}


class _Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _measure(name, backend, monkeypatch, calls=3):
    items = _sequences(256, seed=1, longest=60)
    model, policy = spread_model("bert", name, items)
    eek.patch(model, policy, backend=backend, step="exact")  # the eager calls' budget, on a GPU too
    current_adapter(model).attn_implementation = "sdpa"
    engine = ContinuousEngine(model, max_batch_size=64)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"])
    engine.step()  # admission
    counting = _Counting()
    run_layer = engine._run_layer

    def layer_not_counted(index, hidden, mask):
        counting.paused = True
        try:
            return run_layer(index, hidden, mask)
        finally:
            counting.paused = False

    engine._run_layer = layer_not_counted
    run_packed_layer = engine._run_packed_layer

    def packed_layer_not_counted(index, hidden, positions, mask):
        counting.paused = True
        try:
            return run_packed_layer(index, hidden, positions, mask)
        finally:
            counting.paused = False

    engine._run_packed_layer = packed_layer_not_counted
    read_backs = collections.Counter()
    for method in READ_BACKS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            if not counting.paused:
                read_backs[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    before = engine.stats.calls
    with counting:
        while engine.stats.calls - before < calls:
            engine.step()
    monkeypatch.undo()
    return sum(counting.ops.values()) / calls, sum(read_backs.values()) / calls, counting.ops


@pytest.mark.parametrize("name, backend", sorted(BUDGET))
def test_ops_and_read_backs_per_layer_call_stay_within_budget(name, backend, monkeypatch):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r}: {eek.backend_status()[backend]}")
    ops, read_backs, counted = _measure(name, backend, monkeypatch)
    assert ops <= BUDGET[name, backend], f"{ops} ops per call: {dict(counted)}"
    assert read_backs <= 1.0, f"{read_backs} read-backs per call"


def test_a_layer_where_nobody_can_exit_reads_nothing_back(monkeypatch):
    _, read_backs, _ = _measure("patience", "cpp", monkeypatch, calls=1)  # Patience(1): no exit on layer 1
    assert read_backs == 0
