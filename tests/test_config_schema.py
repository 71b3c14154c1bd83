"""The run config's schema (clipvip_jax/train/config_schema.py): every recipe loads through it; a key it does not
declare, in a recipe file, on the command line or in a library call, is refused in one sentence naming the key
and the closest declared one; runtime versus fixed keys come from it alone."""

import pathlib

import ml_collections
import pytest

from clipvip_jax.train import cli, config_schema, model_init, run_config, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
# The arguments each recipe takes (none: its default); a recipe file added without an entry is loaded bare.
ARGS = {"clipvip_msrvtt.py": ("B/32", "B/16"), "clipvip_pretrain.py": ("B/32", "B/16"),
        "clipvip_didemo.py": ("B/32", "B/16"), "clipvip_lsmdc.py": ("B/32", "B/16"),
        "clipvip_activitynet.py": ("B/32", "B/16"), "demo.py": ("clipvip", "meanp"), "tiny_test.py": ("", "meanp"),
        "clip2video_msrvtt.py": ("", "runlocal"), "clip2video_msvd.py": ("", "runlocal"),
        "clip2video_vatex.py": ("", "runlocal")}
RECIPES = [(p.name, a) for p in sorted((REPO / "configs").glob("*.py")) for a in ARGS.get(p.name, ("",))]


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


@pytest.mark.parametrize("name, arg", RECIPES)
def test_every_recipe_loads_through_the_schema_with_every_declared_key(name, arg):
  config = cli.load_config(str(REPO / "configs" / name) + (f":{arg}" if arg else ""))
  assert config.is_locked
  for section, keys in config_schema.sections().items():
    node = config[section] if section else config
    assert set(keys) <= set(node.keys()), f"{name}: config.{section} lacks {sorted(set(keys) - set(node.keys()))}"
  assert not any(key.split(".")[0] not in config_schema.sections() and key not in config_schema.TOP
                 for key in _leaves(config))
  trainer.check_config(config)
  run_config.check_values(config)
  with pytest.raises(AttributeError):  # locked: a misspelt assignment in code fails too
    config.optim.warmup_fractoin = 0.5


def _recipe(tmp_path, line: str) -> str:
  """A recipe file: configs/tiny_test.py with one more line."""
  path = tmp_path / "typo.py"
  path.write_text("import importlib.util\n"
                  f"spec = importlib.util.spec_from_file_location('tiny', {str(REPO / 'configs/tiny_test.py')!r})\n"
                  "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n\n\n"
                  f"def get_config(arg=None):\n  c = tiny.get_config(arg)\n  {line}\n  return c\n")
  return str(path)


def test_a_misspelt_key_in_a_recipe_file_is_refused_with_the_closest_key(tmp_path):
  with pytest.raises(cli.UsageError) as e:
    cli.load_config(_recipe(tmp_path, "c.optim.warmup_fractoin = 0.5"))
  assert str(e.value) == (f"config file {tmp_path / 'typo.py'}: config.optim.warmup_fractoin is not a config key; "
                          "did you mean config.optim.warmup_fraction?")
  with pytest.raises(cli.UsageError, match=r"config.data.batchsize is not a config key; did you mean "
                                           r"config.data.batch_size\?"):
    cli.load_config(_recipe(tmp_path, "c.data.batchsize = 4"))
  with pytest.raises(cli.UsageError, match=r"config.optimizer.lr is not a config key \(no section 'optimizer'\); "
                                           r"did you mean config.optim\?"):
    cli.load_config(_recipe(tmp_path, "c.optimizer = dict(lr=1.0)"))
  with pytest.raises(cli.UsageError, match=r"config.eval.data.shard_dri is not a config key; did you mean "
                                           r"config.eval.data.shard_dir\?"):
    cli.load_config(_recipe(tmp_path, "c.eval.data = dict(shard_dri='x')"))


def test_wrong_types_and_missing_required_keys_are_refused(tmp_path):
  with pytest.raises(cli.UsageError, match=r"config.grad_accum = 'two' has type str; the schema declares int$"):
    cli.load_config(_recipe(tmp_path, "c.grad_accum = 'two'"))
  with pytest.raises(cli.UsageError, match=r"config.record_batches = 1 has type int; the schema declares bool$"):
    cli.load_config(_recipe(tmp_path, "c.record_batches = 1"))
  with pytest.raises(cli.UsageError, match=r"config.optim.lr is required"):
    cli.load_config(_recipe(tmp_path, "del c.optim['lr']"))


def test_a_misspelt_key_on_the_command_line_is_refused_with_the_closest_key(tmp_path, capsys):
  assert cli.train_main(["--config", "configs/tiny_test.py", "--workdir", str(tmp_path / "run"),
                         "--config.optim.lerning_rate=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == ("python -m clipvip_jax.train: error: --config.optim.lerning_rate: config.optim.lerning_rate is not "
                 "a config key; did you mean config.optim.lr?")
  assert not (tmp_path / "run").exists()
  # A key the recipe leaves out but the schema declares can be set: the defaults are filled in.
  config = cli.config_from_args("configs/tiny_test.py", [("optim.schedule_steps", "12.5"), ("data.read_threads", "2")])
  assert config.optim.schedule_steps == 12.5 and config.data.read_threads == 2
  # Inside a mapping the schema passes on whole, the suggestion comes from that mapping's keys.
  with pytest.raises(cli.UsageError, match=r"config.model.clip.vision.layrs is not a config key; did you mean "
                                           r"config.model.clip.vision.layers\?"):
    cli.config_from_args("configs/tiny_test.py", [("model.clip.vision.layrs", "2")])


def test_library_configs_go_through_the_schema_too():
  config = cli.load_config("configs/tiny_test.py").to_dict()
  config["optim"]["warmup_fractoin"] = 0.5
  with pytest.raises(config_schema.SchemaError, match="did you mean config.optim.warmup_fraction"):
    trainer.as_config_dict(config)


def test_runtime_and_fixed_keys_are_declared_once():
  assert model_init.RUNTIME_KEYS is config_schema.MODEL_RUNTIME_KEYS
  assert set(config_schema.MODEL_RUNTIME_KEYS) == {"dtype", "remat", "attention", "scan_layers"}
  for key in config_schema.MODEL:
    fixed = run_config._fixed(f"model.{key}")  # pylint: disable=protected-access
    assert fixed != (key in config_schema.MODEL_RUNTIME_KEYS), key
  assert run_config._fixed("optim.frozen") and not run_config._fixed("optim.lr")  # pylint: disable=protected-access
  assert "attention_impl" not in config_schema.describe()
