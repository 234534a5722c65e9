"""The Hugging Face drop-in: ``eek.patch(model, policy)`` and ``eek.unpatch(model)``.

The patching lives here; the knowledge of each Hugging Face family lives in
:mod:`earlyexit_kernels.models`: one small adapter per architecture tells the engine how to
embed, build a layer's mask, run layer ``i``, pool and classify. ``SUPPORTED_MODELS`` (re-exported
from there) lists the supported classes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from earlyexit_kernels.backends.registry import check_backend_name, resolve_backend
from earlyexit_kernels.engine.graphed.prologue import eligible
from earlyexit_kernels.engine.graphed.static_step import capture_by_default, run_graphed, static_batches_of
from earlyexit_kernels.engine.graphed.step_graphs import on_device
from earlyexit_kernels.engine.layers.module_weights import linear_compute_dtype, linear_device
from earlyexit_kernels.engine.step.batch_loop import mask_extents, run_early_exit
from earlyexit_kernels.engine.step.heads import MLP_FORMS, ExitHeadConfig, ExitHeads, check_head_choice
from earlyexit_kernels.engine.step.inputs import check_id_range
from earlyexit_kernels.engine.step.ov_exit_graph import run_exit_graph
from earlyexit_kernels.engine.step.step_choice import check_graphed_policy, check_step_name, resolve_step
from earlyexit_kernels.methods.losses import Objective, objective
from earlyexit_kernels.methods.policies import ExitPolicy, SkipGates
from earlyexit_kernels.models import SUPPORTED_MODELS, EncoderAdapterBase, adapter_class
from earlyexit_kernels.patching.exit_files import save_exit_heads
from earlyexit_kernels.patching.state import (
    HEADS,
    PatchedState,
    attach,
    detach,
    detached,
    drop_detached_heads,
    is_patched,
    read,
    set_detached,
    state_of,
)

__all__ = [
    "EarlyExitOutput",
    "patch",
    "head_config",
    "unpatch",
    "is_patched",
    "set_training_objective",
    "training_objective",
    "SUPPORTED_MODELS",
]

SUPPORTED_ATTENTION = ("eager", "sdpa")  # of the BERT-like families; each adapter names its own


@dataclass
class EarlyExitOutput(ModelOutput):
    """Output of a patched model's forward.

    logits: [B, C], what each sequence's exit decided (the model's dtype).
    exit_layer: [B] int64 in 1..L, the layer after which the sequence left.
    layers_run: [B] int64, layers computed (differs from exit_layer only with SkipGates).
    all_logits: [L, B, C], every head on every layer (``return_all_exits=True`` or training).
    all_halting: [L, B], the halting probabilities (QExit's lambda_i, DACT's h_i).
    all_skipped: [L, B] bool, which layers SkipGates skipped.
    host_syncs: (an attribute, not a field) how many times the forward read a value back to
        the host. It stays out of the output's fields so that ``pipeline`` unbatching and
        ``Trainer``'s gathering, which treat every field as a per-row tensor, never see an int.
    all_halting_logits: [L, B] float32, the halting head's logits before the sigmoid (what
        the exit rule reads; for an exact offline replay, see :mod:`earlyexit_kernels.training.calibrate_model`).
    all_gates: [L, B] float32, SmartBERT's gate probabilities (0 on layers 1 and L).
    loss: with ``labels``: in training mode the loss of the objective chosen with
        :func:`set_training_objective` (when one is set), else Hugging Face's loss on ``logits``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_layer: torch.Tensor | None = None
    layers_run: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None
    all_halting: torch.Tensor | None = None
    all_skipped: torch.Tensor | None = None
    all_halting_logits: torch.Tensor | None = None
    all_gates: torch.Tensor | None = None

    host_syncs = None  # not annotated, so not a dataclass field (see the docstring)


# The backends that run on CUDA tensors only (Triton's compiled kernels, the CUDA C++ kernels).
GPU_BACKENDS = ("triton", "cuda")


def _adapter_class(model) -> type[EncoderAdapterBase]:
    return adapter_class(model)


def policy_of(model) -> ExitPolicy:
    """The exit policy a model patched with :func:`patch` runs now (``ValueError`` if it is not patched)."""
    return state_of(model, "policy_of").policy


def step_of(model) -> str:
    """The step a patched model was given: ``"auto"``, ``"exact"`` or ``"graphed"`` (see :func:`patch`)."""
    return state_of(model, "step_of").step


def backend_of(model) -> str:
    """The backend a patched model was given: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    With ``"auto"`` the choice is made per device and shape on the first forward;
    :func:`earlyexit_kernels.backends.choice.auto_choices` shows what it chose.
    """
    return state_of(model, "backend_of").backend


def patch(
    model: nn.Module,
    policy: ExitPolicy,
    backend: str = "auto",
    *,
    step: str = "auto",
    objective: str | None = None,
    pooling: str | None = None,
    head: str | None = None,
    mlp_hidden: int | None = None,
) -> nn.Module:
    """Give ``model`` early exit with ``policy``, in place; returns the same model.

    Adds the per-layer heads of layers ``1..L-1`` and any head the policy needs. On a
    patched model it swaps the policy and keeps the heads.
    ``backend`` is ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
    ``step`` is how each layer's exits are settled at inference: ``"exact"`` compacts the batch
    after every layer where rows may leave (one read-back there), ``"graphed"`` keeps the batch in
    fixed buckets with exited rows as dead rows and reads nothing back between the first layer and
    the last (each (layer, bucket) step captured in a CUDA graph on a GPU; on the CPU the same step
    runs uncaptured), ``"auto"`` is ``"graphed"`` on CUDA and ``"exact"`` elsewhere (and for a policy
    the graphed step cannot run). Both give the same outputs (bit for bit on the CPU); see
    :mod:`earlyexit_kernels.engine.step.step_choice`. On the CPU, ``"auto"`` runs a model whose layers
    are static int8 layers on OpenVINO (``--layers openvino-static``) with an ``Entropy`` or ``MaxProb``
    policy in one OpenVINO call a batch: the layers, heads and rule in one compiled model
    (:mod:`earlyexit_kernels.engine.step.ov_exit_graph`; the same exits up to the heads' float rounding),
    ``"exact"`` layer by layer.
    ``objective`` (optional) is a training method name, as in
    :func:`set_training_objective`. ``model.save_pretrained(path)`` of a patched model
    also writes the exit heads and the policy (see :func:`earlyexit_kernels.from_pretrained`).

    How the internal heads read a layer (see :func:`head_config`): ``pooling`` is ``"cls"``
    (the [CLS] row) or ``"mean"`` (the mean of the valid tokens); ``head`` is ``"model"`` (the
    model's own head form, a Linear per layer initialised from its classifier), ``"mlp"``
    (an untrained ``LayerNorm -> Linear(H, mlp_hidden) -> GELU -> Linear(mlp_hidden, C)`` per
    layer, ``mlp_hidden`` defaulting to H) or ``"cascade"`` (that MLP plus a ``C x C`` map of the
    head below's logits, :class:`~earlyexit_kernels.engine.step.heads.CascadeExitHead`). None keeps what a patched model has, else the
    family's default (the model's own pooling, ``"model"``). A new form (or MLP width) builds
    new heads for layers ``1..L-1``. Layer ``L`` always runs the model's own pooling and classifier.
    """
    adapter_cls = _adapter_class(model)
    if not isinstance(policy, ExitPolicy):
        raise TypeError(
            f"policy must be an exit policy such as eek.Entropy(0.3) or eek.Patience(2); got {type(policy).__name__}"
        )
    check_backend_name(backend)
    check_step_name(step)
    if step == "graphed":
        check_graphed_policy(policy)
    config = model.config
    _check_config(config, adapter_cls)
    policy.check_fits(config.num_hidden_layers, config.num_labels)
    policy.check_problem_type(getattr(config, "problem_type", None))
    classifier = adapter_cls(model, None).final_classifier
    if backend != "auto":
        # A model patched on the CPU may go to the GPU afterwards (``eek.patch(...); model.cuda()``):
        # where a GPU is there, a GPU backend is checked against it; every forward checks the
        # device its tensors are on.
        device = linear_device(classifier)
        if device.type == "cpu" and torch.cuda.is_available() and backend in GPU_BACKENDS:
            device = torch.device("cuda")
        resolve_backend(backend, device, dtype=linear_compute_dtype(classifier))
    check_head_choice(pooling, head, mlp_hidden)

    kept_heads, kept_objective = detached(model)
    heads = getattr(model, HEADS, None)
    if heads is None:
        heads = kept_heads
    if heads is None:
        heads = ExitHeads(
            config.hidden_size, config.num_hidden_layers, classifier, pooling=adapter_cls.default_pooling(config)
        )
    _reconfigure(heads, classifier, pooling, head, mlp_hidden)
    # Heads kept aside by unpatch did not follow the model's .to()/.half() since: they do now.
    # (linear_device/linear_compute_dtype: the classifier may be quantized, see engine.module_weights)
    where = dict(device=linear_device(classifier), dtype=linear_compute_dtype(classifier))
    heads.to(**where)
    heads.ensure_for(policy, like=torch.empty(0, **where))
    heads.train(model.training)
    drop_detached_heads(model)
    model.add_module(HEADS, heads)
    # a policy swapped on a patched model, or a model patched again, keeps its training objective
    kept_objective = state_of(model).objective if is_patched(model) else kept_objective
    attach(model, PatchedState(policy, backend, adapter_cls(model, heads), objective=kept_objective, step=step))
    model.forward = _bind(_patched_forward, model)
    model.save_pretrained = _bind(_patched_save_pretrained, model)
    _hide_extras_from_trainer(config)
    if objective is not None:
        set_training_objective(model, objective)
    return model


def _reconfigure(heads: ExitHeads, classifier: nn.Module, pooling, head, mlp_hidden) -> None:
    """Apply the choices given to ``patch`` on heads that exist; None keeps what they have."""
    form = head or heads.form
    if mlp_hidden is not None and form not in MLP_FORMS:
        raise ValueError(
            'mlp_hidden is the width of head="mlp" or "cascade"; pass head="mlp" or head="cascade" with it'
        )
    if form != heads.form or (mlp_hidden is not None and mlp_hidden != heads.mlp_hidden):
        heads.set_form(form, mlp_hidden, classifier)
    if pooling is not None:
        heads.pooling = pooling


def head_config(model: nn.Module) -> ExitHeadConfig:
    """How the internal exit heads of a patched model read a layer: ``ExitHeadConfig(pooling, head, mlp_hidden)``.

    ``pooling`` is ``"cls"`` or ``"mean"``, ``head`` is ``"model"``, ``"mlp"`` or ``"cascade"``,
    ``mlp_hidden`` the MLP's width (None for ``"model"``). Chosen at :func:`patch`, saved by ``save_pretrained``.
    """
    state_of(model, "head_config")
    return getattr(model, HEADS).config


def current_adapter(model: nn.Module) -> EncoderAdapterBase:
    """The adapter of a patched model over its modules as they are now (see :func:`.state.read`)."""
    state_of(model, "current_adapter")
    return read(model).adapter


def _check_config(config, adapter_cls: type[EncoderAdapterBase]) -> None:
    """Refuse a configuration early exit cannot run as Hugging Face does (at patch and at every forward)."""
    accepted = adapter_cls.attention_implementations
    if config._attn_implementation not in accepted:
        names = " or ".join(repr(a) for a in accepted)
        raise ValueError(
            f"early exit runs {type(config).__name__.removesuffix('Config')} with attn_implementation {names}; "
            f"the model uses {config._attn_implementation!r}: load it with attn_implementation={accepted[-1]!r} "
            f"(or call model.set_attn_implementation({accepted[-1]!r}))"
        )
    if getattr(config, "is_decoder", False):
        raise ValueError(
            "config.is_decoder=True: Hugging Face runs this classifier with a causal attention mask, and early "
            "exit runs the encoder bidirectionally only; use a model with is_decoder=False or leave it unpatched"
        )


def _bind(function, model: nn.Module):
    """``function`` bound to ``model``, picklable: a bound method pickles as ``getattr(model, name)``,
    which cannot find the patched forward while the model itself is being unpickled."""
    bound = functools.partial(function, model)
    bound.__name__ = function.__name__.removeprefix("_patched_")
    bound.__doc__ = function.__doc__
    return bound


def set_training_objective(model: nn.Module, method: str | None, **loss_kwargs) -> nn.Module:
    """Choose the loss a patched model returns in training mode when it gets ``labels``.

    ``method`` is a name of :data:`earlyexit_kernels.methods.losses.OBJECTIVES` (``"pabee"``,
    ``"deebert_stage1"``, ``"deebert_stage2"``, ``"fastbert"``, ``"palbert"``,
    ``"ensemble"``, ``"dact"``, ``"smartbert_stage1"``, ``"smartbert_stage2"``) or None for
    Hugging Face's loss on the exit logits (the default). ``loss_kwargs`` go to the loss
    (``beta=``, ``tau=``, ...). With it a user's own ``transformers.Trainer`` script trains
    the exit heads: ``Trainer`` passes ``labels`` and reads ``outputs.loss``. Methods that
    train only part of the model (``trains`` of the objective) need the rest frozen, e.g.
    with :func:`earlyexit_kernels.training.train.select_trainable`. Returns the model.
    """
    if not is_patched(model):
        raise ValueError("set_training_objective needs a model patched with eek.patch")
    state = state_of(model)
    if method is None:
        state.objective = None
        return model
    chosen = objective(method)
    check_objective_policy(chosen, state.policy)
    state.objective = (chosen, dict(loss_kwargs))
    return model


def training_objective(model: nn.Module) -> tuple[Objective, dict] | None:
    """The ``(objective, loss_kwargs)`` chosen with :func:`set_training_objective`, or None."""
    if is_patched(model):
        return state_of(model).objective
    return detached(model)[1]


def check_objective_policy(chosen: Objective, policy: ExitPolicy) -> None:
    if chosen.policy is not None and type(policy).__name__ != chosen.policy:
        raise ValueError(
            f"the {chosen.name} loss needs the model patched with eek.{chosen.policy}(...) (for its "
            f"{'gates' if chosen.policy == 'SkipGates' else 'halting head'}), but the policy is "
            f"{type(policy).__name__}; call eek.patch(model, eek.{chosen.policy}(...)) first"
        )


def _patched_save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
    """``save_pretrained`` of a patched model: the model as Hugging Face saves it, without the
    exit heads, then the heads (safetensors) and the policy (JSON) next to it."""
    heads = self._modules.pop(HEADS)
    _restore_trainer_keys(self.config)
    try:
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEADS + ".")}
        type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)
    finally:
        self._modules[HEADS] = heads
        _hide_extras_from_trainer(self.config)
    if kwargs.get("is_main_process", True):
        save_exit_heads(self, save_directory, state_of(self))


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original forward; the heads are kept aside for a later ``patch``."""
    if not is_patched(model):
        raise ValueError("unpatch: the model is not patched by eek.patch")
    del model.forward
    vars(model).pop("save_pretrained", None)
    heads = getattr(model, HEADS)
    del model._modules[HEADS]
    set_detached(model, heads, detach(model).objective)
    _restore_trainer_keys(model.config)
    return model


# ``Trainer.predict``/``evaluate`` hand ``compute_metrics`` every output field not named in
# ``config.keys_to_ignore_at_inference``; without this a metric written for the plain model
# (``predictions.argmax(-1)``) would get a tuple. ``trainer.predict(ds, ignore_keys=[])``
# still returns ``exit_layer`` and ``layers_run``.
_TRAINER_HIDDEN_KEYS = tuple(f for f in EarlyExitOutput.__dataclass_fields__ if f not in ("loss", "logits"))
_SAVED_TRAINER_KEYS = "_eek_saved_keys_to_ignore_at_inference"


def _hide_extras_from_trainer(config) -> None:
    if _SAVED_TRAINER_KEYS in vars(config):
        return
    own = vars(config).get("keys_to_ignore_at_inference")
    object.__setattr__(config, _SAVED_TRAINER_KEYS, own)
    before = list(getattr(config, "keys_to_ignore_at_inference", ["past_key_values"]))
    config.keys_to_ignore_at_inference = before + [k for k in _TRAINER_HIDDEN_KEYS if k not in before]


def _restore_trainer_keys(config) -> None:
    if _SAVED_TRAINER_KEYS not in vars(config):
        return
    own = vars(config).pop(_SAVED_TRAINER_KEYS)
    if own is None:
        vars(config).pop("keys_to_ignore_at_inference", None)
    else:
        config.keys_to_ignore_at_inference = own


def _check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [batch, seq_len, hidden], got shape {tuple(inputs_embeds.shape)}")
        shape = tuple(inputs_embeds.shape[:2])
    for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have the shape of input_ids {shape}, got {tuple(tensor.shape)}; "
                f"pad or truncate it to the same [batch, seq_len]"
            )
    if shape[0] and shape[1] == 0:
        raise ValueError("sequences must hold at least one token ([CLS]); got seq_len 0")
    return shape


def _read_input_summary(input_ids, attention_mask, batch: int, vocab_size: int):
    """The forward's one read-back before the layers: the ids' range (checked here, before the
    embedding, where an id out of range would fail deep in a GPU kernel) and the mask's longest
    extent and padded count, for the engine. Returns ``(mask_summary or None, read-backs)``."""
    values = []
    if input_ids is not None and input_ids.numel():
        values += [input_ids.min(), input_ids.max()]
    extents = None
    if attention_mask is not None and batch > 0:
        extents = mask_extents(attention_mask)
        values += [extents.max(), (attention_mask == 0).sum()]
    if not values:
        return None, 0
    read = torch.stack([v.to(values[0].device, torch.long) for v in values]).tolist()
    if input_ids is not None and input_ids.numel():
        check_id_range(read[0], read[1], vocab_size)
    summary = None if extents is None else (extents, int(read[-2]), int(read[-1]))
    return summary, 1


def _sequence_classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss Hugging Face's sequence classifiers compute, on the exit logits."""
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        return nn.functional.mse_loss(logits.float(), labels.float())  # one target per output, as HF
    if problem == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


def _patched_forward(
    self,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    return_all_exits: bool = False,
    return_dict: bool | None = None,
    **kwargs,
):
    """Early-exit forward of a patched model; see :class:`EarlyExitOutput`.

    In training mode every layer runs on every row (as with ``return_all_exits=True``)
    so that each head gets its gradient. Whenever grad is enabled and a parameter requires
    it, the forward takes the differentiable ``"torch"`` ops whatever the backend chosen
    (the same decisions; the fused ops have no backward).
    """
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, False):
            raise ValueError(f"{flag}=True is not available with early exit; call eek.unpatch(model) first")
    kwargs.pop("num_items_in_batch", None)  # transformers.Trainer's loss kwarg; the losses here are means
    if kwargs:
        raise TypeError(f"unexpected arguments for an early-exit forward: {', '.join(sorted(kwargs))}")
    state = read(self)
    adapter, policy = state.adapter, state.policy
    _check_config(self.config, type(adapter))
    if token_type_ids is not None and not adapter.uses_token_type_ids:
        raise TypeError(
            f"{type(self).__name__} takes no token_type_ids (as its own forward); leave them out "
            f"(tokenizer(..., return_token_type_ids=False))"
        )
    batch, _ = _check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
    if hasattr(policy, "check_batch"):
        policy.check_batch(batch)

    all_exits = return_all_exits or self.training
    device = next(self.parameters()).device
    # The fused ops (cpp, triton, cuda) have no autograd formula: whenever a gradient can flow,
    # the reference ops run instead, so the returned logits and loss are differentiable.
    differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
    backend = resolve_backend(
        "torch" if differentiable else state.backend,
        device,
        dtype=linear_compute_dtype(adapter.final_classifier),
        hidden_size=adapter.hidden_size,
        num_labels=adapter.num_labels,
    )
    train_gates = self.training and torch.is_grad_enabled() and isinstance(policy, SkipGates)
    # The graphed step is for inference: its buffers are written in place (no autograd).
    graphed = not all_exits and not differentiable and resolve_step(state.step, policy, device) == "graphed"
    if graphed:
        static_batches_of(state)

    runs = (adapter, self.early_exit_heads, policy, backend)  # what either step runs the layers with

    def graphed_step(hidden, mask, mask_summary, inputs_serial=None):
        return run_graphed(
            *runs, hidden, mask, batches=state.static_batches, mask_summary=mask_summary, inputs_serial=inputs_serial
        )

    if graphed and state.static_batches.prologue and eligible(input_ids, inputs_embeds):
        # The inputs' summary and the embeddings in one captured step, its one read-back after them;
        # the static batch's load then reads the prologue's buffers in a captured step too.
        with (
            on_device(device),
            state.static_batches.prologues.run(
                adapter, input_ids, attention_mask, token_type_ids, position_ids, capture=capture_by_default(device)
            ) as (hidden, mask, mask_summary, serial),
        ):
            result = graphed_step(hidden, mask, mask_summary, serial)
        return _finished(self, state, policy, result, labels, 1, return_dict)
    # After the host's work that needs no input values: the read-back waits for the GPU to finish
    # what is queued (an earlier forward's layers), and the GPU idles from then to the next launch.
    mask_summary, input_read_backs = _read_input_summary(input_ids, attention_mask, batch, adapter.vocab_size)
    if batch == 0:
        dtype = linear_compute_dtype(adapter.final_classifier)
        hidden = torch.zeros(0, 1, adapter.hidden_size, dtype=dtype, device=device)
        mask = None
    else:
        hidden = adapter.embed(input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask)
        mask = attention_mask
    result = None
    if graphed:
        result = graphed_step(hidden, mask, mask_summary)
    elif state.step == "auto" and not all_exits and not differentiable and device.type == "cpu" and batch:
        # static int8 layers on OpenVINO: the layers, heads and rule in one call (None: this loop's own way)
        result = run_exit_graph(self, adapter, self.early_exit_heads, policy, hidden, mask)
    if result is None:
        result = run_early_exit(
            *runs, hidden, mask, all_exits=all_exits, train_gates=train_gates, mask_summary=mask_summary
        )
    return _finished(self, state, policy, result, labels, input_read_backs, return_dict)


def _finished(model, state, policy, result, labels, read_backs: int, return_dict):
    """The forward's output from the engine's result: the loss (a training objective's, or the
    classification loss where labels are given) beside the exits, and the read-backs counted."""
    loss = None
    chosen = state.objective
    if model.training and chosen is not None and (labels is not None or not chosen[0].needs_labels):
        check_objective_policy(chosen[0], policy)
        loss = chosen[0](result, labels, **chosen[1])
    elif labels is not None:
        loss = _sequence_classification_loss(model.config, result.logits, labels)
    out = EarlyExitOutput(
        loss=loss,
        logits=result.logits,
        exit_layer=result.exit_layer,
        layers_run=result.layers_run,
        all_logits=result.all_logits,
        all_halting=result.all_halting,
        all_skipped=result.all_skipped,
        all_halting_logits=result.all_halting_logits,
        all_gates=result.all_gates,
    )
    out.host_syncs = result.host_syncs + read_backs
    return out if return_dict is not False else out.to_tuple()
