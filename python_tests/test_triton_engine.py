"""The whole engine with backend="triton" against backend="torch" on tiny random models."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, tiny_batch, tiny_model  # noqa: E402

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.exit_rules import entropy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: masked -inf lanes

BATCH, SEQ, LAYERS = 9, 12, 4


def _randomize_heads(model, seed):
    """Distinct per-layer heads, halting heads and gates, so exits differ between rows and layers."""
    g = torch.Generator().manual_seed(seed)
    heads = model.early_exit_heads
    with torch.no_grad():
        for module in list(heads.classifiers) + [heads.qexit_halting, heads.dact_halting]:
            if module is None:
                continue
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
        if heads.gates is not None:
            for gate in heads.gates:
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
                gate.bias.fill_(0.0)


def _thresholds(model, ids, mask, tt, seed):
    """Median entropy and max-probability of the (randomized) first head, from the all-exits path."""
    eek.patch(model, eek.Entropy(0.5), backend="torch")
    _randomize_heads(model, seed)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, return_all_exits=True)
    z = out.all_logits[0].float()  # layer 1: about half the rows leave there, the rest later
    return float(entropy(z).median()), float(torch.softmax(z / 1.3, -1).amax(-1).median())  # MaxProb: T = 1.3


def _policies(ent, maxp):
    g = torch.Generator().manual_seed(3)
    return {
        "entropy": eek.Entropy(ent),
        "entropy_normalized_per_layer": eek.Entropy([ent / 1.0986] * LAYERS, normalized=True),
        "maxprob": eek.MaxProb(maxp, temperature=1.3),
        "patience": eek.Patience(1),
        "qexit": eek.QExit(0.3),
        "qexit_stochastic": eek.QExit(0.5, stochastic=True, seed=4),
        "voting": eek.Voting(2),
        "dact": eek.DACT(),
        "skipgates": eek.SkipGates(skip_threshold=0.5, entropy_threshold=ent),
        "scheduled": eek.Scheduled(torch.randint(1, LAYERS + 1, (BATCH,), generator=g)),
    }


def _run(model, policy, backend, ids, mask, tt):
    eek.patch(model, policy, backend=backend)
    return model(input_ids=ids, attention_mask=mask, token_type_ids=tt)


def _prepare(model, policy, seed):
    """Attach ``policy`` and randomize its heads (the classifiers get the same values as in _thresholds)."""
    eek.patch(model, policy, backend="torch")
    _randomize_heads(model, seed)


def _compare(model, policy, ids, mask, tt, atol=1e-5):
    """Both backends on KERNEL_DEVICE (the GPU if there is one, else the CPU with the interpreter)."""
    model.to(KERNEL_DEVICE)
    ids, mask, tt = (t.to(KERNEL_DEVICE) for t in (ids, mask, tt))
    ref = _run(model, policy, "torch", ids, mask, tt)
    got = _run(model, policy, "triton", ids, mask, tt)
    assert torch.equal(got.exit_layer, ref.exit_layer), (got.exit_layer, ref.exit_layer)
    assert torch.equal(got.layers_run, ref.layers_run)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=atol)
    return ref


@pytest.mark.parametrize(
    "name",
    [
        "entropy",
        "entropy_normalized_per_layer",
        "maxprob",
        "patience",
        "qexit",
        "qexit_stochastic",
        "voting",
        "dact",
        "skipgates",
        "scheduled",
    ],
)
def test_engine_triton_matches_torch_bert(name):
    model = tiny_model("bert", num_labels=3, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ)
    ent, maxp = _thresholds(model, ids, mask, tt, seed=11)
    policy = _policies(ent, maxp)[name]
    _prepare(model, policy, seed=11)
    with torch.no_grad():
        ref = _compare(model, policy, ids, mask, tt)
    if name not in ("qexit", "dact", "patience"):
        assert len(set(ref.exit_layer.tolist())) > 1, "test data should spread the exits over layers"


def test_engine_triton_regression_patience():
    model = tiny_model("bert", num_labels=1, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ)
    policy = eek.Patience(1, regression_threshold=0.3)
    _prepare(model, policy, seed=12)
    with torch.no_grad():
        _compare(model, policy, ids, mask, tt)


@pytest.mark.parametrize("arch", ["albert", "roberta"])
def test_engine_triton_matches_torch_other_architectures(arch):
    model = tiny_model(arch, num_labels=2, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ, seed=5)
    ent, _ = _thresholds(model, ids, mask, tt, seed=13)
    policy = eek.Entropy(ent)
    _prepare(model, policy, seed=13)
    with torch.no_grad():
        ref = _compare(model, policy, ids, mask, tt)
    assert len(set(ref.exit_layer.tolist())) > 1


def test_engine_triton_unfused_path_with_grad_enabled():
    """With autograd on, the engine uses the backend's exit_step and compact (not the fused head)."""
    model = tiny_model("bert", num_labels=3, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ)
    ent, _ = _thresholds(model, ids, mask, tt, seed=14)
    policy = eek.Entropy(ent)
    _prepare(model, policy, seed=14)
    ref = _compare(model, policy, ids, mask, tt)
    assert len(set(ref.exit_layer.tolist())) > 1


@pytest.mark.skipif(KERNEL_DEVICE.type != "cpu", reason="the interpreter is for machines without a GPU")
def test_triton_backend_registered_for_cpu_under_interpreter():
    status = eek.backend_status()
    assert status["triton"] == "available", status
    from earlyexit_kernels.backend_registry import resolve_backend

    backend = resolve_backend("triton", torch.device("cpu"))
    assert backend.head_exit_step is not None
    # "auto" keeps its order: on CPU the triton interpreter is never picked.
    assert resolve_backend("auto", torch.device("cpu")).name in ("cpp", "torch")
