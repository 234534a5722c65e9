"""A Linear layer in int8 with one activation scale per token and one weight scale per output channel.

    layer = PerTokenInt8Linear.from_float(linear)   # then layer(x) ~ linear(x), x float32 [..., in]

``torch.ao.quantization.quantize_dynamic`` scales an activation tensor as a whole: one outlier
anywhere in the call sets the step for every token, and the feed-forward output projection of
MPNet reads the GELU's output, whose few large values then leave most tokens a handful of
levels (14 points of Rotten Tomatoes accuracy lost, ``benchmarks/int8_linear_sensitivity.py``).
Here each token (row) gets its own scale and each output channel of the weight its own
(symmetric, ``max |w_row| / 127``).

How, on PyTorch's own int8 kernels: each row is divided by its largest magnitude, so that every
row spans [-1, 1]; the rows then go through fbgemm's dynamic int8 Linear
(``torch.ops.quantized.linear_dynamic``, the kernel ``quantize_dynamic`` calls, with per-channel
weights), whose one scale for the call is then the same step for every row; the output is
multiplied back by each row's magnitude and the bias added. This is the scheme of torchao's
``Int8DynamicActivationInt8WeightConfig``, which on this project's CPU (torch 2.13, torchao
0.18, eager) ran about 3x slower than ``quantize_dynamic`` on a 768 -> 3072 projection, and
of ``torch._int_mm`` with the scales applied around it, which ran 1.0-2x slower than this
(``benchmarks/micro/int8_recipes.py`` measures the whole models). The weights take 8 bits where
fbgemm's int8 dot product accumulates in 32 bits (AVX-512 VNNI), 7 elsewhere (``reduce_range``), so
that AVX2's 16-bit pair sums cannot saturate; the activations always take 8: the form the ONNX
Runtime layers take on the same CPU (:mod:`earlyexit_kernels.engine.layers.int8_isa`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized.modules.linear import LinearPackedParams

from earlyexit_kernels.engine.layers.int8_isa import int8_weight_bits

__all__ = ["PerTokenInt8Linear"]


class PerTokenInt8Linear(nn.Module):
    """``y = x W^T + b`` with ``x`` quantized per token and ``W`` per output channel, int8."""

    def __init__(self, in_features: int, out_features: int, *, reduce_range: bool | None = None):
        """``reduce_range``: 7-bit weights (None: where this CPU's int8 form has them, :func:`int8_weight_bits`)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.reduce_range = int8_weight_bits() == 7 if reduce_range is None else reduce_range
        self._packed_params = LinearPackedParams(dtype=torch.qint8)  # torch.ao's: copies, saves and loads
        self.register_buffer("bias", None)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, reduce_range: bool | None = None) -> PerTokenInt8Linear:
        """The int8 copy of a float ``nn.Linear``."""
        layer = cls(linear.in_features, linear.out_features, reduce_range=reduce_range)
        weight = linear.weight.detach().float()
        levels = 63.0 if layer.reduce_range else 127.0
        scale = (weight.abs().amax(dim=1).clamp_min(1e-12) / levels).double()
        quantized = torch.quantize_per_channel(
            weight, scale, torch.zeros(weight.shape[0], dtype=torch.long), 0, torch.qint8
        )
        layer._packed_params.set_weight_bias(quantized, None)  # the bias is added after the row scales
        layer.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        # each row's largest magnitude, reduced without an |x| copy of the activations (the same values)
        magnitude = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).clamp_min_(1e-12)
        # 8-bit activations, but for 8-bit weights on a CPU without VNNI (a layer made on another, then loaded
        # here), where fbgemm's 16-bit pair sums would saturate: 7-bit activations, fbgemm's own way round
        reduce_activations = not self.reduce_range and int8_weight_bits() == 7
        out = torch.ops.quantized.linear_dynamic(x / magnitude, self._packed_params._packed_params, reduce_activations)
        out.mul_(magnitude)
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per token x per channel"
