"""The packed-token step (engine/engines/varlen/token_step.py) and its engine (engine/engines/varlen/engine.py), on the CPU twin.

A cohort's sequences run as concatenated tokens with a varlen attention: each sequence exits where
the exact step on the padded batch makes it exit, with its logits up to rounding; no read-back
stalls a layer; the tokens a layer runs are the survivors' tokens, no padding; the packed attention
equals SDPA one sequence at a time; what the tokens of no row hold never reaches a live one; a model
the step cannot run is refused with what to use instead."""

import pytest
import torch
from test_classify import _sequences, spread_model
from test_cohort_engine import _padded, _run, assert_engine_thread_runs, assert_exact_steps_exits
from test_model_families import tiny_family

import earlyexit_kernels as eek
from earlyexit_kernels.bench.packed_bert import varlen_attention_reference
from earlyexit_kernels.engine.engines.choice import engine_kind, make_engine
from earlyexit_kernels.engine.engines.varlen.engine import VarlenEngine, packed_cohort_size
from earlyexit_kernels.engine.engines.varlen.token_step import TOKEN_SIZES, PackedInputs, run_tokens
from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES
from earlyexit_kernels.engine.graphed.static_step import StaticBatches
from earlyexit_kernels.engine.layers.packed_layer import OpByOpLayer
from earlyexit_kernels.engine.layers.varlen_attention import (
    fused_varlen_available,
    grid_attention,
    token_layout,
)
from earlyexit_kernels.engine.stream.engine_config import EngineConfig
from earlyexit_kernels.patching.state import state_of


@pytest.mark.parametrize("name", ["entropy", "patience", "qexit"])
def test_each_sequence_exits_where_the_exact_step_makes_it_exit(name):
    items = _sequences(48, seed=4, longest=30)
    model, policy = spread_model("bert", name, items)
    model.to(torch.float64)
    eek.patch(model, policy, step="exact")
    engine = VarlenEngine(model, max_batch_size=8, admission="length")
    finished = assert_exact_steps_exits(model, items, engine)
    assert len({done.exit_layer for done in finished.values()}) > 2, "the test needs exits spread over layers"
    assert engine.stats.host_syncs == 0 and engine.stats.calls >= 6  # no read-back stalls a layer


@pytest.mark.parametrize("name", ["entropy", "qexit"])
def test_the_gpus_plan_buckets_and_a_late_count_change_no_exit_and_no_garbage_reaches_a_live_row(name):
    """The GPU's plan on the CPU: rows and tokens in fixed buckets, the counts read a layer late, so calls
    hold dead rows and tokens of no row; NaN written over those after every layer never reaches an output."""
    items = _sequences(48, seed=4, longest=30)
    model, policy = spread_model("bert", name, items)
    model.to(torch.float64)
    eek.patch(model, policy, step="exact")
    state_of(model).static_batches = StaticBatches(sizes=DEFAULT_SIZES, lag=1, dead_fill=float("nan"))
    engine = VarlenEngine(model, max_batch_size=8, admission="length")
    assert_exact_steps_exits(model, items, engine)
    assert engine.stats.slots > engine.stats.tokens  # the buckets held tokens of no row


def test_each_layer_runs_the_survivors_tokens_and_no_padding():
    items = _sequences(24, seed=3, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="exact")
    state = state_of(model)
    padded = _padded(items)
    lengths = padded["attention_mask"].sum(1)
    with torch.no_grad():
        exact = model(**padded)
        hidden = state.adapter.embed(padded["input_ids"], padded["token_type_ids"], None, None)
        inputs = PackedInputs(hidden, lengths, int(lengths.max()), int(lengths.sum()))
        backend = VarlenEngine(model).backend  # the backend the engine resolves for the model
        result = run_tokens(state.adapter, model.early_exit_heads, policy, backend, inputs, batches=StaticBatches())
    assert torch.equal(result.exit_layer, exact.exit_layer)
    survivors = [int(lengths[exact.exit_layer >= layer].sum()) for layer in range(1, len(result.token_buckets) + 1)]
    assert result.token_buckets == survivors and survivors[-1] < survivors[0]  # every call its survivors' tokens
    assert result.buckets == [int((exact.exit_layer >= layer).sum()) for layer in range(1, len(result.buckets) + 1)]


def test_the_packed_attention_equals_sdpa_one_sequence_at_a_time():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 0, 1, 9, 3])  # an empty row among them
    tokens = int(lengths.sum()) + 6  # tokens of no row after the last
    q, k, v = (torch.randn(tokens, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    layout = token_layout(lengths, tokens, longest=12)
    out = grid_attention(q, k, v, layout, scale=8**-0.5)
    cu = layout.cu.to(torch.int32)
    real = int(lengths.sum())
    expected = varlen_attention_reference(q[:real], k[:real], v[:real], cu, 9)
    torch.testing.assert_close(out[:real], expected, rtol=0, atol=1e-12)
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))
    assert layout.row.tolist() == [0] * 5 + [2] + [3] * 9 + [4] * 3 + [5] * 6  # the empty row holds no token
    assert not fused_varlen_available(torch.device("cpu"))
    assert not fused_varlen_available(torch.device("cpu"), torch.bfloat16, 64)  # flash attention is CUDA's


def test_the_fused_varlen_call_takes_the_layouts_tensors_on_the_meta_device():
    """Flash attention's varlen kernel runs only on CUDA; its fake (meta) implementation checks the call the
    GPU's step makes: int32 offsets, the longest as the bound, [t, heads, d] in and out, in bf16."""
    from dataclasses import replace

    from earlyexit_kernels.engine.layers.varlen_attention import fused_attention

    pytest.importorskip("torch.nn.attention.varlen", reason="torch < 2.10 has no varlen attention")
    layout = token_layout(torch.tensor([3, 0, 5]), 10, longest=32)
    query = torch.empty(10, 2, 64, dtype=torch.bfloat16, device="meta")
    out = fused_attention(query, query, query, replace(layout, cu=layout.cu.to("meta")), 0.125)
    assert out.shape == (10, 2, 64) and out.dtype == torch.bfloat16


def test_a_layer_on_packed_tokens_is_the_layer_on_each_sequence_alone():
    model = tiny_family("bert").double()
    layer = model.bert.encoder.layer[0]
    lengths = [4, 7, 1]
    generator = torch.Generator().manual_seed(1)
    alone = [torch.randn(1, n, 32, generator=generator, dtype=torch.float64) for n in lengths]
    layout = token_layout(torch.tensor(lengths), sum(lengths), max(lengths))
    with torch.no_grad():
        packed = OpByOpLayer(layer).on_tokens(
            torch.cat([x[0] for x in alone]), lambda q, k, v, scale: grid_attention(q, k, v, layout, scale)
        )
        outputs = [layer(x) for x in alone]  # a tuple in older transformers
        expected = torch.cat([(out[0] if isinstance(out, tuple) else out)[0] for out in outputs])
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "family, options",
    [
        ("bert", {"pooling": "mean", "head": "mlp", "mlp_hidden": 16}),
        ("bert", {"pooling": "mean", "head": "cascade", "mlp_hidden": 16}),
        ("roberta", {}),
        ("xlm_roberta", {}),
        ("electra", {}),
    ],
)
def test_head_forms_and_bert_style_families_exit_where_the_exact_step_does(family, options):
    model = tiny_family(family).double()
    model.eval()
    _scramble(model)
    eek.patch(model, eek.Patience(1), step="exact", **options)
    _scramble(model.early_exit_heads)
    items = _sequences(32, seed=9, longest=24, pairs=family == "bert")
    for item in items:  # the RoBERTa-likes' padding index is 1: ids from 3 on
        item.setdefault("token_type_ids", [0] * len(item["input_ids"]))
    finished = assert_exact_steps_exits(model, items, VarlenEngine(model, max_batch_size=8, admission="length"))
    assert len({done.exit_layer for done in finished.values()}) > 1, "the test needs exits at several layers"


def _scramble(module, scale=0.5, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


@pytest.mark.parametrize("family", ["distilbert", "mpnet", "modernbert"])
def test_a_model_the_packed_step_cannot_run_is_refused_naming_the_engine_to_use(family):
    model = tiny_family(family)
    eek.patch(model, eek.Entropy(0.5))
    with pytest.raises(ValueError, match="engine='varlen' cannot run this model: .*Use engine='cohorts'"):
        VarlenEngine(model)


def test_a_packed_cohort_holds_what_the_budget_of_real_tokens_allows():
    assert packed_cohort_size([5, 6, 7, 8, 9], max_rows=100, max_tokens=18) == 3  # 5 + 6 + 7, not padded to 7s
    assert packed_cohort_size([5, 6, 7], max_rows=2, max_tokens=10**6) == 2
    assert packed_cohort_size([300, 2], max_rows=8, max_tokens=256) == 1  # alone, over the budget
    items = _sequences(40, seed=5, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="exact")
    engine = VarlenEngine(model, max_batch_size=None, max_tokens=96)
    assert len(_run(engine, items)) == 40
    assert engine.stats.largest_call <= 96
    assert TOKEN_SIZES[:4] == (256, 384, 512, 768)


def test_varlen_is_chosen_by_name_in_classify_and_the_engine_thread():
    items = _sequences(30, seed=6, longest=30)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    assert engine_kind(model, EngineConfig()) == "continuous"  # on the CPU; "auto" never takes it
    assert engine_kind(model, EngineConfig(engine="varlen")) == "varlen"
    assert isinstance(make_engine(model, EngineConfig(engine="varlen")), VarlenEngine)
    assert_engine_thread_runs(model, items, "varlen", VarlenEngine)


def test_concurrent_clients_of_a_server_on_the_varlen_engine_get_eek_classify_s_answers(loaded_classifier):
    """A real server on 127.0.0.1 (eek serve --engine varlen), 8 clients at once: each text's exit layer is
    the continuous engine's and its scores are within float32 rounding of it."""
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
    pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
    httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    from conftest import word_texts
    from served_models import serving

    model, tokenizer = loaded_classifier
    texts = [t or "w1" for t in word_texts(48, seed=23)]
    expected = list(eek.classify(model, texts, tokenizer=tokenizer, engine="continuous"))
    assert len({r.exit_layer for r in expected}) > 1, "the test needs exits at several layers"
    with serving(model, tokenizer, max_batch_size=16, engine="varlen") as running:
        assert isinstance(running.app.state.eek.worker.engine, VarlenEngine)

        def ask(i):
            return httpx.post(running.url + "/predict", json={"inputs": [[texts[i]]], "raw_scores": True}, timeout=60)

        with ThreadPoolExecutor(8) as clients:
            responses = list(clients.map(ask, range(len(texts))))
    for i, response in enumerate(responses):
        assert response.status_code == 200
        answer = response.json()[0]
        assert answer[0]["exit_layer"] == expected[i].exit_layer
        scores = sorted(item["score"] for item in answer)
        reference = sorted(expected[i].logits.tolist())
        assert scores == pytest.approx(reference, abs=1e-5)


@pytest.mark.parametrize("kind", ["cohorts", "segments", "varlen"])
def test_a_new_threshold_never_replays_graphs_captured_under_the_old_one(kind, monkeypatch):
    """The kernels take a policy's thresholds as launch arguments, so a CUDA graph replays the thresholds it
    was captured with. After set_policy (online re-certification), each static batch the GPU's stream engines
    use drops its graphs before its next step; the same thresholds again keep them. Counted on the CPU, where
    nothing is captured, by the calls that drop them."""
    from earlyexit_kernels.engine.graphed.step_graphs import StepGraphs

    items = _sequences(24, seed=8, longest=20)
    model, policy = spread_model("bert", "entropy", items)
    eek.patch(model, policy, step="graphed")
    dropped = []
    monkeypatch.setattr(StepGraphs, "forget", lambda graphs, stale: dropped.append(stale(("any", "key"))))
    engine = make_engine(model, EngineConfig(engine=kind, max_batch_size=8))
    _run(engine, items)
    first = len(dropped)  # each static batch's first use, under no policy yet
    assert first > 0 and all(dropped)
    engine.set_policy(eek.Entropy(policy.threshold))  # the same thresholds: the graphs stay
    _run(engine, items)
    assert len(dropped) == first
    engine.set_policy(eek.Entropy(policy.threshold / 2))
    _run(engine, items)
    assert len(dropped) > first


@pytest.mark.parametrize(
    "capability, dtype, head_size, fused",
    [
        ((9, 0), torch.bfloat16, 64, True),  # an H100 or H200, BERT-base's heads
        ((8, 0), torch.float16, 32, True),  # an A100, MiniLM's heads
        ((7, 5), torch.bfloat16, 64, False),  # a T4: flash attention needs Ampere or later
        ((9, 0), torch.float32, 64, False),  # flash attention takes half precision only
        ((9, 0), torch.bfloat16, 20, False),  # a head size flash attention has no kernel for
        ((9, 0), torch.bfloat16, 512, False),
    ],
)
def test_the_fused_kernel_is_taken_only_where_flash_attention_runs(capability, dtype, head_size, fused, monkeypatch):
    """Elsewhere the step takes the grid: a fused kernel that raised would fail the first capture, which stops
    capture for every engine in the process."""
    pytest.importorskip("torch.nn.attention.varlen", reason="torch < 2.10 has no varlen attention")
    from earlyexit_kernels.engine.layers.varlen_attention import attention_for, fused_attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert fused_varlen_available(cuda, dtype, head_size) is fused
    assert (attention_for(cuda, dtype, head_size) is fused_attention) is fused
