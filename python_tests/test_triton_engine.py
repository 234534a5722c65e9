"""The whole engine with backend="triton" against backend="torch" on tiny random models."""

import math

import pytest
import torch

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, tiny_batch, tiny_model  # noqa: E402
from threshold_helpers import (  # noqa: E402
    assert_clear_of_threshold,
    midway,
    qexit_cdfs,
    randomize_heads,
    smallest_margin,
)

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.methods.exit_rules import entropy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: masked -inf lanes

BATCH, SEQ, LAYERS = 9, 12, 4


def _all_exits(model, policy, seed, ids, mask, tt):
    """Every head on every layer, through the torch backend, with ``policy``'s heads randomized."""
    eek.patch(model, policy, backend="torch")
    randomize_heads(model, seed)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=tt, return_all_exits=True)


def _thresholds(model, ids, mask, tt, seed):
    """Thresholds midway between the values the rules will meet on every layer (of the randomized
    heads, from the all-exits path), so that rounding cannot move a value across: Entropy,
    MaxProb (T = 1.3), SkipGates' entropy (its own hidden states, with skipped layers) and QExit's q
    (within the middle half of the first layers' values, so that exits spread over the layers).
    """
    z = _all_exits(model, eek.Entropy(0.5), seed, ids, mask, tt).all_logits.float()
    skipping = _all_exits(model, eek.SkipGates(0.5, entropy_threshold=0.5), seed, ids, mask, tt).all_logits.float()
    halting = _all_exits(model, eek.QExit(0.5), seed, ids, mask, tt).all_halting
    ent, maxp, cdf = entropy(z), torch.softmax(z / 1.3, -1).amax(-1), qexit_cdfs(halting)[:-1]
    # Around layer 1's values: about half the rows leave there, the rest later.
    return {
        "entropy": midway(ent, ent[0]),
        "maxprob": midway(maxp, maxp[0]),
        "skipgates": midway(entropy(skipping), entropy(skipping[0])),
        "q": midway(cdf, cdf[1]),
    }


def _policies(thresholds):
    g = torch.Generator().manual_seed(3)
    ent = thresholds["entropy"]
    return {
        "entropy": eek.Entropy(ent),
        "entropy_normalized_per_layer": eek.Entropy([ent / math.log(3)] * LAYERS, normalized=True),
        "maxprob": eek.MaxProb(thresholds["maxprob"], temperature=1.3),
        "patience": eek.Patience(1),
        "qexit": eek.QExit(thresholds["q"]),
        "qexit_stochastic": eek.QExit(0.5, stochastic=True, seed=4),
        "voting": eek.Voting(2),
        "dact": eek.DACT(),
        "skipgates": eek.SkipGates(skip_threshold=0.5, entropy_threshold=thresholds["skipgates"]),
        "scheduled": eek.Scheduled(torch.randint(1, LAYERS + 1, (BATCH,), generator=g)),
    }


def _run(model, policy, backend, ids, mask, tt):
    eek.patch(model, policy, backend=backend)
    return model(input_ids=ids, attention_mask=mask, token_type_ids=tt)


def _prepare(model, policy, seed, ids, mask, tt):
    """Attach ``policy`` and randomize its heads (the classifiers get the same values as in _thresholds);
    check that no value the rule compares lies near its threshold."""
    out = _all_exits(model, policy, seed, ids, mask, tt)
    assert_clear_of_threshold(policy, out, LAYERS)


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
    policy = _policies(_thresholds(model, ids, mask, tt, seed=11))[name]
    _prepare(model, policy, 11, ids, mask, tt)
    with torch.no_grad():
        ref = _compare(model, policy, ids, mask, tt)
    if name not in ("qexit", "dact", "patience"):
        assert len(set(ref.exit_layer.tolist())) > 1, "test data should spread the exits over layers"


def test_engine_triton_regression_patience():
    model = tiny_model("bert", num_labels=1, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ)
    policy = eek.Patience(1, regression_threshold=0.3)
    _prepare(model, policy, 12, ids, mask, tt)
    with torch.no_grad():
        _compare(model, policy, ids, mask, tt)


@pytest.mark.parametrize("arch", ["albert", "roberta"])
def test_engine_triton_matches_torch_other_architectures(arch):
    model = tiny_model(arch, num_labels=2, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ, seed=5)
    policy = eek.Entropy(_thresholds(model, ids, mask, tt, seed=13)["entropy"])
    _prepare(model, policy, 13, ids, mask, tt)
    with torch.no_grad():
        ref = _compare(model, policy, ids, mask, tt)
    assert len(set(ref.exit_layer.tolist())) > 1


def test_engine_triton_unfused_path_with_grad_enabled():
    """With autograd on, the engine uses the backend's exit_step and compact (not the fused head)."""
    model = tiny_model("bert", num_labels=3, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ)
    policy = eek.Entropy(_thresholds(model, ids, mask, tt, seed=14)["entropy"])
    _prepare(model, policy, 14, ids, mask, tt)
    ref = _compare(model, policy, ids, mask, tt)
    assert len(set(ref.exit_layer.tolist())) > 1


@pytest.mark.skipif(KERNEL_DEVICE.type != "cpu", reason="the interpreter is for machines without a GPU")
def test_triton_backend_registered_for_cpu_under_interpreter():
    status = eek.backend_status()
    assert status["triton"] == "available", status
    from earlyexit_kernels.backends.registry import resolve_backend

    backend = resolve_backend("triton", torch.device("cpu"))
    assert backend.head_exit_step is not None
    # "auto" keeps its order: on CPU the triton interpreter is never picked.
    assert resolve_backend("auto", torch.device("cpu")).name in ("cpp", "torch")


def test_engine_triton_under_autocast_albert():
    """Under autocast (``torch.autocast("cpu", bfloat16)`` here, float16 on a GPU) ALBERT's hidden
    states are in the autocast dtype while its head weights stay fp32: the fused head runs in the
    autocast dtype, as ``F.linear`` does in the reference (it used to raise on the mixed dtypes).
    Exits and logits as the torch backend's under the same autocast."""
    device = KERNEL_DEVICE
    model = tiny_model("albert", num_labels=3, num_layers=LAYERS).to(device)
    ids, mask, tt = (t.to(device) for t in tiny_batch(BATCH, SEQ, seed=5))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)
    with autocast:
        out = _all_exits(model, eek.Entropy(0.5), 16, ids, mask, tt)
    assert out.all_logits.dtype == autocast.fast_dtype
    ent = entropy(out.all_logits.float())
    g = torch.Generator().manual_seed(6)
    schedule = torch.randint(1, LAYERS + 1, (BATCH,), generator=g)
    for policy in (eek.Entropy(midway(ent, ent[0])), eek.Scheduled(schedule.to(device))):
        with autocast:
            out = _all_exits(model, policy, 16, ids, mask, tt)
        # The two backends round the head differently in low precision: entropies differ by up to
        # 0.003 on this data (bf16), so the threshold must stay farther than that from every value.
        assert smallest_margin(policy, out, LAYERS) > 0.01, "low-precision rounding could move a value across"
        outs = {}
        for backend in ("torch", "triton"):
            eek.patch(model, policy, backend=backend)
            with torch.no_grad(), autocast:
                outs[backend] = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        ref, got = outs["torch"], outs["triton"]
        assert got.logits.dtype == ref.logits.dtype
        assert torch.equal(got.exit_layer, ref.exit_layer), (got.exit_layer, ref.exit_layer)
        assert len(set(ref.exit_layer.tolist())) > 1
        torch.testing.assert_close(got.logits.float(), ref.logits.float(), rtol=0.02, atol=0.02)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a model on cuda:1, cuda:0 current)")
def test_engine_triton_model_on_second_gpu():
    """Triton launches on the current device: with the model on cuda:1 and cuda:0 current, every
    kernel must still run on cuda:1 (and read cuda:1's memory)."""
    torch.cuda.set_device(0)
    model = tiny_model("bert", num_labels=3, num_layers=LAYERS)
    ids, mask, tt = tiny_batch(BATCH, SEQ)
    thresholds = _thresholds(model, ids, mask, tt, seed=11)
    device = torch.device("cuda", 1)
    for name in ("entropy", "patience", "qexit", "voting"):
        policy = _policies(thresholds)[name]
        _prepare(model, policy, 11, ids, mask, tt)
        model.to(device)
        args = (ids.to(device), mask.to(device), tt.to(device))
        with torch.no_grad():
            ref = _run(model, policy, "torch", *args)
            got = _run(model, policy, "triton", *args)
        assert got.logits.device == device and torch.cuda.current_device() == 0
        assert torch.equal(got.exit_layer, ref.exit_layer), (name, got.exit_layer, ref.exit_layer)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
        model.cpu()
