"""The serving benchmarks, tiny: `eek bench serve` (earlyexit_kernels/bench/serve_load.py), and the real model beside
its peers with the soak (benchmarks/suite/serve_peers_cli.py).

A tiny random BERT saved twice: plain (what Infinity and the full model read) and patched with
``Entropy(0.0)``, which never exits (what ``eek serve`` reads), so that ``eek serve``'s labels must
equal the full model's. Infinity's part runs where it is installed (``EEK_INFINITY_PYTHON``, else
``.venv-infinity/bin/python`` of the checkout: benchmarks/setup_infinity_env.sh) and is skipped,
with the reason, where it is not.
"""

import ast
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import word_bert, word_texts

import earlyexit_kernels as eek
from benchmarks.suite import infinity_peer, openvino_peer, serve_peers, serve_peers_cli, serve_peers_report
from benchmarks.suite.serve_peers import END, START, PeersConfig
from earlyexit_kernels.bench import serve_load
from earlyexit_kernels.bench.server_process import parse_cores

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp", reason="the benchmarks' load client is aiohttp (earlyexit_kernels/bench/load_client.py)")

CHECKOUT = Path(__file__).resolve().parents[1]
INFINITY = os.environ.get("EEK_INFINITY_PYTHON") or str(CHECKOUT / infinity_peer.default_python())
TEXTS = [text for text in word_texts(30, seed=3, longest=20) if text][:10]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(eek model folder, plain folder) of the same tiny BERT."""
    path = tmp_path_factory.mktemp("peers")
    plain, patched = path / "plain", path / "model"
    plain.mkdir()
    labels = {0: "rotten", 1: "fresh"}
    model, tokenizer = word_bert(plain, 2, id2label=labels, label2id={v: k for k, v in labels.items()})
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)  # labels far from ties: a batch's padding cannot flip one
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    eek.patch(model, eek.Entropy(0.0))
    model.save_pretrained(patched)
    tokenizer.save_pretrained(patched)
    return patched, plain


def tiny_config(folders, **changes) -> PeersConfig:
    model, plain = folders
    settings = dict(
        model=model,
        plain=plain,
        texts=TEXTS,
        source="a tiny random BERT",
        concurrency=(1, 2),
        requests=8,
        max_seconds=20,
        texts_per_request=4,  # the corpus job: the 10 texts in requests of 4, 4 and 2
        soak_seconds=0,
    )
    return PeersConfig(**{**settings, **changes})


def test_without_infinity_the_peers_are_skipped_with_the_reason(tmp_path):
    found, why = infinity_peer.find_infinity(tmp_path / "no-env" / "bin" / "python")
    assert found is None and "does not exist" in why and "setup_infinity_env.sh" in why
    found, why = infinity_peer.find_infinity(sys.executable)  # the package's own environment: no Infinity
    if found is None:
        assert "Infinity is not installed" in why and "infinity_emb" in why


def test_the_real_mode_runs_eek_serve_and_skips_an_absent_infinity(folders, tmp_path):
    config = tiny_config(folders, infinity_python=tmp_path / "absent" / "python")
    result = serve_peers.run(config, tmp_path / "out", name="tiny", progress=lambda message: None)
    peers = [p.name for p in infinity_peer.PEERS]
    assert set(result["skipped"]) == {*peers, openvino_peer.NAME}
    assert all("does not exist" in result["skipped"][peer] for peer in peers)
    assert result["skipped"][openvino_peer.NAME] in (
        "no calibration texts given (they are what NNCF quantizes on)",
        openvino_peer.missing(),
    )
    rows = {(r["server"], r["concurrency"], r["texts_per_request"]): r for r in result["rows"]}
    levels = {(1, 1): (2, 2), (2, 1): (8, 8), (1, 4): (3, 10)}  # (concurrency, texts a request): requests, texts
    assert set(rows) == {(s, *level) for s in ("eek serve", "eek serve int8") for level in levels}
    for (server, concurrency, per), row in rows.items():
        assert (row["requests"], row["texts"]) == levels[concurrency, per] and row["errors"] == 0
        assert row["texts_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["rss_mib"] > 0 and row["peak_rss_mib"] >= row["rss_mib"]
        if server == "eek serve":  # Entropy(0.0) never exits: the full model's labels, every layer
            assert row["agreement"] == 1.0 and row["mean_exit_layer"] == 4
    assert result["texts_per_request"] == 4 and result["corpus_concurrency"] == 1
    with open(tmp_path / "out" / "serve_peers_tiny.csv") as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == serve_peers.COLUMNS and len(written) == 6
    recorded = json.loads((tmp_path / "out" / "serve_peers_tiny.json").read_text())
    assert recorded["rows"] == result["rows"] and recorded["soak"] is None
    section = serve_peers.render(recorded)
    assert section.startswith(START) and section.rstrip().endswith(END)
    assert "| server | concurrency 1 | concurrency 2 | 4 texts a request | agreement |" in section
    assert "then each text once in requests of 4 (1 at a time: a corpus job" in section
    assert "| eek serve | " in section and "100.00% of 20" in section
    assert "Skipped infinity onnx int8: Infinity is not installed" in section


@pytest.mark.skipif(openvino_peer.missing() is not None, reason=f"OpenVINO's peer: {openvino_peer.missing()}")
def test_openvino_int8_runs_the_corpus_job_s_batches_beside_the_servers(folders, tmp_path):
    """Infinity serves no OpenVINO: its static int8 of the plain classifier runs the corpus job's batches in the
    benchmark's process, quantized on calibration texts that are not the ones timed."""
    calibration = [text for text in word_texts(60, seed=4, longest=20) if text][:40]
    config = tiny_config(
        folders,
        calibration_texts=lambda: calibration,
        servers=(openvino_peer.NAME,),
        infinity_python=tmp_path / "absent",
    )
    result = serve_peers.run(config, tmp_path / "out", name="tiny", progress=lambda message: None)
    (row,) = result["rows"]
    assert (row["server"], row["concurrency"], row["texts_per_request"]) == (openvino_peer.NAME, 1, 4)
    assert (row["requests"], row["texts"], row["errors"]) == (3, 10, 0) and row["texts_per_s"] > 0
    assert row["agreement"] > 0.5  # int8 of a tiny random model whose labels sit far from ties
    assert (
        "static int8, nncf.quantize(model_type=TRANSFORMER) on 40 calibration texts" in result["notes"][row["server"]]
    )
    without = serve_peers.run(
        tiny_config(folders, servers=(openvino_peer.NAME,)), tmp_path / "out2", name="tiny", progress=lambda m: None
    )
    assert without["rows"] == [] and "no calibration texts" in without["skipped"][openvino_peer.NAME]


def test_the_soak_reads_the_server_s_memory_before_during_and_after(folders):
    config = tiny_config(folders, soak_seconds=3, soak_samples=3, soak_concurrency=4)
    full = serve_peers.full_model_labels(config.plain, config.texts)
    soak = serve_peers.soak(config, full, progress=lambda message: None)
    assert soak["requests"] > 0 and soak["errors"] == 0 and soak["agreement"] == 1.0
    assert 2.5 < soak["seconds"] < 10
    assert soak["rss_before_mib"] > 0 and soak["rss_after_mib"] > 0 and soak["rss_start_mib"] > 0
    assert soak["rss_min_mib"] <= soak["rss_before_mib"] <= soak["rss_max_mib"]
    assert len(soak["samples"]) >= 4  # after the warm-up, every second or so, at the end
    assert isinstance(soak["flat"], bool) and soak["rss_largest_deviation_pct"] >= abs(soak["rss_change_pct"])
    assert "Resident memory (VmRSS)" in serve_peers_report._soak_text(soak)


RECORDED = {
    "date": "2026-01-01",
    "cpu": "Some CPU",
    "cpu_count": 2,
    "command": "python -m earlyexit_kernels.bench.serve_load --rotten-tomatoes",
    "model": "m",
    "plain": "p",
    "source": "MiniLM-L6 fine-tuned on Rotten Tomatoes, the test split's 2500 snippets",
    "texts": 2500,
    "server_cores": [0],
    "client_cores": [1],
    "threads": 1,
    "max_batch_size": 32,
    "requests": 256,
    "max_seconds": 30.0,
    "concurrency": [1, 32],
    "versions": {
        "eek": {"torch": "2.13.0+cpu", "transformers": "5.24.0"},
        "infinity": {"infinity-emb": "0.0.78", "torch": "2.13.0+cpu", "onnxruntime": "1.32.0", "optimum": None},
    },
    "quantize_flag": "--avx512_vnni",
    "rows": [
        {
            "server": "eek serve",
            "concurrency": 1,
            "requests": 64,
            "texts_per_s": 200.5,
            "p50_ms": 4.9,
            "p99_ms": 9.1,
            "agreement": 0.9844,
            "agree": 63,
            "mean_exit_layer": 3.1,
            "errors": 0,
        },
        {
            "server": "eek serve",
            "concurrency": 32,
            "requests": 256,
            "texts_per_s": 300.25,
            "p50_ms": 100.0,
            "p99_ms": 150.0,
            "agreement": 0.9961,
            "agree": 255,
            "mean_exit_layer": 3.3,
            "errors": 0,
        },
        {
            "server": "infinity torch fp32",
            "concurrency": 1,
            "requests": 64,
            "texts_per_s": 90.0,
            "p50_ms": 11.0,
            "p99_ms": 14.0,
            "agreement": 1.0,
            "agree": 64,
            "mean_exit_layer": "",
            "errors": 0,
        },
        {
            "server": "infinity torch fp32",
            "concurrency": 32,
            "requests": 250,
            "texts_per_s": 120.0,
            "p50_ms": 260.0,
            "p99_ms": 300.0,
            "agreement": 1.0,
            "agree": 250,
            "mean_exit_layer": "",
            "errors": 6,
        },
    ],  # fmt: skip
    "notes": {"infinity onnx fp32": "Infinity's ONNX graph optimization failed; it served the model as exported"},
    "skipped": {"infinity onnx int8": "it failed here"},
    "soak": {
        "concurrency": 32,
        "seconds": 300.0,
        "warm_up_seconds": 30.0,
        "requests": 90000,
        "texts_per_s": 300.0,
        "p50_ms": 100.0,
        "p99_ms": 160.0,
        "errors": 0,
        "agreement": 0.99,
        "rss_start_mib": 400.0,
        "rss_before_mib": 420.0,
        "rss_after_mib": 425.0,
        "rss_min_mib": 419.0,
        "rss_max_mib": 426.0,
        "rss_change_pct": 1.19,
        "rss_largest_deviation_pct": 1.43,
        "flat": True,
        "samples": [[0.0, 420.0]] * 12,
    },  # fmt: skip
}


def test_the_section_renders_a_recorded_result_into_its_markers(tmp_path):
    section = serve_peers.render(RECORDED)
    assert "| server | concurrency 1 | concurrency 32 | agreement | mean exit layer |" in section
    assert "| eek serve | 200.5/s, 4.9 / 9.1 ms | 300.25/s, 100.0 / 150.0 ms | 99.38% of 320 | 3.20 |" in section
    assert (
        "| infinity torch fp32 | 90.0/s, 11.0 / 14.0 ms | 120.0/s, 260.0 / 300.0 ms | 100.00% of 314 | - |" in section
    )
    assert "Errors: infinity torch fp32: 6." in section
    assert "Skipped infinity onnx int8: it failed here." in section
    assert "infinity onnx fp32: Infinity's ONNX graph optimization failed" in section
    assert "Infinity 0.0.78: torch 2.13.0+cpu, onnxruntime 1.32.0; ONNX int8 by" in section
    assert "each server pinned to core(s) 0, the client to 1" in section
    assert "420.0 MiB after the warm-up, 425.0 MiB at the end (+1.19%)" in section
    assert "flat within +-5%" in section and "**not**" not in section
    doc = tmp_path / "serving.md"
    doc.write_text(f"# Serving\n\nbefore\n\n{START}\nrun the command\n{END}\n\nafter\n")
    serve_peers.write_readme(doc, RECORDED)
    text = doc.read_text()
    assert text.startswith("# Serving\n\nbefore\n\n" + START) and text.endswith(END + "\n\nafter\n")
    assert "run the command" not in text and text.count(START) == 1
    serve_peers.write_readme(doc, {**RECORDED, "soak": {**RECORDED["soak"], "flat": False}})
    assert "**not** flat" in doc.read_text() and doc.read_text().count(START) == 1


def test_the_corpus_job_s_column_renders_from_its_rows():
    corpus_rows = [
        dict(row, concurrency=1, texts_per_request=32, requests=10, texts=320, texts_per_s=400.0, agree=316)
        for row in RECORDED["rows"]
        if row["concurrency"] == 32
    ]
    recorded = {**RECORDED, "texts_per_request": 32, "corpus_concurrency": 1, "rows": RECORDED["rows"] + corpus_rows}
    section = serve_peers.render(recorded)
    assert "| server | concurrency 1 | concurrency 32 | 32 texts a request | agreement | mean exit layer |" in section
    assert "|---|---:|---:|---:|---:|---:|" in section
    # the one-text cells stay their own; the corpus cell is the corpus row's; agreement counts texts
    assert "| eek serve | 200.5/s, 4.9 / 9.1 ms | 300.25/s, 100.0 / 150.0 ms | 400.0/s, 100.0 / 150.0 ms | " in section
    assert "99.06% of 640 |" in section  # (63 + 255 + 316) / (64 + 256 + 320)
    assert "32 texts a request" not in serve_peers.render(RECORDED)  # recorded before the corpus job


def test_the_command_line_refuses_a_one_text_corpus_job(folders):
    model, plain = folders
    with pytest.raises(SystemExit, match="--texts-per-request must be 0 .no corpus job. or >= 2"):
        serve_peers_cli.main(["--model", str(model), "--plain", str(plain), "--texts", "x", "--texts-per-request", "1"])


def test_the_command_line_renders_a_recorded_result(tmp_path, capsys):
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps(RECORDED))
    doc = tmp_path / "serving.md"
    doc.write_text("# Serving\n")
    assert serve_peers_cli.main(["--from-json", str(recorded), "--readme", str(doc)]) == 0
    assert START in capsys.readouterr().out
    assert "## The serving benchmark's peers" in doc.read_text() and END in doc.read_text()


def test_a_second_model_s_table_has_its_own_section(tmp_path):
    """The MPNet run (``--rotten-tomatoes --backbone mpnet``) writes its table beside the
    MiniLM one: its own markers, and rewriting either leaves the other as it was."""
    doc = tmp_path / "serving.md"
    doc.write_text("# Serving\n")
    serve_peers_report.write_readme(doc, RECORDED)
    mpnet = {**RECORDED, "section": "serve-peers-mpnet", "source": "MPNet-base on the same texts"}
    serve_peers_report.write_readme(doc, mpnet)
    serve_peers_report.write_readme(doc, RECORDED)
    text = doc.read_text()
    assert text.count(START) == 1 and text.count("<!-- serve-peers-mpnet:start -->") == 1
    assert "MPNet-base on the same texts" in text.split("<!-- serve-peers-mpnet:start -->")[1]


def test_cores_parse():
    assert parse_cores("0") == (0,) and parse_cores("0,2-3") == (0, 2, 3)
    assert parse_cores("none") is None and parse_cores(None) is None


def test_infinity_serves_the_same_labels_where_it_is_installed(folders, tmp_path):
    found, why = infinity_peer.find_infinity(INFINITY)
    if found is None:
        pytest.skip(why)
    config = tiny_config(
        folders,
        servers=("infinity torch fp32", "infinity onnx int8"),
        infinity_python=Path(INFINITY),
        concurrency=(2,),
    )
    result = serve_peers.run(config, tmp_path / "out", name="tiny", progress=lambda message: None)
    assert result["skipped"] == {} and result["versions"]["infinity"]["infinity-emb"]
    rows = {r["server"]: r for r in result["rows"] if r["texts_per_request"] == 1}
    corpus = {r["server"]: r for r in result["rows"] if r["texts_per_request"] > 1}
    assert set(rows) == set(corpus) == {"infinity torch fp32", "infinity onnx int8"}
    for row in rows.values():
        assert row["requests"] == 8 and row["errors"] == 0 and row["rss_mib"] > 0
    assert all(row["errors"] == 0 and row["texts"] == len(config.texts) for row in corpus.values())
    assert rows["infinity torch fp32"]["agreement"] == 1.0  # the same weights in float32
    assert "| infinity onnx int8 |" in serve_peers.render(result)


def test_the_synthetic_mode_still_runs(tmp_path):
    config = serve_load.LoadConfig(
        sequences=128, hidden=32, layers=2, requests=16, concurrency=(1, 4), max_seconds=10, server_threads=1
    )
    rows = serve_load.run(config, tmp_path, name="tiny", progress=lambda message: None)
    servers = {(r["server"], r["workload"], r["concurrency"]) for r in rows}
    assert ("early_exit", "stream", 4) in servers and ("never_exit", "hard (with easy)", 32) in servers
    assert all(r["requests"] > 0 for r in rows)
    assert "| 4 |" in (tmp_path / "serve_load_tiny.md").read_text()


def test_a_peer_that_does_not_start_is_skipped_with_its_error(folders, tmp_path):
    # this environment's Python has no infinity_emb: Infinity's command line fails at its import
    if infinity_peer.find_infinity(sys.executable)[0] is not None:
        pytest.skip("this environment has Infinity")
    config = tiny_config(folders, servers=("infinity torch fp32",), infinity_python=Path(sys.executable))
    rows, notes, failed = serve_peers.measure(config, [], tmp_path, None, progress=lambda message: None)
    assert rows == [] and list(failed) == ["infinity torch fp32"]
    assert failed["infinity torch fp32"].startswith("it did not start: ")
    assert "infinity_emb" in failed["infinity torch fp32"] or "Error" in failed["infinity torch fp32"]


def test_the_command_line_runs_the_soak_alone_on_a_given_model(folders, tmp_path, capsys):
    model, plain = folders
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    doc = tmp_path / "serving.md"
    doc.write_text(f"# Serving\n\n{START}\nnot measured yet\n{END}\n")
    argv = ["--model", str(model), "--plain", str(plain), "--texts", str(texts), "--soak-only", "--soak-seconds", "2"]
    argv += ["--server-cores", "none", "--client-cores", "none", "--output-dir", str(tmp_path / "out"), "--name", "t"]
    assert serve_peers_cli.main([*argv, "--readme", str(doc)]) == 0
    capsys.readouterr()
    recorded = json.loads((tmp_path / "out" / "serve_peers_t.json").read_text())
    assert recorded["rows"] == [] and recorded["skipped"] == {} and recorded["soak"]["requests"] > 0
    assert recorded["source"] == f"model, the {len(TEXTS)} texts of texts.txt" and recorded["server_cores"] is None
    section = doc.read_text()
    assert "Soak: `eek serve` at concurrency 32" in section and "| server |" not in section
    assert "not measured yet" not in section and "nothing pinned" in section


def test_the_section_names_the_cpu_s_instruction_sets():
    from earlyexit_kernels.bench.results import instruction_sets

    flags = "fpu sse avx2 avx512f avx512bw avx512_vnni"
    assert instruction_sets(flags) == ["AVX2", "AVX-512", "VNNI"]
    assert instruction_sets("fpu sse avx2 avx_vnni") == ["AVX2", "VNNI"]
    assert instruction_sets("fpu neon") == []
    section = serve_peers.render({**RECORDED, "instruction_sets": ["AVX2", "AVX-512", "VNNI"]})
    assert f"{RECORDED['cpu']} (AVX2, AVX-512, VNNI), " in section
    assert "(none of AVX2, AVX-512, VNNI)" in serve_peers.render({**RECORDED, "instruction_sets": []})
    assert f"{RECORDED['cpu']}, " in serve_peers.render(RECORDED)  # recorded before they were: nothing said


def test_backbone_all_runs_each_model_with_the_command_that_measures_it_alone(monkeypatch, folders, tmp_path):
    model, plain = folders
    made, ran = [], []
    monkeypatch.setattr(
        serve_peers_cli,
        "rotten_tomatoes",
        lambda models_dir, backbone: made.append(backbone) or (model, plain, None, TEXTS, f"{backbone} texts"),
    )

    def fake_run(config, output_dir, name, command):
        ran.append((config.section, name, command))
        return {**RECORDED, "section": config.section, "source": config.source, "command": command}

    monkeypatch.setattr(serve_peers_cli, "run", fake_run)
    doc = tmp_path / "serving.md"
    doc.write_text("# Serving\n")
    argv = ["--rotten-tomatoes", "--backbone", "all", "--soak-seconds", "0", "--output-dir", str(tmp_path)]
    assert serve_peers_cli.main([*argv, "--readme", str(doc)]) == 0
    assert made == ["minilm", "mpnet"]
    assert [(section, name) for section, name, _ in ran] == [("serve-peers", "cpu"), ("serve-peers-mpnet", "mpnet_cpu")]
    assert (
        "--backbone minilm" in ran[0][2]
        and "--backbone mpnet" in ran[1][2]
        and "--backbone all" not in ran[0][2] + ran[1][2]
    )
    text = doc.read_text()
    assert text.count(START) == 1 and text.count("<!-- serve-peers-mpnet:start -->") == 1


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (inside functions too), as a dotted name; a
    ``from PACKAGE import NAME`` counts as both PACKAGE and PACKAGE.NAME (NAME may be a module)."""
    package = "benchmarks.suite"  # what a relative import in benchmarks/suite/ is relative to
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, [package if node.level else "", node.module or ""]))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_openvino_peer_imports_nothing_from_serve_peers():
    """serve_peers imports openvino_peer; the client pieces both use live in serve_drive, so no circle."""
    suite = CHECKOUT / "benchmarks" / "suite"
    openvino = _imported_modules(suite / "openvino_peer.py")
    assert "benchmarks.suite.serve_peers" not in openvino
    assert "benchmarks.suite.serve_drive" in openvino  # Drive, pinned, summarize: where they are now
    drive = _imported_modules(suite / "serve_drive.py")
    assert not {"benchmarks.suite.serve_peers", "benchmarks.suite.openvino_peer"} & drive
