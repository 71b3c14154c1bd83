"""The demo command: its table and its argument checks (the full run is `make demo`)."""

import pytest

from clipvip_jax import demo


def test_format_table_rows_and_columns():
  metrics = {f"{d}/{m}": v for d in ("t2v", "v2t") for m, v in zip(demo.METRICS, (61.0, 90.0, 99.0, 1.0, 1.5))}
  table = demo.format_table({"CLIP-ViP": metrics, "meanP baseline": {k: v / 2 for k, v in metrics.items()}})
  lines = table.splitlines()
  assert len(lines) == 4 and lines[0].count("|") == 12
  assert "| CLIP-ViP | 61.0 | 90.0 | 99.0 | 1.0 | 1.5 | 61.0 |" in table
  assert "| meanP baseline | 30.5 |" in table


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--clips", "21"], "--clips")])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(argv)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err
