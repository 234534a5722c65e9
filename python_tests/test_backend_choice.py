"""backend="auto" picks the faster of several fast backends by timing them, once per shape class."""

import math

import pytest
import torch

import earlyexit_kernels as eek
from earlyexit_kernels.backends import choice as backend_choice
from earlyexit_kernels.backends import registry as backend_registry

pytestmark = pytest.mark.skipif(not eek.backends()["cpp"], reason="needs the C++ backend as a second candidate")

CPU = torch.device("cpu")


@pytest.fixture
def measured_on_cpu(monkeypatch):
    """Let "auto" measure cpp against torch on the CPU, as it measures cuda against triton on a GPU."""
    monkeypatch.setitem(backend_registry._AUTO_MEASURED, "cpu", ("cpp", "torch"))
    monkeypatch.setattr(backend_choice, "_CHOICES", {})


def _fake_timer(seconds_by_name, calls):
    def measure(backend, device, dtype, hidden_size, num_labels):
        calls.append((backend.name, str(device), dtype, hidden_size, num_labels))
        return seconds_by_name[backend.name]

    return measure


@pytest.mark.parametrize("faster", ["cpp", "torch"])
def test_auto_takes_the_faster_measured_backend(measured_on_cpu, monkeypatch, faster):
    calls = []
    seconds = {"cpp": 2e-5, "torch": 5e-5} if faster == "cpp" else {"cpp": 5e-5, "torch": 2e-5}
    monkeypatch.setattr(backend_choice.choose, "__defaults__", (_fake_timer(seconds, calls),))
    chosen = backend_registry.resolve_backend("auto", CPU, dtype=torch.float32, hidden_size=64, num_labels=3)
    assert chosen.name == faster
    assert sorted(c[0] for c in calls) == ["cpp", "torch"]
    assert calls[0][1:] == ("cpu", torch.float32, 64, 3)
    assert backend_choice.auto_choices()[("cpu", "float32", 64, 3)] == (faster, seconds)


def test_auto_measures_once_per_shape_class(measured_on_cpu, monkeypatch):
    calls = []
    monkeypatch.setattr(backend_choice.choose, "__defaults__", (_fake_timer({"cpp": 1.0, "torch": 2.0}, calls),))
    for _ in range(3):
        backend_registry.resolve_backend("auto", CPU, dtype=torch.float32, hidden_size=64, num_labels=3)
    assert len(calls) == 2
    backend_registry.resolve_backend("auto", CPU, dtype=torch.float32, hidden_size=128, num_labels=3)
    assert len(calls) == 4


def test_auto_without_shape_uses_the_static_order(measured_on_cpu, monkeypatch):
    monkeypatch.setattr(backend_choice.choose, "__defaults__", (_fake_timer({"cpp": 9.0, "torch": 1.0}, []),))
    assert backend_registry.resolve_backend("auto", CPU).name == "cpp"


def test_auto_times_the_batch_sizes_a_shrinking_batch_sees(measured_on_cpu, monkeypatch):
    """A backend faster at 64 rows but slower at 256 (the CUDA head against Triton's at large
    batches) is not chosen: "auto" times every size of TIMED_BATCHES, not 64 rows only."""
    seen = []

    def step_seconds(backend, device, dtype, hidden_size, num_labels, *, batch=64, **_):
        seen.append((backend.name, batch))
        per_row = {"cpp": 1.0 if batch <= 64 else 4.0, "torch": 1.5}[backend.name]
        return per_row * batch * 1e-6

    monkeypatch.setattr(backend_choice, "step_seconds", step_seconds)
    chosen = backend_registry.resolve_backend("auto", CPU, dtype=torch.float32, hidden_size=64, num_labels=3)
    assert chosen.name == "torch"
    assert sorted(seen) == sorted((name, b) for name in ("cpp", "torch") for b in backend_choice.TIMED_BATCHES)
    assert 256 in backend_choice.TIMED_BATCHES and 64 in backend_choice.TIMED_BATCHES


def test_step_seconds_times_a_real_layer():
    for name in ("cpp", "torch"):
        backend = backend_registry.resolve_backend(name, CPU)
        seconds = backend_choice.step_seconds(backend, CPU, torch.float32, 32, 2, batch=8, seq_len=16, repeats=3)
        assert 0 < seconds < 1 and math.isfinite(seconds)


def test_patched_model_resolves_auto_with_its_shape(measured_on_cpu, monkeypatch):
    from conftest import tiny_batch, tiny_model

    calls = []
    monkeypatch.setattr(backend_choice.choose, "__defaults__", (_fake_timer({"cpp": 3.0, "torch": 1.0}, calls),))
    model = tiny_model("bert", num_labels=3)
    eek.patch(model, eek.Entropy(0.5))
    ids, mask, tt = tiny_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert {c[1:] for c in calls} == {("cpu", torch.float32, 32, 3)}
    assert backend_choice.auto_choices()[("cpu", "float32", 32, 3)][0] == "torch"


def test_a_backend_failing_its_measurement_is_not_chosen(measured_on_cpu, monkeypatch):
    def measure(backend, *shape):
        if backend.name == "cpp":
            raise RuntimeError("no kernel image for this GPU")
        return 5.0

    monkeypatch.setattr(backend_choice.choose, "__defaults__", (measure,))
    with pytest.warns(UserWarning, match="'cpp' failed while timed"):
        chosen = backend_registry.resolve_backend("auto", CPU, dtype=torch.float32, hidden_size=64, num_labels=3)
    assert chosen.name == "torch"


def test_auto_takes_the_static_order_when_every_measurement_fails_and_retries_later(measured_on_cpu, monkeypatch):
    calls = []

    def measure(backend, *shape):
        calls.append(backend.name)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backend_choice.choose, "__defaults__", (measure,))
    for _ in range(2):
        with pytest.warns(UserWarning, match="out of memory"):
            chosen = backend_registry.resolve_backend("auto", CPU, dtype=torch.float16, hidden_size=64, num_labels=3)
        assert chosen.name == "cpp"  # the first of the static order
    assert len(calls) == 4, "a failure that may pass must not be kept"
    assert ("cpu", "float16", 64, 3) not in backend_choice.auto_choices()
