"""The whole engine with backend="cpp" against backend="torch" on tiny models."""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from threshold_helpers import assert_clear_of_threshold, midway, qexit_cdfs

import earlyexit_kernels as eek

if not eek.backends()["cpp"]:
    pytest.fail(f"the C++ backend must be built for these tests: {eek.backend_status()['cpp']}", pytrace=False)

L = 4


def _all_exits(arch, policy, batch, attn="eager"):
    """Every head on every layer through the torch backend (heads as ``_run`` builds them)."""
    return _run(arch, policy, "torch", batch, attn, all_exits=True)


# The untrained tiny models' entropies lie within 2e-4 of ln 3, their neighbours 1e-5 apart; the
# C++ rule rounds as the reference op by op, so a margin of 8 float32 ulps of ln 3 is clear.
MARGIN = 1e-6


def _policies(arch, batch):
    """Thresholds midway between the values each rule meets on every layer (SkipGates on its own
    hidden states, QExit on its halting head's cumulative probabilities)."""
    z = _all_exits(arch, eek.Patience(1), batch).all_logits.float()
    log_p = z.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    max_prob = z.softmax(-1).amax(-1)
    skipping = _all_exits(arch, eek.SkipGates(entropy_threshold=0.5), batch).all_logits.float().log_softmax(-1)
    skip_entropy = -(skipping.exp() * skipping).sum(-1)
    cdf = qexit_cdfs(_all_exits(arch, eek.QExit(0.5), batch).all_halting)[:-1]
    return [
        eek.Entropy(midway(entropy, min_margin=MARGIN)),
        eek.MaxProb(midway(max_prob, min_margin=MARGIN)),
        eek.Patience(1),
        eek.Voting(2),
        eek.QExit(midway(cdf, min_margin=MARGIN)),
        eek.DACT(),
        eek.SkipGates(entropy_threshold=midway(skip_entropy, min_margin=MARGIN)),
        eek.Scheduled(torch.tensor([1, 4, 2, 3, 3, 1, 4])),
    ]


def _run(arch, policy, backend, batch, attn="eager", all_exits=False):
    model = tiny_model(arch, num_labels=3, num_layers=L, attn=attn)
    eek.patch(model, policy, backend=backend)
    ids, mask, tt = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=tt, return_all_exits=all_exits)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_engine_cpp_matches_torch(arch, attn):
    batch = tiny_batch(7, 10, seed=4)
    early = 0
    for policy in _policies(arch, batch):
        assert_clear_of_threshold(policy, _all_exits(arch, policy, batch, attn), L, MARGIN)
        ref = _run(arch, policy, "torch", batch, attn)
        got = _run(arch, policy, "cpp", batch, attn)
        name = type(policy).__name__
        assert torch.equal(got.exit_layer, ref.exit_layer), (name, got.exit_layer, ref.exit_layer)
        assert torch.equal(got.layers_run, ref.layers_run), name
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5, msg=name)
        early += int((ref.exit_layer < L).sum())
        # the all-exits path through the cpp backend agrees with its early-exit path
        full = _run(arch, policy, "cpp", batch, attn, all_exits=True)
        assert torch.equal(full.exit_layer, got.exit_layer), name
        torch.testing.assert_close(full.logits, got.logits, rtol=1e-4, atol=1e-5, msg=name)
    assert early > 0


def test_engine_regression_head():
    batch = tiny_batch(5, 8, seed=6)
    for policy in (eek.Patience(1, regression_threshold=0.05), eek.QExit(0.3)):
        outs = []
        for backend in ("torch", "cpp"):
            model = tiny_model("bert", num_labels=1, num_layers=L)
            eek.patch(model, policy, backend=backend)
            ids, mask, tt = batch
            with torch.no_grad():
                outs.append(model(input_ids=ids, attention_mask=mask, token_type_ids=tt))
        assert torch.equal(outs[0].exit_layer, outs[1].exit_layer)
        torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-4, atol=1e-5)


def test_auto_prefers_cpp_on_cpu():
    from earlyexit_kernels.backend_registry import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")).name == "cpp"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_engine_low_precision_runs_and_mostly_agrees(dtype):
    batch = tiny_batch(7, 10, seed=4)
    outs = []
    for backend in ("torch", "cpp"):
        model = tiny_model("bert", num_labels=3, num_layers=L).to(dtype)
        eek.patch(model, eek.Patience(1), backend=backend)
        ids, mask, tt = batch
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask, token_type_ids=tt))
    ref, got = outs
    assert got.logits.dtype == dtype
    same = ref.exit_layer == got.exit_layer
    # rows that left at the same layer got the same head on the same hidden state
    torch.testing.assert_close(got.logits[same].float(), ref.logits[same].float(), rtol=0.05, atol=0.05)
    assert int(same.sum()) >= 5
