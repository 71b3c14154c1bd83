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


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--clips", "21"], "--clips"),
                                           (["--seed", "one"], "--seed")])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(argv)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_demo_text_length_holds_the_longest_synthetic_caption():
  """configs/demo.py trims text to MAX_TEXT_LEN tokens: no synthetic caption may be cut."""
  from clipvip_jax import tokenizer
  from data_pipelines import synthetic

  config, module = demo._load_demo_config("clipvip")
  count = lambda text: int((tokenizer.tokenize([text], 77)[0] != 0).sum())
  longest = {name: max(values, key=count) for name, values in (
      ("shape", synthetic.SHAPES), ("colour", list(synthetic.COLOURS)), ("size", list(synthetic.SIZES)),
      ("speed", list(synthetic.SPEEDS)), ("background", synthetic.BACKGROUNDS))}
  direction = max((d for axis in synthetic.AXES for d, _ in axis), key=count)
  text = synthetic.caption({**longest, "second": (longest["colour"], longest["shape"])}, direction)
  # CLIP's BPE splits words independently, so the attributes with the most tokens make the longest caption.
  assert count(text) <= module.MAX_TEXT_LEN == config.data.max_text_len == config.model.clip.text.max_len


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_few_steps(tmp_path, capsys):
  """The whole command on a tiny budget: data, both models, table, results.json, curves."""
  import json

  summary = demo.run(tmp_path, steps=3, clips=40, seed=3)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["seed"] == 3  # --seed: both models' initialisation and data order
  for kind in ("clipvip", "meanp"):
    config = json.loads((tmp_path / kind / "config.json").read_text())
    assert config["seed"] == config["data"]["seed"] == 3
  assert set(results["results"]) == {"CLIP-ViP", "meanP baseline"}
  for metrics in results["results"].values():
    assert 0.0 <= metrics["t2v/R@1"] <= 100.0 and metrics["t2v/MdR"] >= 1.0
  assert results["table"] == summary["table"] and "| CLIP-ViP |" in capsys.readouterr().out
  assert (tmp_path / "training_curves.png").stat().st_size > 0
  assert any((tmp_path / "clipvip" / "tensorboard").glob("events.out.tfevents.*"))
  found = results["search"]
  assert found["queries"] == 4 and 0.0 <= found["top1"] <= found["top5"] <= 100.0  # 2 test pairs of 40 clips
  assert (tmp_path / "index" / "index.json").exists() and len(found["example"]["ranking"]) == 4
