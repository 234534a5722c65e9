"""The int8 forms of each CPU class at full depth: agreement with the float32 model, PyTorch's and ONNX Runtime's layers.

Without VNNI, fbgemm's and ONNX Runtime's u8 x s8 GEMMs add each pair of products in a saturating
16-bit sum (:mod:`earlyexit_kernels.engine.layers.int8_isa`). The forms, each on every encoder Linear with one
activation scale per token and one weight scale per output channel:

- ``8w8a``: 8-bit weights and activations, the form of the ``vnni`` class (its sums are exact);
  run on fbgemm's AVX2 kernels, it saturates;
- ``8w7a``: 8-bit weights, 7-bit activations: PyTorch's ``per-token`` form without VNNI before issue 95;
- ``7w8a``: 7-bit weights, 8-bit activations: the form of every class without VNNI now, on both
  PyTorch's and ONNX Runtime's layers;
- ``package``: what ``int8_encoder`` runs here (the family's recipe, in this process's form).

Run it on the CPU's own kernels, then with fbgemm capped at AVX2 (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``),
which runs PyTorch's rows on the kernels of an AVX2-only CPU (ONNX Runtime's MLAS cannot be capped:
its rows keep this CPU's kernel, exact for every form):

    python benchmarks/micro/int8_forms.py .cache/demo/model --count 600
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/micro/int8_forms.py .cache/demo/model --count 600
    python benchmarks/micro/int8_forms.py --mpnet-head --count 600    # all-mpnet-base-v2, head on the frozen encoder

``--mpnet-head``: all-mpnet-base-v2 (:mod:`earlyexit_kernels.demo.mpnet_material`) as a sequence
classifier whose output layer is fitted (logistic regression) on the first 1,024 train texts over the
frozen encoder, as ``benchmarks/results/amd_epyc/int8_recipes_cpu.md`` measured MPNet-base.
"""

import argparse
import copy
import os
import sys
import warnings

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from int8_recipes import batches, encoder_linears, predictions, replace  # noqa: E402

from earlyexit_kernels.demo.real_task import load_rotten_tomatoes  # noqa: E402
from earlyexit_kernels.engine.layers.int8_isa import FBGEMM_CAP, int8_isa, int8_weight_bits  # noqa: E402
from earlyexit_kernels.engine.layers.int8_linear import PerTokenInt8Linear  # noqa: E402
from earlyexit_kernels.engine.layers.ort_layer import OrtLayer, encoder_layers, ort_available  # noqa: E402
from earlyexit_kernels.engine.layers.precision import int8_encoder  # noqa: E402

warnings.filterwarnings("ignore", message=r".*(quantize_per_tensor|torch\.ao\.quantization).*")


class FixedForm(PerTokenInt8Linear):
    """``PerTokenInt8Linear`` whose activations take the bits given, whatever the CPU (the forms compared)."""

    def __init__(self, *args, activation_bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation_bits = activation_bits

    def forward(self, x):
        magnitude = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).clamp_min_(1e-12)
        out = torch.ops.quantized.linear_dynamic(
            x / magnitude, self._packed_params._packed_params, self.activation_bits == 7
        )
        return out.mul_(magnitude).add_(self.bias)


def torch_form(model, weight_bits: int, activation_bits: int):
    for name, module in encoder_linears(model):
        layer = FixedForm.from_float(module, reduce_range=weight_bits == 7)
        layer.activation_bits = activation_bits
        replace(model, name, layer)
    return model


def ort_form(model, weight_bits: int):
    layers = encoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = OrtLayer.from_layer(layer, model.config, reduce_range=weight_bits == 7)
    return model


def mpnet_head_model(count: int = 1024):
    """all-mpnet-base-v2 as a classifier: the head's dense layer the identity, its output layer fitted on the
    frozen encoder's tanh(first token) over the first ``count`` train texts (logistic regression, L2)."""
    from earlyexit_kernels.demo.mpnet_material import mpnet_path

    folder = str(mpnet_path())
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    head = model.classifier
    with torch.no_grad():
        head.dense.weight.copy_(torch.eye(head.dense.weight.shape[0]))
        head.dense.bias.zero_()
    data = batches(tokenizer, load_rotten_tomatoes(0)["train"], count)
    with torch.no_grad():  # the features then train the output layer, which inference tensors cannot
        features = torch.cat([torch.tanh(model.mpnet(**b).last_hidden_state[:, 0]) for b, _ in data])
    labels = torch.cat([y for _, y in data])
    out = nn.Linear(features.shape[1], 2)
    optimizer = torch.optim.LBFGS(out.parameters(), max_iter=200)

    def loss():
        optimizer.zero_grad()
        value = nn.functional.cross_entropy(out(features), labels) + 1e-3 * out.weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        head.out_proj.weight.copy_(out.weight)
        head.out_proj.bias.copy_(out.bias)
        train_accuracy = float((out(features).argmax(-1) == labels).float().mean())
    print(f"all-mpnet-base-v2, output layer fitted on {count} train texts: train accuracy {100 * train_accuracy:.1f}%")
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a fine-tuned sequence classifier folder")
    parser.add_argument("--mpnet-head", action="store_true", help="all-mpnet-base-v2 with a fitted output layer")
    parser.add_argument("--count", type=int, default=600, help="the first N Rotten Tomatoes test texts")
    args = parser.parse_args()
    if bool(args.folder) == args.mpnet_head:
        parser.error("give a FOLDER or --mpnet-head")
    torch.set_num_threads(2)
    if args.mpnet_head:
        model, tokenizer = mpnet_head_model()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.folder)
    data = batches(tokenizer, load_rotten_tomatoes(0)["test"], args.count)
    labels = torch.cat([y for _, y in data])
    reference = predictions(model, data)
    cap = os.environ.get(FBGEMM_CAP)
    print(
        f"{args.folder or 'all-mpnet-base-v2 (head fitted)'}: the first {args.count} test texts at full depth; "
        f"int8 class {int8_isa()} ({int8_weight_bits()}-bit weights), {FBGEMM_CAP}={cap or '(not set)'}"
    )
    forms = {
        "PyTorch 8w8a (the vnni form)": lambda m: torch_form(m, 8, 8),
        "PyTorch 8w7a (without VNNI, before)": lambda m: torch_form(m, 8, 7),
        "PyTorch 7w8a (without VNNI, now)": lambda m: torch_form(m, 7, 8),
    }
    if ort_available():
        forms["ONNX Runtime 8w8a (the vnni form)"] = lambda m: ort_form(m, 8)
        forms["ONNX Runtime 7w8a (without VNNI)"] = lambda m: ort_form(m, 7)
    forms["package (int8_encoder, this class's form)"] = lambda m: int8_encoder(m, inplace=True)
    print(f"{'float32':<44} agreement 100.00%  accuracy {100 * float((reference == labels).float().mean()):6.2f}%")
    for name, make in forms.items():
        got = predictions(make(copy.deepcopy(model)), data)
        agree, right = (100 * float((got == target).float().mean()) for target in (reference, labels))
        print(f"{name:<44} agreement {agree:6.2f}%  accuracy {right:6.2f}%", flush=True)


if __name__ == "__main__":
    main()
