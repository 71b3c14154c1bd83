"""benchmarks/search_scale.py and benchmarks/encode_throughput.py at a toy size: they run and report sane rows
(no timing assertions: the figures are in docs/performance.md)."""

import pytest

from benchmarks import encode_throughput, search_scale


@pytest.mark.slow  # an approximate-index build and subprocesses: ~30 s
def test_search_scale_runs_at_a_toy_size(tmp_path):
  rows = search_scale.main(["--sizes", "3000", "--work", str(tmp_path), "--repeats", "2", "--batch-repeats", "1"])
  assert [(r["rows"], r["backend"]) for r in rows] == [(3000, "exact"), (3000, "approximate")]
  for r in rows:
    assert 0 < r["one"]["p50_ms"] <= r["one"]["max_ms"] and r["batch64"]["calls"] == 1
  assert 0.5 <= rows[1]["recall_at_10"] <= 1.0 and rows[1]["factory"].startswith("IVF")


@pytest.mark.slow  # imports torch and transformers: ~30 s
def test_encode_throughput_runs_at_a_toy_size():
  (row,) = encode_throughput.main(["--variants", "tiny", "--image-size", "32", "--frames", "2", "--batch", "8",
                                   "--repeats", "1"])
  assert row["ours_clips_per_s"] > 0 and row["peer_clips_per_s"] > 0
