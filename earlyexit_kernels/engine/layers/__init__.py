"""One encoder layer as it runs: its precision and int8 class, ONNX Runtime's and OpenVINO's graphs of it,
their call shapes, the packed (op-by-op) layer, varlen attention and the weights a module holds.

The bottom wing of :mod:`earlyexit_kernels.engine`: it imports no other wing.
"""
