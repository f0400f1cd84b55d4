"""benchmarks.norms runs end to end on tiny shapes (no timing is asserted)."""

import json

from benchmarks import norms


def test_benchmark_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = norms.main(
        [
            "--shapes",
            "4x8x32",
            "--layers",
            "batch,group,bln",
            "--dtypes",
            "float32,bfloat16",
            "--repeats",
            "1",
            "--copy-mib",
            "8",
            "--json",
            str(out),
        ]
    )
    assert len(rows) == 3 * 2 * 2  # layers x dtypes x passes
    for row in rows:
        assert row["flax_ms"] > 0 and row["normjax_ms"] > 0
        assert row["ratio"] == row["normjax_ms"] / row["flax_ms"]
        if row["layer"] == "bln (vs BN)":  # against BatchNorm: not the same function
            assert row["max_abs_diff"] != row["max_abs_diff"]  # nan
            continue
        tol = 1e-3 if row["dtype"] == "float32" else 0.1
        assert row["max_abs_diff"] < tol, row  # the two libraries agree
    printed = capsys.readouterr().out
    assert "median ratio normjax/flax" in printed and "GroupNorm" in printed
    assert "research fwd+bwd" in printed
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows)
    assert saved["rows"][0] == json.loads(json.dumps(rows[0]))
    assert saved["copy_bandwidth_bytes_per_s"] > 0


def test_normalize_benchmark_runs(capsys):
    from benchmarks import normalize

    rows = normalize.main(["--shapes", "4x5x6", "--repeats", "1"])
    assert len(rows) == 2 * 2  # reductions x passes
    assert all(row["fused_ms"] > 0 and row["autodiff_ms"] > 0 for row in rows)
    assert "one-pass ms" in capsys.readouterr().out
