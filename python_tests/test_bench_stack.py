"""The stack benchmark's bookkeeping (bench/stack.py, bench/stack_report.py) on a tiny model: what each
configuration runs, paired ratios, the targets table; the ONNX Runtime / OpenVINO peers where installed."""

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from benchmarks.suite import stack, stack_peers, stack_report

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def batches_and_labels():
    batches = []
    for seed, (rows, length) in enumerate([(5, 10), (4, 7)]):  # the peers run shapes other than the export's
        ids, mask, types = tiny_batch(rows, length, seed=seed)
        batches.append(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": torch.arange(rows) % 3}
        )
    return batches, torch.cat([b["labels"] for b in batches])


def test_each_torch_configuration_classifies_and_counts_the_layers_its_rows_ran():
    full = tiny_model("bert")
    patched = eek.patch(tiny_model("bert"), eek.Entropy(0.0), backend="torch")
    configs = stack.torch_configs(patched, full, compile_models=False)
    assert [c.name for c in configs] == [
        "fp32",
        "fp32 + early exit",
        "int8",
        "int8 + early exit",
        "bf16",
        "bf16 + early exit",
    ]
    assert [c.base for c in configs] == ["fp32", "fp32", "int8", "int8", "bf16", "bf16"]
    batches, labels = batches_and_labels()
    results = stack.measure(configs, batches, labels, repeats=2, num_layers=4)
    with torch.no_grad():
        expected = sum(
            int((full(**{k: b[k] for k in stack_peers.INPUTS}).logits.argmax(-1) == b["labels"]).sum()) for b in batches
        )
    assert results["fp32"]["accuracy"] == results["fp32 + early exit"]["accuracy"] == expected / len(labels)
    assert results["fp32 + early exit"]["mean_layers"] == 4.0  # Entropy(0) never exits
    assert all(len(r["seconds"]) == 2 for r in results.values())


@pytest.mark.parametrize("arch", ["bert", "albert", "roberta"])
def test_int8_keeps_the_feed_forward_output_projections_float_when_asked(arch):
    from torch import nn

    model = tiny_model(arch)

    def float_linears(quantized):
        return sorted(n for n, m in quantized.base_model.encoder.named_modules() if type(m) is nn.Linear)

    assert float_linears(stack.int8_encoder(model)) == []
    kept = float_linears(stack.int8_encoder(model, "ffn-out-float"))
    ffn_out = {"bert": "output.dense", "roberta": "output.dense", "albert": "ffn_output"}[arch]
    layers = model.config.num_hidden_groups if arch == "albert" else model.config.num_hidden_layers  # shared
    assert len(kept) == layers and all(n.endswith(ffn_out) and "attention" not in n for n in kept), kept
    ids, mask, types = tiny_batch(3, 9)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        int8 = stack.int8_encoder(model, "ffn-out-float")(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(int8.logits, full, rtol=0.1, atol=0.05)
    with pytest.raises(
        ValueError,
        match="int8 recipe must be auto or one of all, ffn-out-float, per-token, ffn-out-per-token, per-token-ort, per-token-ov, "
        "static-ov; "
        "got 'half'",
    ):
        stack.int8_encoder(model, "half")


def test_ratios_are_paired_within_a_repetition_and_the_report_states_the_targets(tmp_path):
    configs = [
        stack_peers.Config("fp32", "fp32", False, None),
        stack_peers.Config("int8", "int8", False, None),
        stack_peers.Config("int8 + early exit", "int8", True, None),
        stack_peers.Config("ONNX Runtime int8", "ONNX Runtime int8", False, None),
    ]
    # repetition 2 ran everything twice as slow: paired ratios do not move
    seconds = {"fp32": [4.0, 8.0], "int8": [2.0, 4.0], "int8 + early exit": [1.0, 2.0], "ONNX Runtime int8": [1.5, 3.0]}
    # 100 valid tokens; the early exit ran them through 2.5 layers on average (its longer rows ran deeper)
    results = {
        name: {"accuracy": 0.5, "mean_layers": 2.0, "tokens": 100.0, "token_layers": 250.0, "layer_calls": 8.0}
        | {"seconds": s}
        for name, s in seconds.items()
    }
    rows = stack.rows_of(configs, results, num_layers=6, texts=10)
    early = rows[2]
    assert early["vs_base_p20"] == early["vs_base_p50"] == early["vs_base_p80"] == 2.0
    assert early["vs_fp32_p50"] == 4.0 and early["vs_ort_int8_p50"] == 1.5 and early["layer_ideal"] == 3.0
    assert early["token_layer_ideal"] == 2.4 and early["layer_calls"] == 8
    assert rows[1]["vs_base_p50"] == "" and rows[0]["vs_fp32_p50"] == ""

    folder = tmp_path / "stack_cpu"
    folder.mkdir()
    with open(folder / "stack.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, stack.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "stack_meta.json").write_text(json.dumps({"cpu_flags": {"amx_bf16": True}, "command": "cmd"}))
    section = stack_report.render(folder / "stack.csv")
    assert "| early exit + int8 vs int8 alone ≥ 1.8x | 2.00 x | met |" in section
    assert "| early exit + int8 vs ONNX Runtime int8 ≥ 1.5x | 1.50 x | met |" in section
    assert "| early exit + int8: speed-up / layer ideal ≥ 0.9 | 0.67  | missed |" in section
    assert "| int8 + early exit: speed-up / token-layer ideal ≥ 0.9 | 0.83  | missed |" in section
    # time beyond the token-layer share, p50: 1.5 - 3.0 / 2.4 = 0.25 s over 8 layer calls
    assert "int8 0.250 s of 1.50 s (31.25 ms per layer call of a batch, 8 calls)" in section
    assert "bf16 instructions: yes" in section
    assert "Where that time goes" not in section
    assert "timed on this CPU" not in section  # a run without the static layers' choice says nothing of it
    meta = {"cpu_flags": {}, "command": "cmd", "int8_exit_graph": "no exit graph: the layer loop, faster in 10 of 11"}
    (folder / "stack_meta.json").write_text(json.dumps(meta))
    assert "\nint8 + early exit, timed on this CPU: no exit graph: the layer loop, faster in 10 of 11.\n" in (
        stack_report.render(folder / "stack.csv")
    )
    (folder / "stack_meta.json").write_text(json.dumps({"cpu_flags": {"amx_bf16": True}, "command": "cmd"}))
    (folder / stack_report.PROFILE_NAME).write_text(
        "# python benchmarks/profiles/early_exit_profile.py\nlayers 0.8 s\n"
    )
    section = stack_report.render(folder / "stack.csv")
    assert "(`python benchmarks/profiles/early_exit_profile.py`: encoder layers" in section
    assert "\n    layers 0.8 s\n" in section
    readme = tmp_path / "benchmarks.md"
    readme.write_text("# Benchmarks\n")
    stack_report.update_readme(readme, folder / "stack.csv")
    stack_report.update_readme(readme, folder / "stack.csv")
    assert readme.read_text().count(stack_report.START) == 1
    stack_report.update_readme(readme, folder / "stack.csv", "mpnet")  # another model's section beside it
    stack_report.update_readme(readme, folder / "stack.csv", "mpnet")
    text = readme.read_text()
    assert text.count(stack_report.START) == 1 and text.count("<!-- stack-mpnet:start -->") == 1
    assert text.index(stack_report.END) < text.index("## Early exit with int8, bf16 and torch.compile: mpnet")


def test_peers_give_the_model_logits(tmp_path):
    for package in ("onnx", "onnxruntime", "openvino"):
        pytest.importorskip(package, reason=f"{package} is not installed (bench-only, optional)")
    full = tiny_model("bert", num_labels=2)
    batches, _ = batches_and_labels()
    configs, notes = stack_peers.peer_configs(full, batches[0], tmp_path, threads=1)
    assert [c.name for c in configs] == ["ONNX Runtime fp32", "ONNX Runtime int8", "OpenVINO fp32"]
    assert "Attention" in notes["onnxruntime"]  # the optimizer fused the attention
    with torch.no_grad():
        expected = full(**{k: batches[1][k] for k in stack_peers.INPUTS}).logits
    for config, atol in zip(configs, (1e-5, 2e-2, 1e-5)):
        torch.testing.assert_close(config.run(batches[1])[0], expected, rtol=0, atol=atol)


def test_openvino_static_int8_is_calibrated_on_other_texts_and_gives_the_model_logits_within_int8(tmp_path):
    """OpenVINO static int8 (NNCF, the transformer preset) calibrated on batches that are not the ones
    scored: its logits within what int8 moves a tiny model's, its rows named, the calibration said."""
    for package in ("onnx", "openvino", "nncf"):
        pytest.importorskip(package, reason=f"{package} is not installed (bench-only, optional)")
    full = tiny_model("bert", num_labels=2)
    batches, _ = batches_and_labels()
    calibration = []
    for seed in (7, 8, 9):  # other texts than the ones scored
        ids, mask, types = tiny_batch(6, 9, seed=seed)
        calibration.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    configs, notes = stack_peers.peer_configs(full, batches[0], tmp_path, threads=1, calibration=calibration)
    assert [c.name for c in configs][-2:] == ["OpenVINO fp32", "OpenVINO int8"]
    assert "static int8" in notes["openvino int8"] and "validation texts" in notes["openvino int8"]
    assert "setting kept" in notes["openvino int8"] and "setting kept" in notes["openvino"]
    with torch.no_grad():
        expected = full(**{k: batches[1][k] for k in stack_peers.INPUTS}).logits
    got = configs[-1].run(batches[1])[0]
    # measured here: static int8 moved this tiny model's logits by 0.0029 where they reach 0.0198 (dynamic int8
    # of ONNX Runtime: 0.0003); a broken quantization moves them by their own size: the bound sits between
    assert float((got - expected).abs().max()) < 0.5 * float(expected.abs().max())
    assert not torch.equal(got, configs[-2].run(batches[1])[0])  # quantized: not the fp32 graph's bits
    _, without = stack_peers.peer_configs(full, batches[0], tmp_path, threads=1)
    assert without["openvino int8"] == "no calibration texts given"


def test_an_openvino_peer_is_compiled_at_the_faster_of_its_fused_subgraph_settings(tmp_path):
    """The OpenVINO peers run at their best setting on this CPU: compiled with the plugin's fused-subgraph code
    generation on and off, both timed on the texts given, the faster kept and said; either computes the model."""
    for package in ("onnx", "openvino"):
        pytest.importorskip(package, reason=f"{package} is not installed (bench-only, optional)")
    import openvino

    full = tiny_model("bert", num_labels=2)
    batches, _ = batches_and_labels()
    exported = stack_peers.export_onnx(full, batches[0], tmp_path)
    core = openvino.Core()
    compiled, setting = stack_peers.openvino_compiled(core, core.read_model(str(exported)), 1, batches[:2])
    kept = setting.split("setting kept: ")[1].split(" (")[0]
    assert kept in ("default", "fused-subgraph code generation off")
    assert "default" in setting.split("(")[1] and "code generation off" in setting.split("(")[1]  # both timings
    with torch.no_grad():
        expected = full(**{k: batches[1][k] for k in stack_peers.INPUTS}).logits
    got = torch.from_numpy(compiled(stack_peers.numpy_inputs(batches[1]))[compiled.output(0)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # float32 either way: the model's logits


def test_the_static_layers_exit_graph_choice_goes_into_the_run_s_record(monkeypatch):
    """On the static int8 layers the stack compiles the early-exit model's exit graph as eek fit does (graph or layer
    loop, timed on this CPU: test_ov_exit_graph times that choice); what was chosen, and why, is handed to the run's
    meta, not only printed. The bookkeeping alone here: the layers and the choice stand in."""
    chosen = []

    def choice(model, calibration):
        chosen.append(model)
        return SimpleNamespace(reason="no exit graph: the layer loop, faster than the graph in 10 of 10 rounds")

    monkeypatch.setattr(stack, "int8_encoder", lambda model, recipe, calibration=None: model)
    monkeypatch.setattr(stack, "exit_graph_choice", choice)
    full = tiny_model("bert", num_layers=2)
    patched = eek.patch(tiny_model("bert", num_layers=2), eek.Entropy(0.3), backend="torch")
    calibration = batches_and_labels()[0]
    choices: dict = {}
    configs = stack.torch_configs(
        patched,
        full,
        compile_models=False,
        bf16=False,
        int8_recipe="static-ov",
        calibration=calibration,
        choices=choices,
    )
    assert [c.name for c in configs] == ["fp32", "fp32 + early exit", "int8", "int8 + early exit"]
    assert chosen == [patched]  # the early-exit model's choice, once
    assert choices == {"exit_graph": "no exit graph: the layer loop, faster than the graph in 10 of 10 rounds"}
    other: dict = {}
    stack.torch_configs(patched, full, compile_models=False, bf16=False, int8_recipe="all", choices=other)
    assert other == {} and len(chosen) == 1  # no static layers: nothing chosen
