"""The baselines the early-exit engine is compared with, each its own loop over the HF layers.

Both reuse the patched model's adapter (:mod:`earlyexit_kernels.patching.patch`, one per
family: :mod:`earlyexit_kernels.models`) only to reach the model's own modules the way its
family's forward does (embeddings, the mask a layer takes, encoder layer ``i``, pooling,
classifiers and the per-layer heads ``eek.patch`` added), so they run the same weights, dtype
and attention implementation as the engine and the full model, on every supported family
(no BERT internals: no ``.bert.encoder.layer``, no pooler, no token types, no 4-D mask of their
own). Neither uses the engine.

``naive_batched``: what the batched ports of FastBERT/DeeBERT do. After each layer the
heads run as modules, the exit step is the eager PyTorch reference
(:func:`earlyexit_kernels.methods.exit_rules.exit_step`), the exiting rows are written back with
boolean indexing and the batch is compacted with ``h = h[keep]`` (hidden states, mask,
row map and policy state), every layer, with no padding trimming. Every boolean index
reads the number of selected rows back to the host: it is counted as one host sync, like
the engine's ``host_syncs``. An all-ones mask is dropped once at the start (one sync), as
Hugging Face does.

``batch_size_one``: the research implementations (PABEE, DeeBERT, PALBERT, ...): each
sequence alone, unpadded, ``if exits.item(): break`` after each layer (one sync per
layer run). Its throughput over the same set of sequences is what it is compared on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit_kernels.methods.exit_rules import exit_step, init_state
from earlyexit_kernels.methods.policies import ExitPolicy, Scheduled

__all__ = ["BaselineResult", "naive_batched", "batch_size_one", "single_sequence_inputs"]


@dataclass
class BaselineResult:
    logits: torch.Tensor  # [B, C]
    exit_layer: torch.Tensor  # [B]
    host_syncs: int


def _heads(adapter, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The exit head of ``layer`` on ``hidden`` [n, S, H]; ``mask`` [n, S] for a pooling that reads it."""
    if getattr(adapter, "heads_read_below", False):
        # the peers' loops are written for heads that read their own layer, as the papers' are
        raise ValueError(
            'the baselines run heads that read their own layer: patch with head="mlp" or "model", not "cascade"'
        )
    return adapter.classify(layer, adapter.exit_input(layer, hidden, mask))


def naive_batched(adapter, policy: ExitPolicy, input_ids: torch.Tensor, mask: torch.Tensor) -> BaselineResult:
    """Batched early exit with eager exit step and boolean-index compaction (see the module doc)."""
    num_layers, num_labels = adapter.num_layers, adapter.num_labels
    hidden = adapter.embed(input_ids, None, None, None, mask)  # DeBERTa's embeddings read the mask
    batch, _, hidden_size = hidden.shape
    device, dtype = hidden.device, hidden.dtype
    out_logits = torch.zeros(batch, num_labels, dtype=dtype, device=device)
    out_exit = torch.full((batch,), num_layers, dtype=torch.long, device=device)
    syncs = 1
    if bool((mask == 0).any()):
        layer_mask = adapter.layer_mask(mask, dtype)
    else:
        mask = layer_mask = None
    state = init_state(policy, batch, num_labels, hidden_size, num_layers, device, pooled_dtype=dtype)
    rows = torch.arange(batch, device=device)
    for layer in range(1, num_layers + 1):
        hidden = adapter.run_layer(layer - 1, hidden, layer_mask)
        logits = _heads(adapter, layer, hidden, mask)
        exits, returned, state = exit_step(policy, layer, num_layers, logits, None, state)
        leaving = rows[exits]
        out_logits[leaving] = returned[exits].to(dtype)
        out_exit[leaving] = layer
        syncs += 2
        if layer == num_layers:
            break
        keep = ~exits
        hidden, rows = hidden[keep], rows[keep]
        state = {k: v[keep] for k, v in state.items()}
        syncs += 2 + len(state)
        if mask is not None:
            mask = mask[keep]
            layer_mask = adapter.layer_mask(mask, dtype)
            syncs += 1
        if hidden.shape[0] == 0:
            break
    return BaselineResult(out_logits, out_exit, syncs)


def single_sequence_inputs(input_ids: torch.Tensor, mask: torch.Tensor, exit_layers: torch.Tensor):
    """Per sequence: its unpadded ids [1, len] and its one-row Scheduled policy (prepared untimed)."""
    lengths = mask.sum(dim=1).tolist()
    return [(input_ids[b : b + 1, : int(n)], Scheduled(exit_layers[b : b + 1])) for b, n in enumerate(lengths)]


def batch_size_one(adapter, sequences) -> BaselineResult:
    """Each sequence alone, leaving with a Python ``if`` (see the module doc)."""
    num_layers, num_labels = adapter.num_layers, adapter.num_labels
    logits_out, exits_out, syncs = [], [], 0
    for ids, policy in sequences:
        hidden = adapter.embed(ids, None, None, None)
        state = init_state(policy, 1, num_labels, hidden.shape[-1], num_layers, hidden.device, hidden.dtype)
        for layer in range(1, num_layers + 1):
            hidden = adapter.run_layer(layer - 1, hidden, None)
            logits = _heads(adapter, layer, hidden)
            exits, returned, state = exit_step(policy, layer, num_layers, logits, None, state)
            syncs += 1
            if exits.item():
                break
        logits_out.append(returned.to(hidden.dtype))
        exits_out.append(layer)
    return BaselineResult(torch.cat(logits_out), torch.tensor(exits_out), syncs)
