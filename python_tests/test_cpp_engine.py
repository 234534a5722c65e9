"""The whole engine with backend="cpp" against backend="torch" on tiny models."""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from threshold_helpers import assert_clear_of_threshold, midway, qexit_cdfs, randomize_heads

import earlyexit_kernels as eek

pytestmark = pytest.mark.exact  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)

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
    from earlyexit_kernels.backends.registry import resolve_backend

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


# ---------------------------------------------------------------------------------------
# Spread decisions (randomized heads, thresholds midway between the values met): on the CPU
# with backend="cpp", on a GPU with backend="cuda", and with the model on a second GPU.

_CUDA = pytest.mark.skipif(not eek.backends()["cuda"], reason=f"CUDA kernels: {eek.backend_status()['cuda']}")
_TWO_GPUS = pytest.mark.skipif(
    not eek.backends()["cuda"] or torch.cuda.device_count() < 2,
    reason="needs the CUDA kernels and two GPUs (a model on cuda:1 while cuda:0 is current)",
)
SPREAD_BATCH, SPREAD_SEED = 9, 21


def _with_heads(model, policy, device, batch):
    """``policy`` attached (torch backend) with randomized heads; its all-exits output on ``device``."""
    eek.patch(model, policy, backend="torch")
    randomize_heads(model, SPREAD_SEED)
    model.to(device)
    ids, mask, tt = (t.to(device) for t in batch)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=tt, return_all_exits=True)


def _spread_policies(model, device, batch):
    z = _with_heads(model, eek.Entropy(0.5), device, batch).all_logits.float().cpu()
    log_p = z.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    max_prob = z.softmax(-1).amax(-1)
    cdf = qexit_cdfs(_with_heads(model, eek.QExit(0.5), device, batch).all_halting.cpu())[:-1]
    skipping = _with_heads(model, eek.SkipGates(0.5, entropy_threshold=0.5), device, batch).all_logits
    log_s = skipping.float().cpu().log_softmax(-1)
    skip_entropy = -(log_s.exp() * log_s).sum(-1)
    return [
        eek.Entropy(midway(entropy, entropy[0])),
        eek.MaxProb(midway(max_prob, max_prob[0])),
        eek.Patience(1),
        eek.Voting(2),
        eek.QExit(midway(cdf, cdf[1])),
        eek.DACT(),
        eek.SkipGates(0.5, entropy_threshold=midway(skip_entropy, skip_entropy[0])),
        eek.Scheduled(torch.tensor([1, 4, 2, 3, 3, 1, 4, 2, 2], device=device)),
    ]


@pytest.mark.parametrize(
    "backend,where",
    [("cpp", "cpu"), pytest.param("cuda", "cuda", marks=_CUDA), pytest.param("cuda", "cuda:1", marks=_TWO_GPUS)],
)
def test_engine_spread_decisions(arch, backend, where):
    """Every policy end to end against backend="torch" on the same device, exits spread over the
    layers; on cuda:1 the current device stays cuda:0."""
    device = torch.device(where)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", device.index or 0)  # tensors report the index: cuda:0, not cuda
    batch = tiny_batch(SPREAD_BATCH, 10, seed=4)
    model = tiny_model(arch, num_labels=3, num_layers=L)
    spread = 0
    for policy in _spread_policies(model, device, batch):
        assert_clear_of_threshold(policy, _with_heads(model, policy, device, batch), L)
        ids, mask, tt = (t.to(device) for t in batch)
        outs = {}
        for name in ("torch", backend):
            eek.patch(model, policy, backend=name)
            with torch.no_grad():
                outs[name] = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        ref, got = outs["torch"], outs[backend]
        label = type(policy).__name__
        assert got.logits.device == device
        assert torch.equal(got.exit_layer, ref.exit_layer), (label, got.exit_layer, ref.exit_layer)
        assert torch.equal(got.layers_run, ref.layers_run), label
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5, msg=label)
        spread += len(set(ref.exit_layer.tolist())) > 1
        if device.type == "cuda":
            assert torch.cuda.current_device() == 0
    assert spread >= 5, "the data should spread the exits over the layers"
