"""The stream benchmark (earlyexit_kernels/bench/stream.py) end to end at a tiny size.

(e), compile=True, is left out here (its first compile alone takes ~20 s on 2 cores); that a
compiled stream compiles nothing after its warm-up is python_tests/test_classify.py's.
The CUDA path (``--device cuda``) runs in scripts/gpu_session.sh's ``stream_bf16`` step; here,
its refusal without CUDA, bf16 on the CPU and the report a GPU's rows give.
"""

import csv
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks.suite.stream_grid import issue_targets
from earlyexit_kernels.bench import stream
from earlyexit_kernels.bench.stream import COLUMNS, StreamConfig, run, stream_lengths
from earlyexit_kernels.bench.stream_device import default_name


def test_the_stream_benchmark_writes_its_csv_table_and_plot(tmp_path):
    config = StreamConfig(
        sequences=160,
        hidden=32,
        layers=4,
        heads=2,
        max_batch_size=16,
        repeats=1,
        saved=(0.5, 0.0),
        compile=False,
        threads=1,
        cohort_tokens=256,
        segments=True,
        varlen=True,
    )
    rows = run(config, tmp_path, name="stream_test", progress=lambda message: None)
    with open(tmp_path / "stream_test.csv") as file:
        written = list(csv.DictReader(file))
    assert list(written[0]) == COLUMNS
    assert (
        len(written) == len(rows) == 7 + 6
    )  # (a)-(d), (f), (h), (i) on the main policy, (b)-(d), (f)-(i) on the other
    main = {r["method"][:3]: r for r in written if r["target_saved"] == "0.5"}
    assert set(main) == {"(a)", "(b)", "(c)", "(d)", "(f)", "(h)", "(i)"}
    d, c, f, h, i = main["(d)"], main["(c)"], main["(f)"], main["(h)"], main["(i)"]
    # (d)'s and (f)'s predictions equal (c)'s: the same exit layers, logits within rounding.
    assert int(d["exit_mismatches_vs_c"]) == 0 and float(d["max_logit_diff_vs_c"]) < 1e-4
    assert int(f["exit_mismatches_vs_c"]) == 0 and float(f["max_logit_diff_vs_c"]) < 1e-4
    # (f): cohorts sized by tokens, no row fill (not sized by max_batch_size); on the CPU the model runs
    # the exact step, which reads survivors back (none on the graphed step: test_cohort_engine.py)
    assert float(f["host_syncs_per_call"]) <= 1.0 and f["fill"] == "" and 0.0 < float(f["token_fill"]) <= 1.0
    # (h): the segment engine on the same budget, the same exits; its layers run the graphed step's, no read-back
    assert int(h["exit_mismatches_vs_c"]) == 0 and float(h["max_logit_diff_vs_c"]) < 1e-4
    assert float(h["host_syncs_per_call"]) == 0.0 and h["fill"] == "" and 0.0 < float(h["token_fill"]) <= 1.0
    # (i): the packed-token cohorts, the same exits; every position a real token (the CPU's plan: exact counts)
    assert int(i["exit_mismatches_vs_c"]) == 0 and float(i["max_logit_diff_vs_c"]) < 1e-4
    assert float(i["host_syncs_per_call"]) == 0.0 and i["fill"] == "" and float(i["token_fill"]) == 1.0
    assert 0.0 < float(d["fill"]) <= 1.0 and 0.0 < float(c["fill"]) <= 1.0
    assert float(d["host_syncs_per_call"]) <= 1.0
    assert float(d["seq_per_s"]) > 0 and float(d["ideal_seq_per_s"]) > 0
    assert 0.2 < float(d["saved_layer_share"]) < 0.8  # the calibration aims at 0.5
    assert len([n for n in d["exit_histogram"].split("/") if int(n) > 0]) >= 3  # exits spread over the layers
    table = (tmp_path / "stream_test.md").read_text()
    assert "| (d) eek.classify |" in table and "Targets" not in table  # the repository's checks, not the user's
    assert stream.markdown(tmp_path / "stream_test.csv") in table + "\n" or table.startswith(
        stream.markdown(tmp_path / "stream_test.csv").split("\nCommand")[0]
    )
    assert (tmp_path / "stream_test.png").stat().st_size > 0


def test_the_lengths_look_like_sentence_classification_data():
    lengths = stream_lengths(20000, seed=0)
    share = sum(10 <= n <= 60 for n in lengths) / len(lengths)
    assert 0.85 < share < 0.93  # the docstring says about 89%
    assert max(lengths) <= 256 and min(lengths) >= 4
    assert sum(n > 128 for n in lengths) > 0  # a tail


def test_the_calibration_hits_its_target_share():
    entropies = torch.rand(500, 5)
    for saved in (0.25, 0.5):
        threshold = stream.calibrate(entropies, saved)
        layers = stream.exit_layers_at(entropies, threshold)
        assert abs((1 - layers.float().mean().item() / 6) - saved) < 0.02
    assert stream.calibrate(entropies, 0.0) == 0.0


def test_the_default_cpu_run_keeps_the_committed_columns_and_name():
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "unknown_cpu" / "stream_cpu.csv"
    with open(committed) as file:
        assert next(csv.reader(file)) == COLUMNS
    assert default_name("cpu", "fp32") == "stream_cpu" and default_name("cuda", "bf16") == "stream_cuda_bf16"
    assert StreamConfig().device == "cpu" and StreamConfig().dtype == "fp32"


def test_the_cli_refuses_cuda_without_it_and_an_unknown_dtype(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        stream.main(["--device", "cuda", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stream.main(["--dtype", "int8", "--output-dir", str(tmp_path)])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        run(StreamConfig(dtype="int8"), tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available"):
        run(StreamConfig(device="cuda"), tmp_path)
    assert not list(tmp_path.iterdir())  # refused before any work


def test_bf16_runs_end_to_end_on_the_cpu_and_the_report_names_the_dtype(tmp_path, capsys):
    argv = (
        "--dtype bf16 --sequences 64 --hidden 32 --layers 4 --repeats 1 --saved 0.5 --no-compile --no-memory --segments "
        "--varlen"
    )
    assert stream.main([*argv.split(), "--output-dir", str(tmp_path), "--threads", "1"]) == 0
    with open(tmp_path / "stream_cpu_bf16.csv") as file:
        written = list(csv.DictReader(file))
    assert list(written[0]) == COLUMNS
    assert {r["method"][:3] for r in written} == {"(a)", "(b)", "(c)", "(d)", "(f)", "(h)", "(i)"}
    assert all(r["device"] == "cpu" and r["model"].endswith(" in bf16") for r in written)
    table = (tmp_path / "stream_cpu_bf16.md").read_text()
    assert "random BERT H32 L4 heads 1 in bf16" in table and "--dtype bf16" in table and "--segments" in table
    assert "issue 60" not in table  # the GPU's target only on the GPU
    assert "\nStream of 64 sequences" in capsys.readouterr().out  # the table, printed after the progress

    # The same rows as a GPU would write them: the GPU named, no peak memory, issue 60's target checked.
    for row in written:
        row["device"] = "cuda (NVIDIA H200)"
    gpu_csv = tmp_path / "gpu.csv"
    with open(gpu_csv, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(written)
    table = stream.markdown(gpu_csv, targets=issue_targets)
    assert "cuda (NVIDIA H200) (1 host threads)" in table and "Peak: not measured on cuda." in table
    assert "Targets (issues 10, 60 and 96)" in table
    assert "- (d) >= 0.85 of the token-layer ideal on the GPU (issue 60): " in table
    assert "- (f) >= 0.85 of the token-layer ideal on the GPU (issue 96): " in table
    assert "- (h) segments / (f) cohorts (issue 96): " in table  # which design is faster, said by the GPU run
    assert "- (i) packed-token cohorts / (f) cohorts (issue 96): " in table


def test_the_gpu_sessions_stream_step_runs_the_segments_and_packed_cohorts_beside_the_cohorts(capsys):
    """scripts/gpu_session.sh's stream_bf16 step passes --segments and --varlen, and every flag it passes is one the
    benchmark's command line takes (parsed here up to --from-csv, which stops before any work)."""
    import shlex

    script = (Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.sh").read_text()
    command = script.split("step stream_bf16 ", 1)[1].replace("\\\n", " ").split("\n", 1)[0]  # the CUDA one, first
    argv = shlex.split(command.split(" stream ", 1)[1])
    assert "--segments" in argv and "--varlen" in argv  # (h) and (i) beside (f)
    assert "--cohort-tokens" not in argv  # (f) at its default 16,384 tokens
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "unknown_cpu" / "stream_cpu.csv"
    assert stream.main([*argv, "--from-csv", str(committed)]) == 0
    assert "| (d) eek.classify |" in capsys.readouterr().out


def test_the_models_are_calibrated_in_float32_then_cast():
    config = StreamConfig(sequences=32, hidden=32, layers=3, heads=1, dtype="bf16")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, _, ids = stream.make_corpus(config, Path(folder))
    unpatched, patched, entropies = stream.make_models(config, len(tokenizer), stream.sorted_batches(ids, 16))
    assert entropies.dtype == torch.float32 and entropies.shape == (32, 2)
    assert {p.dtype for p in unpatched.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in patched.parameters()} == {torch.bfloat16}
    reference, _, fp32_entropies = stream.make_models(
        StreamConfig(sequences=32, hidden=32, layers=3, heads=1), len(tokenizer), stream.sorted_batches(ids, 16)
    )
    assert torch.equal(entropies, fp32_entropies)  # the calibration does not see the dtype
    assert torch.equal(reference.classifier.weight.to(torch.bfloat16), unpatched.classifier.weight)


def test_an_opt_in_engine_whose_first_pass_fails_costs_its_own_row_not_the_run():
    """On a GPU the engines no GPU has run yet, (h) and (i), may fail their first pass: they are left out with
    why, in the table's note, and the other methods go on; (d), (f) and (g) failing still stops the run."""
    ran = []

    def fails():
        raise RuntimeError("varlen_attn: no kernel for this device")

    runners = {key: (lambda key=key: ran.append(key)) for key in "dfgh"} | {"i": fails}
    keys, left_out, said = ["b", "c", "d", "f", "h", "i"], {}, []
    stream.first_passes(runners, keys, left_out, said.append)
    assert ran == ["d", "f", "h"] and keys == ["b", "c", "d", "f", "h"]
    assert left_out == {"i": "RuntimeError: varlen_attn: no kernel for this device"}
    assert said == ["  (i) eek.classify, packed-token cohorts left out, its first pass failed: " + left_out["i"]]
    note = stream._note(StreamConfig(varlen=True), 10.0, 0.1, left_out=left_out)
    assert "--varlen" in note and "Left out: (i) eek.classify, packed-token cohorts, whose first pass failed" in note
    with pytest.raises(RuntimeError):
        stream.first_passes({"d": fails}, ["d"], {}, said.append)
