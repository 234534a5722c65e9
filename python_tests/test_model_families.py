"""Every supported encoder family keeps the package's guarantees (tiny random models, built offline).

(a) a policy that never exits gives exactly the unpatched model's logits; (b) the early-exit
path agrees with the all-exits path; (c) compaction and padding trimming give what each row
run alone gives; (d) save_pretrained / from_pretrained round trips; (e) the continuous engine
gives the per-batch engine's labels and exit layers; (f) the training loss has gradients.
"""

import pytest
import torch
from conftest import TINY_SIZES, VOCAB
from model_comparison import assert_same_function, assert_same_weights
from threshold_helpers import assert_clear_of_threshold, midway
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    CamembertConfig,
    CamembertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

import earlyexit_kernels as eek
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.models import SUPPORTED_MODELS, TanhPoolerHead, adapter_class
from earlyexit_kernels.patching.patch import current_adapter

NUM_LAYERS = 3
FAMILIES = (
    "bert",
    "albert",
    "roberta",
    "xlm_roberta",
    "camembert",
    "distilbert",
    "electra",
    "deberta_v2",
    "modernbert",
    "modernbert_mean",
    "mpnet",
)
ATTENTION = {"deberta_v2": ("eager",), "mpnet": ("eager",)}  # the others: eager and sdpa
FUSED = {"bert", "albert", "roberta", "xlm_roberta", "camembert", "mpnet"}
PAD_ONE = {"roberta", "xlm_roberta", "camembert", "mpnet"}  # their pad token is 1 (positions skip it)
WITH_TOKEN_TYPES = {"bert", "albert", "electra", "deberta_v2"}  # RoBERTa-likes have type_vocab_size 1


def tiny_family(family: str, *, attn: str = "eager", seed: int = 0, num_labels: int = 3):
    """A small random classifier of ``family`` in eval mode (hidden 32, 2 heads, 3 layers)."""
    torch.manual_seed(seed)
    sizes = dict(**TINY_SIZES, num_hidden_layers=NUM_LAYERS, intermediate_size=48, num_labels=num_labels)
    common = dict(**sizes, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)

    def modernbert(pooling):
        config = ModernBertConfig(
            **sizes,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=2,
            cls_token_id=2,
            sep_token_id=2,
            global_attn_every_n_layers=2,
            local_attention=8,
            classifier_pooling=pooling,
            attention_dropout=0.1,
            mlp_dropout=0.1,
            embedding_dropout=0.1,
            classifier_dropout=0.1,
        )
        return ModernBertForSequenceClassification, config

    roberta_like = dict(pad_token_id=1, type_vocab_size=1, **common)
    builders = {
        "bert": lambda: (BertForSequenceClassification, BertConfig(**common)),
        "albert": lambda: (
            AlbertForSequenceClassification,
            AlbertConfig(embedding_size=16, num_hidden_groups=1, classifier_dropout_prob=0.1, **common),
        ),
        "roberta": lambda: (RobertaForSequenceClassification, RobertaConfig(**roberta_like)),
        "xlm_roberta": lambda: (XLMRobertaForSequenceClassification, XLMRobertaConfig(**roberta_like)),
        "camembert": lambda: (CamembertForSequenceClassification, CamembertConfig(**roberta_like)),
        "distilbert": lambda: (
            DistilBertForSequenceClassification,
            DistilBertConfig(
                vocab_size=VOCAB,
                dim=32,
                n_layers=NUM_LAYERS,
                n_heads=2,
                hidden_dim=48,
                max_position_embeddings=64,
                num_labels=num_labels,
                dropout=0.1,
                attention_dropout=0.1,
                seq_classif_dropout=0.1,
            ),
        ),
        "electra": lambda: (ElectraForSequenceClassification, ElectraConfig(embedding_size=16, **common)),
        # DeBERTa-v3's layout (buckets, log positions, shared keys, both disentangled terms) with
        # the v2 convolution after layer 1 and token types, so that every path runs.
        # Layers 1 and 3 global, 2 local with a window (8) shorter than the sequences.
        # Sequences of 12-16 tokens reach the logarithmic buckets of the bias (distance >= 8).
        "mpnet": lambda: (MPNetForSequenceClassification, MPNetConfig(pad_token_id=1, **common)),
        "modernbert": lambda: modernbert("cls"),
        "modernbert_mean": lambda: modernbert("mean"),
        "deberta_v2": lambda: (
            DebertaV2ForSequenceClassification,
            DebertaV2Config(
                relative_attention=True,
                position_buckets=8,
                max_relative_positions=16,
                pos_att_type=["p2c", "c2p"],
                share_att_key=True,
                norm_rel_ebd="layer_norm",
                position_biased_input=False,
                conv_kernel_size=3,
                conv_act="gelu",
                type_vocab_size=2,
                pooler_hidden_size=32,
                pooler_hidden_act="gelu",
                pooler_dropout=0.1,
                **common,
            ),
        ),
    }
    model_class, config = builders[family]()
    model = model_class._from_config(config, attn_implementation=attn).eval()
    # Random classifier weights large enough that the heads disagree from layer to layer.
    generator = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def tiny_inputs(family: str, batch: int = 6, seq_len: int = 12, *, seed: int = 1, padded: bool = True):
    """Keyword inputs: ids (pad token in the padding), a right-padded mask (row 0 full), token types."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padded:
        lengths = torch.randint(2, seq_len + 1, (batch,), generator=generator)
        lengths[0] = seq_len
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 1 if family in PAD_ONE else 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in WITH_TOKEN_TYPES:
        inputs["token_type_ids"] = torch.randint(0, 2, (batch, seq_len), generator=generator)
    return inputs


def spread_heads(model, seed: int = 0) -> None:
    """Give the internal exit heads distinct values so that sequences leave at different layers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.early_exit_heads.classifiers:
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 3.0)
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.5)


def spread_threshold(model, inputs) -> float:
    """An entropy threshold near the median of the internal heads' entropies: exits spread over layers."""
    with torch.no_grad():
        all_logits = model(**inputs, return_all_exits=True).all_logits
    values = entropy(all_logits[:-1].float()).flatten().sort().values
    middle = len(values) // 2
    return float(values[middle - 1] + values[middle]) / 2


def backends():
    available = eek.backends()
    return [name for name in ("torch", "cpp") if available[name]]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_every_family_is_registered_with_the_right_adapter(family):
    model = tiny_family(family)
    assert type(model) in SUPPORTED_MODELS
    adapter = adapter_class(model)
    # The fused kernels implement the tanh pooler only: other heads must not offer its weights.
    assert issubclass(adapter, TanhPoolerHead) == (family in FUSED)
    assert hasattr(adapter, "head_weights") == (family in FUSED)


@pytest.mark.exact
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [True, False])
def test_a_policy_that_never_exits_gives_exactly_the_unpatched_logits(family, attn, padded, backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} unavailable")
    if attn not in ATTENTION.get(family, ("eager", "sdpa")):
        pytest.skip(f"{family} has its own attention code: eager only")
    assert_never_exiting_is_unpatched(
        tiny_family(family, attn=attn), tiny_inputs(family, 7, 12, padded=padded), backend
    )


def assert_never_exiting_is_unpatched(model, inputs, backend, step="auto"):
    """Patched with a policy that never exits (heads spread), the logits are the unpatched model's, bit for bit."""
    with torch.no_grad():
        reference = model(**inputs).logits
        eek.patch(model, eek.Entropy(0.0), backend=backend, step=step)
        spread_heads(model)
        out = model(**inputs)
    assert torch.equal(out.logits, reference)
    assert out.exit_layer.tolist() == [NUM_LAYERS] * len(reference)


def test_the_early_exit_path_agrees_with_the_all_exits_path(family):
    model = tiny_family(family, seed=2)
    inputs = tiny_inputs(family, 16, 12, seed=3)
    eek.patch(model, eek.Entropy(0.0), backend="torch")
    spread_heads(model, seed=2)
    eek.patch(model, eek.Entropy(spread_threshold(model, inputs)))
    with torch.no_grad():
        early = model(**inputs)
        full = model(**inputs, return_all_exits=True)
    assert torch.equal(early.exit_layer, full.exit_layer)
    assert len(set(early.exit_layer.tolist())) >= 2, "the test needs exits spread over layers"
    torch.testing.assert_close(early.logits, full.logits, rtol=1e-4, atol=1e-5)
    picked = full.all_logits[early.exit_layer - 1, torch.arange(16)]
    torch.testing.assert_close(early.logits, picked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_compaction_and_trimming_give_what_each_row_alone_gives(family, backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} unavailable")
    if backend == "triton" and family not in ("roberta", "distilbert"):
        pytest.skip("triton runs in its interpreter here: one fused and one unfused family suffice")
    assert_each_row_as_alone(tiny_family(family, seed=4), tiny_inputs(family, 12, 14, seed=5), backend)


def assert_each_row_as_alone(model, inputs, backend):
    """Patched with exits spread over the layers, every row of the batch leaves where it leaves run alone
    (its own length, no padding), with the same logits."""
    eek.patch(model, eek.Entropy(0.0), backend="torch")
    spread_heads(model, seed=4)
    eek.patch(model, eek.Entropy(spread_threshold(model, inputs)), backend=backend)
    assert_rows_leave_as_alone(model, inputs)


def assert_rows_leave_as_alone(model, inputs) -> None:
    """Every row of the padded batch leaves where it leaves run alone (its own length), with the
    same logits; the batch has rows leaving at different layers and mixed lengths."""
    with torch.no_grad():
        out = model(**inputs)
        lengths = inputs["attention_mask"].sum(1).tolist()
        for row, length in enumerate(lengths):
            alone = model(**{k: v[row : row + 1, :length] for k, v in inputs.items()})
            assert int(alone.exit_layer) == int(out.exit_layer[row]), row
            torch.testing.assert_close(out.logits[row], alone.logits[0], rtol=1e-4, atol=1e-5)
    assert len(set(out.exit_layer.tolist())) >= 2, "the test needs rows leaving at different layers"
    assert len(set(lengths)) >= 3, "the test needs mixed lengths"


def test_save_pretrained_and_from_pretrained_round_trip(family, tmp_path):
    model = tiny_family(family, seed=6)
    inputs = tiny_inputs(family, 8, 10, seed=7)
    eek.patch(model, eek.QExit(), backend="torch")  # a halting head is saved too
    eek.patch(model, eek.Patience(1), backend="torch")
    spread_heads(model, seed=6)
    model.save_pretrained(tmp_path)
    loaded = eek.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and repr(eek.policy_of(loaded)) == repr(eek.policy_of(model))
    assert_same_weights(loaded, model)
    with torch.no_grad():
        a, b = model(**inputs, return_all_exits=True), loaded(**inputs, return_all_exits=True)
        c, d = model(**inputs), loaded(**inputs)
    assert_same_function(b.all_logits, a.all_logits)
    assert_clear_of_threshold(eek.policy_of(model), a, NUM_LAYERS)  # so rounding cannot move an exit
    assert_same_function(d.logits, c.logits)
    assert torch.equal(c.exit_layer, d.exit_layer)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_the_continuous_engine_gives_the_per_batch_labels_and_exit_layers(family, backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} unavailable")
    model = tiny_family(family, seed=8)
    inputs = tiny_inputs(family, 16, 16, seed=9)
    eek.patch(model, eek.Entropy(0.0), backend="torch")
    spread_heads(model, seed=8)
    eek.patch(model, eek.Entropy(spread_threshold(model, inputs)), backend=backend)
    assert_continuous_as_per_batch(model, inputs)


def assert_continuous_as_per_batch(model, inputs) -> None:
    """``eek.classify`` (the continuous engine, small calls) gives the per-batch forward's labels, exits and
    logits; the rows leave at two layers at least."""
    lengths = inputs["attention_mask"].sum(1).tolist()
    items = []
    for row, length in enumerate(lengths):
        item = {"input_ids": inputs["input_ids"][row, :length].tolist()}
        if "token_type_ids" in inputs:
            item["token_type_ids"] = inputs["token_type_ids"][row, :length].tolist()
        items.append(item)
    with torch.no_grad():
        batched = model(**inputs)
    predictions = list(eek.classify(model, items, max_batch_size=4, max_in_flight=8))
    assert [p.exit_layer for p in predictions] == batched.exit_layer.tolist()
    assert [int(p.logits.argmax()) for p in predictions] == batched.logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.stack([p.logits for p in predictions]), batched.logits, rtol=1e-4, atol=1e-5)
    assert len({p.exit_layer for p in predictions}) >= 2


def test_the_training_loss_has_gradients(family):
    model = tiny_family(family, seed=10)
    inputs = tiny_inputs(family, 6, 10, seed=11)
    eek.patch(model, eek.Patience(1), objective="pabee")
    model.train()
    out = model(**inputs, labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.all_logits.shape == (NUM_LAYERS, 6, 3)
    out.loss.backward()
    for head in model.early_exit_heads.classifiers:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    adapter = current_adapter(model)
    assert adapter.final_classifier.weight.grad.abs().sum() > 0
    first_layer = next(adapter.layer_module(0).parameters())
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["distilbert", "modernbert", "mpnet"])
def test_families_without_token_types_refuse_them(family):
    model = tiny_family(family)
    eek.patch(model, eek.Entropy(0.0))
    inputs = tiny_inputs(family, 2, 5)
    with pytest.raises(TypeError, match="token_type_ids"):
        model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]))
    with pytest.raises(TypeError, match="token_type_ids"):
        list(eek.classify(model, [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 0]}]))


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_an_attention_implementation_the_adapter_cannot_run_is_refused_at_patch(family, implementation):
    model = tiny_family(family)
    model.config._attn_implementation = implementation
    accepted = " or ".join(repr(a) for a in ATTENTION.get(family, ("eager", "sdpa")))
    with pytest.raises(ValueError, match=f"attn_implementation {accepted}; .*load it with"):
        eek.patch(model, eek.Entropy(0.0))


@pytest.mark.parametrize("family", ["deberta_v2", "modernbert", "mpnet"])
def test_the_continuous_engine_refuses_to_compile_layers_that_take_more_than_a_mask(family):
    from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine

    model = tiny_family(family)
    eek.patch(model, eek.Entropy(0.0))
    with pytest.raises(ValueError, match="compile=True"):
        ContinuousEngine(model, max_batch_size=4, max_in_flight=8, compile=True)


@pytest.mark.exact
def test_modernbert_follows_a_change_of_attention_implementation_after_patching():
    model = tiny_family("modernbert", attn="sdpa")
    inputs = tiny_inputs("modernbert", 4, 12, padded=False)
    eek.patch(model, eek.Entropy(0.0))
    with torch.no_grad():
        model(**inputs)
        model.set_attn_implementation("eager")
        out = model(**inputs)
        eek.unpatch(model)
        reference = model(**inputs).logits
    assert torch.equal(out.logits, reference)


@pytest.mark.exact
def test_a_mask_buffer_refilled_in_place_between_forwards_is_read_again(family):
    """Serving code reuses one input buffer per batch: nothing built from the last mask may be kept."""
    model = tiny_family(family)
    eek.patch(model, eek.Entropy(0.0))  # nothing exits: full-depth logits, comparable with the plain model
    first, second = tiny_inputs(family, seed=1), tiny_inputs(family, seed=2)
    assert not torch.equal(first["attention_mask"], second["attention_mask"])
    buffer = {name: tensor.clone() for name, tensor in first.items()}
    with torch.no_grad():
        model(**buffer)
        for name, tensor in buffer.items():
            tensor.copy_(second[name])
        refilled = model(**buffer).logits
        fresh = model(**{name: tensor.clone() for name, tensor in second.items()}).logits
    torch.testing.assert_close(refilled, fresh, rtol=0, atol=0)


def test_mpnet_heads_pool_the_mean_as_the_model_was_pre_trained():
    assert eek.head_config(eek.patch(tiny_family("mpnet"), eek.Entropy(0.1))).pooling == "mean"
    assert eek.head_config(eek.patch(tiny_family("mpnet"), eek.Entropy(0.1), pooling="cls")).pooling == "cls"


@pytest.mark.exact
def test_mpnet_builds_its_position_bias_once_and_again_only_when_its_weights_change(monkeypatch):
    """Rows leaving and padding trimmed slice the bias of the longest length: no new build, the same values."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    model = tiny_family("mpnet", seed=12)
    inputs = tiny_inputs("mpnet", 12, 14, seed=13)
    builds = []
    original = MPNetEncoder.compute_position_bias
    monkeypatch.setattr(
        MPNetEncoder, "compute_position_bias", lambda self, x, *a, **k: builds.append(x.shape[1]) or original(self, x)
    )
    eek.patch(model, eek.Entropy(0.0), backend="torch")
    spread_heads(model, seed=12)
    eek.patch(model, eek.Entropy(spread_threshold(model, inputs)))
    with torch.no_grad():
        builds.clear()
        out = model(**inputs)
        again = model(**inputs)
        assert len(set(out.exit_layer.tolist())) >= 2, "the test needs rows leaving at different layers"
        assert builds == [14], "one build for the first forward, none for the second"
        assert torch.equal(out.logits, again.logits)
        model.mpnet.encoder.relative_attention_bias.weight.mul_(2.0)
        changed = model(**{k: v.clone() for k, v in inputs.items()})
        assert builds == [14, 14]
        eek.patch(model, eek.Entropy(0.0))
        full = model(**inputs).logits
        reference = eek.unpatch(model)(**inputs).logits
    assert not torch.equal(changed.logits, out.logits)
    assert torch.equal(full, reference)


def test_mpnet_training_reaches_the_position_bias():
    model = tiny_family("mpnet", seed=14)
    eek.patch(model, eek.Patience(1), objective="pabee")
    model.train()
    out = model(**tiny_inputs("mpnet", 6, 12, seed=15), labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    out.loss.backward()
    grad = model.mpnet.encoder.relative_attention_bias.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_mlp_heads_run_the_cpu_s_whole_step_where_the_family_allows_and_agree_with_torch(family):
    """On the CPU the cpp backend runs an MLP head's pooling, head and rule as one op on every family
    but ModernBERT (whose final norm comes before pooling); the decisions are the torch backend's."""
    if not eek.backends()["cpp"]:
        pytest.skip("the C++ backend is not built")
    inputs = tiny_inputs(family, 12, 14, seed=5)
    model = tiny_family(family, seed=4)
    eek.patch(model, eek.Entropy(0.0), backend="torch", pooling="mean", head="mlp")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.early_exit_heads.classifiers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        values = entropy(model(**inputs, return_all_exits=True).all_logits[:-1].float())
        policy = eek.Entropy(midway(values, min_margin=1e-4))
        eek.patch(model, policy, backend="torch")
        expected = model(**inputs)
        eek.patch(model, policy, backend="cpp")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            got = model(**inputs)
    fused = "earlyexit::cpp_pooled_head_exit_step" in {event.name for event in profile.events()}
    assert fused == (not family.startswith("modernbert"))
    assert torch.equal(got.exit_layer, expected.exit_layer)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    assert len(set(expected.exit_layer.tolist())) >= 2, "the test needs rows leaving at different layers"


# ----------------------------------------------------------------------------- (a) and (c) on a GPU
# The same two guarantees with the model and inputs on the GPU, on every backend that runs there
# (compiled Triton, the CUDA kernels, PyTorch). Skipped without CUDA: scripts/gpu_session.sh runs them.

GPU_BACKENDS = ("torch", "triton", "cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_gpu(inputs):
    return {k: v.cuda() for k, v in inputs.items()}


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_on_the_gpu_a_policy_that_never_exits_gives_exactly_the_unpatched_logits(family, attn, backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} unavailable: {eek.backend_status()[backend]}")
    if attn not in ATTENTION.get(family, ("eager", "sdpa")):
        pytest.skip(f"{family} has its own attention code: eager only")
    # the exact step's promise; the graphed step's, to rounding, is test_graphed_step.py's
    assert_never_exiting_is_unpatched(
        tiny_family(family, attn=attn).cuda(), _on_gpu(tiny_inputs(family, 7, 12)), backend, step="exact"
    )


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_on_the_gpu_compaction_and_trimming_give_what_each_row_alone_gives(family, backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} unavailable: {eek.backend_status()[backend]}")
    assert_each_row_as_alone(tiny_family(family, seed=4).cuda(), _on_gpu(tiny_inputs(family, 12, 14, seed=5)), backend)
