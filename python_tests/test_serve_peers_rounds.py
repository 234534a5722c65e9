"""The rounds summary of the serving benchmark: each eek server over Infinity's best configuration of the round,
and a round made of results at two batch caps, pooled."""

import json

from benchmarks.suite.serve_peers_rounds import main, pooled, ratios


def _row(server, concurrency, texts_per_s, p99_ms, texts_per_request=1):
    return {
        "server": server,
        "concurrency": concurrency,
        "texts_per_request": texts_per_request,
        "texts_per_s": texts_per_s,
        "p99_ms": p99_ms,
        "texts": 100,
        "agree": 95,
        "mean_exit_layer": 2.4 if server.startswith("eek") else None,
    }


def _result(cap, rows, name):
    return {"cpu": "test CPU", "max_batch_size": cap, "command": f"serve_peers_cli --name {name}", "rows": rows}


def test_each_eek_server_is_measured_against_the_fastest_infinity_configuration_of_its_level():
    result = _result(
        32,
        [
            _row("eek serve int8", 32, 300.0, 300.0),
            _row("infinity onnx int8", 32, 150.0, 200.0),
            _row("infinity torch int8", 32, 100.0, 100.0),  # a lower p99, but slower: not the best
        ],
        "r1",
    )
    assert ratios(result) == {("eek serve int8", "c32"): (2.0, 1.5, "infinity onnx int8")}


def test_a_round_at_two_caps_names_each_server_with_its_cap_and_takes_infinity_s_best_of_both():
    at_16 = _result(16, [_row("eek serve int8", 32, 320.0, 150.0), _row("infinity onnx int8", 32, 150.0, 250.0)], "a")
    at_32 = _result(32, [_row("eek serve int8", 32, 300.0, 300.0), _row("infinity onnx int8", 32, 160.0, 200.0)], "b")
    got = ratios(pooled([at_16, at_32]))
    assert got == {
        ("eek serve int8 (batch 16)", "c32"): (2.0, 0.75, "infinity onnx int8 (batch 32)"),
        ("eek serve int8 (batch 32)", "c32"): (300.0 / 160.0, 1.5, "infinity onnx int8 (batch 32)"),
    }
    assert [r["server"] for r in pooled([at_32])["rows"]] == ["eek serve int8", "infinity onnx int8"]  # one cap


def test_openvino_per_batch_is_the_strongest_peer_where_it_is_fastest():
    result = _result(
        32,
        [
            _row("eek serve int8", 1, 360.0, 130.0, texts_per_request=32),
            _row("infinity onnx int8", 1, 270.0, 130.0, texts_per_request=32),
            _row("openvino int8 (per batch, in process)", 1, 300.0, 260.0, texts_per_request=32),
        ],
        "r1",
    )
    assert ratios(result) == {
        ("eek serve int8", "32 texts a request"): (1.2, 0.5, "openvino int8 (per batch, in process)")
    }


def test_the_command_line_reads_rounds_joined_by_plus(tmp_path, capsys):
    paths = []
    for index, (eek_p99, peer_p99) in enumerate([(150.0, 250.0), (160.0, 200.0), (140.0, 300.0)]):
        at_16 = _result(
            16, [_row("eek serve int8", 32, 300.0, eek_p99), _row("infinity onnx int8", 32, 150.0, 1e9)], "a"
        )
        at_32 = _result(32, [_row("infinity onnx int8", 32, 200.0, peer_p99)], f"round{index}")
        first, second = tmp_path / f"a{index}.json", tmp_path / f"b{index}.json"
        first.write_text(json.dumps(at_16))
        second.write_text(json.dumps(at_32))
        paths.append(f"{first}+{second}")
    assert main(paths) == 0
    out = capsys.readouterr().out
    # texts/s 300 / 200 in every round; p99 150 / 250, 160 / 200, 140 / 300: median 0.60, range 0.47-0.80
    assert "| eek serve int8 (batch 16) | c32 | 1.50x [1.50-1.50] | 0.60x [0.47-0.80] |" in out
