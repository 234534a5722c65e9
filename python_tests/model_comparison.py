"""What two model objects holding the same weights promise each other, on any CPU.

A saved and loaded, pickled, copied or cached model holds the weights of the original bit for
bit: that is what saving promises, and what these helpers check exactly. Their forwards compute
the same function but are not promised the same bits: the weights sit in other buffers (a
loaded file's tensors at other alignments, which MKL's GEMM may take another path for), a
default load may pick another attention implementation than the original, and the vectorized
kernels a CPU takes (AVX-512, AVX2, portable; Intel's or AMD's) split sums differently. An
AMD EPYC gave two such models' logits that printed alike and differed in their last bits.

Bit-for-bit comparisons stay where the package promises them: a patched model where nothing
exits against the same unpatched object, and a fast backend against its reference on the same
inputs. Those tests carry the ``exact`` marker and run again under every
``ATEN_CPU_CAPABILITY`` below this CPU's (``make test-cpu-kinds``).
"""

from __future__ import annotations

import torch

# Float32 rounding of a forward through a few layers of hidden 32 (eager against sdpa: 1.9e-9, as
# test_saving's commit d2d207b recorded); these bounds leave room for larger models and other
# CPUs while still failing on any wrong weight.
RTOL = 1e-5
ATOL = 1e-6


def assert_same_weights(model: torch.nn.Module, other: torch.nn.Module) -> None:
    """Every entry of the two state dicts, by name, bit for bit."""
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        assert torch.equal(theirs[name], value), name


def assert_same_function(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Outputs of two model objects with the same weights: equal to float rounding."""
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
