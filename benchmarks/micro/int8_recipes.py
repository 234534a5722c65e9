"""The int8 recipes a family's base can take, measured: agreement with its float32 model and speed at full depth.

A fine-tuned classifier folder (the whole model, no early exit) on the first N Rotten Tomatoes
test texts, in the length-sorted batches of 32 the stack benchmarks use (128 tokens at most):

- ``float32``: the reference every agreement is counted against;
- ``dynamic``: ``quantize_dynamic`` of every encoder Linear (one scale per activation tensor);
- ``dynamic, FFN output float``: the same but the feed-forward output projections kept float32;
- ``dynamic, FFN output per-token``: the same but those projections int8 with one activation
  scale per token and one weight scale per output channel
  (:class:`earlyexit_kernels.engine.layers.int8_linear.PerTokenInt8Linear`);
- ``per-token``: every encoder Linear so;
- ``per-token, ONNX Runtime layers``: the same quantization, each encoder layer one ONNX Runtime graph
  (:class:`earlyexit_kernels.engine.layers.ort_layer.OrtLayer`, recipe ``per-token-ort``), where onnxruntime is installed;
- ``dynamic, FFN output smoothed``: SmoothQuant's migration (alpha 0.5) on the feed-forward output
  projections, calibrated on the largest input of each channel over 256 train texts, then dynamic;
- ``torchao``: torchao's ``Int8DynamicActivationInt8WeightConfig`` on every encoder Linear
  (per-token activations, per-channel weights; eager), where torchao is importable.

``--part agreement`` prints agreement with float32 and accuracy on ``--count`` texts (2 threads,
no timing); ``--part speed`` prints seconds over the first ``--speed-count`` texts at one thread
(one warm-up batch first) and the speed-up over float32, to be run alone:

    python benchmarks/micro/int8_recipes.py FOLDER --part agreement --count 1000
    flock -x /tmp/eek-cpu.lock python benchmarks/micro/int8_recipes.py FOLDER --part speed --speed-count 160
"""

import argparse
import copy
import time
import warnings

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from earlyexit_kernels.demo.real_task import load_rotten_tomatoes, tokenize
from earlyexit_kernels.engine.layers.int8_linear import PerTokenInt8Linear
from earlyexit_kernels.engine.layers.precision import int8_encoder

warnings.filterwarnings("ignore", message=r".*(quantize_per_tensor|torch\.ao\.quantization).*")


def ffn_output(module: nn.Linear, config) -> bool:
    return (module.in_features, module.out_features) == (config.intermediate_size, config.hidden_size)


def encoder_linears(model):
    return [
        (name, module)
        for name, module in model.base_model.named_modules()
        if isinstance(module, nn.Linear) and not name.startswith("pooler")
    ]


def replace(model, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.base_model.get_submodule(parent) if parent else model.base_model, leaf, new)


def dynamic(model, keep=lambda module: False):
    spec = {n: torch.ao.quantization.default_dynamic_qconfig for n, m in encoder_linears(model) if not keep(m)}
    torch.ao.quantization.quantize_dynamic(model.base_model, spec, dtype=torch.qint8, inplace=True)
    return model


def per_token(model, which=lambda module: True):
    for name, module in encoder_linears(model):
        if which(module):
            replace(model, name, PerTokenInt8Linear.from_float(module))
    return model


class Smoothed(nn.Module):
    """``linear(x / s)`` with ``linear``'s weight columns multiplied by ``s`` (SmoothQuant's migration)."""

    def __init__(self, linear: nn.Linear, act_max: torch.Tensor, alpha: float = 0.5):
        super().__init__()
        w_max = linear.weight.detach().abs().amax(dim=0).clamp_min(1e-5)
        s = (act_max.clamp_min(1e-5) ** alpha / w_max ** (1 - alpha)).clamp_min(1e-5)
        self.register_buffer("inverse", 1.0 / s)
        linear.weight.data.mul_(s)
        self.linear = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]

    def forward(self, x):
        return self.linear(x * self.inverse)


def smoothed(model, calibration):
    targets = [(n, m) for n, m in encoder_linears(model) if ffn_output(m, model.config)]
    maxima, hooks = {}, []
    for name, module in targets:

        def hook(module, args, name=name):
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for batch, _ in calibration:
            model(**batch)
    for h in hooks:
        h.remove()
    dynamic(model, keep=lambda m: ffn_output(m, model.config))
    for name, module in targets:
        replace(model, name, Smoothed(module, maxima[name]))
    return model


def torchao(model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(
        model.base_model,
        Int8DynamicActivationInt8WeightConfig(),
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not fqn.startswith("pooler"),
    )
    return model


def batches(tokenizer, split, count: int, start: int = 0):
    order = sorted(range(start, start + count), key=lambda i: len(split.texts[i]))
    return [
        (
            tokenize(tokenizer, [split.texts[i] for i in order[s : s + 32]], 128),
            torch.tensor([split.labels[i] for i in order[s : s + 32]]),
        )
        for s in range(0, count, 32)
    ]


def predictions(model, data) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(**batch).logits.argmax(-1) for batch, _ in data])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--part", choices=("agreement", "speed"), required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--speed-count", type=int, default=160)
    parser.add_argument("--only", nargs="*", help="candidates to run (default: all)")
    args = parser.parse_args()
    model = AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    splits = load_rotten_tomatoes(0)
    calibration = batches(tokenizer, splits["train"], 256)
    is_out = lambda m: ffn_output(m, model.config)  # noqa: E731
    candidates = {
        "float32": lambda m: m,
        "dynamic": lambda m: dynamic(m),
        "dynamic, FFN output float": lambda m: dynamic(m, keep=is_out),
        "dynamic, FFN output per-token": lambda m: per_token(dynamic(m, keep=is_out), which=is_out),
        "per-token": lambda m: per_token(m),
        "per-token, ONNX Runtime layers": lambda m: int8_encoder(m, "per-token-ort", inplace=True),
        "dynamic, FFN output smoothed": lambda m: smoothed(m, calibration),
        "torchao": torchao,
        "package recipe (int8_encoder auto)": lambda m: int8_encoder(m, inplace=True),
    }
    chosen = [c for c in candidates if not args.only or c in args.only or c == "float32"]
    if args.part == "agreement":
        torch.set_num_threads(2)
        data = batches(tokenizer, splits["test"], args.count)
        labels = torch.cat([y for _, y in data])
        reference = predictions(model, data)
        print(f"{args.folder}: the first {args.count} test texts, agreement with float32 and accuracy")
        for name in chosen:
            try:
                got = predictions(candidates[name](copy.deepcopy(model)), data)
            except Exception as error:  # noqa: BLE001 -- a candidate that cannot run says why
                print(f"{name:<38} failed: {type(error).__name__}: {str(error)[:120]}", flush=True)
                continue
            agree = 100 * float((got == reference).float().mean())
            right = 100 * float((got == labels).float().mean())
            print(f"{name:<38} agreement {agree:6.2f}%  accuracy {right:6.2f}%", flush=True)
    else:
        torch.set_num_threads(1)
        data = batches(tokenizer, splits["test"], args.speed_count)
        print(f"{args.folder}: the first {args.speed_count} test texts, batches of 32, 1 thread, full depth")
        base = None
        for name in chosen:
            try:
                candidate = candidates[name](copy.deepcopy(model))
            except Exception as error:  # noqa: BLE001
                print(f"{name:<38} failed: {type(error).__name__}: {str(error)[:120]}", flush=True)
                continue
            with torch.inference_mode():
                candidate(**data[-1][0])
                start = time.perf_counter()
                for batch, _ in data:
                    candidate(**batch)
                seconds = time.perf_counter() - start
            base = seconds if name == "float32" else base
            print(f"{name:<38} {seconds:7.2f} s  {base / seconds:5.2f}x float32", flush=True)


if __name__ == "__main__":
    main()
