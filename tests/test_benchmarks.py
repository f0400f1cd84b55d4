"""benchmarks.norms runs end to end on tiny shapes (no timing is asserted)."""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import norms

pytestmark = pytest.mark.slow  # benchmark runs, some in subprocesses


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


def test_train_step_benchmark_on_simulated_devices(tmp_path):
    """Like is timed against like (same model, initialization and batch through
    flax's and normjax's norms: the same first loss), and --devices sets the
    device-count flag before JAX starts (a fresh process) and adds the global vs
    per-device statistics table."""
    out = tmp_path / "steps.json"
    args = ["--cases", "fast_cnn:batch,text:bln", "--batch-scale", "0.0625"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            "--devices",
            "2",
            *args,
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 device(s)" in proc.stdout and "speed-up" in proc.stdout
    assert "synchronization of global-batch statistics" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["flax"]
    assert [r["case"] for r in rows] == ["fast_cnn:batch", "text:bln"]
    for row in rows:
        assert row["flax_step_s"] > 0 and row["normjax_step_s"] > 0
        assert row["flax_peak_mib"] > 0 and row["normjax_peak_mib"] > 0
    assert rows[0]["first_loss_diff"] < 1e-4, rows[0]  # a namesake
    # a research norm runs against Flax's batch norm (non-causal in the text
    # model), marked as such
    assert rows[1]["baseline"] == "flax.batch_noncausal"
    assert rows[1]["first_loss_diff"] is None
    assert "text:bln (vs BN)" in proc.stdout
    (sync,) = result["sync"]
    assert sync["model"] == "fast_cnn" and sync["devices"] == 2
    assert sync["global_step_s"] > 0 and sync["per_device_step_s"] > 0


def test_train_step_benchmark_rejects_bad_arguments():
    from benchmarks import train_step

    with pytest.raises(ValueError, match="use MODEL:NORM"):
        train_step.parse_cases("vgg:batch")
    with pytest.raises(SystemExit, match="--devices 4 but JAX sees 1"):
        train_step.main(["--devices", "4"])
