"""The one loader (clipvip_jax.loading) for every checkpoint form, and the one kind registry (clipvip_jax.kinds).

Each form is read three ways: `clipvip_jax.load_checkpoint` (the loader itself), `clipvip_jax.load_pretrained`
(the public model API) and the trainer's `--config.init.checkpoint` (model_init.init_model on the tiny_test
config, as `python -m clipvip_jax.train` runs it). No test here compiles more than one small program.
"""

import ast
import pathlib
import re

import jax
import numpy as np
import pytest

import clipvip_jax
from clipvip_jax import kinds, loading
from clipvip_jax.convert.common import Converted
from clipvip_jax.params import flat_params
from clipvip_jax.train import cli, model_init, sharding

import retrieval_helpers as rh

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKDIR_STEPS = {1: 1.0, 2: 9.0, 3: 4.0}  # step -> validation metric: best is 2, latest is 3


def _tiny_config(kind: str, checkpoint: str = "", config: str = ""):
  """configs/tiny_test.py:KIND with the init overrides given as on the train command line."""
  overrides = [("init.checkpoint", checkpoint)] + ([("init.config", config)] if config else [])
  return cli.config_from_args(f"configs/tiny_test.py:{kind}", overrides)


def _step_params(base: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
  return {**base, "logit_scale": np.full_like(base["logit_scale"], float(step))}


@pytest.fixture(scope="module")
def clip_params():
  """The tiny_test CLIP towers (what its meanP model has) with random weights."""
  cfg = model_init.model_config(_tiny_config("meanp").model)
  return cfg, rh.random_params("clip", cfg)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, clip_params):
  """The same CLIP weights as a converted dir, an HF directory and a training workdir of three steps."""
  from clipvip_jax import converted_checkpoint
  from clipvip_jax.converted_checkpoint import nest
  from clipvip_jax.convert.export_hf import export_hf
  from clipvip_jax.train.checkpoint import Checkpointer
  cfg, params = clip_params
  root = tmp_path_factory.mktemp("sources")
  converted = Converted("clip", cfg, params, source="random")
  converted_checkpoint.save_converted(converted, root / "converted")
  export_hf(converted, root / "hf")
  ckpt = Checkpointer(root / "run", keep=3, best_metric="val/t2v/R@1", async_save=False)
  for step, metric in WORKDIR_STEPS.items():
    ckpt.save(step, nest(_step_params(params, step)), {"count": np.zeros((), np.int32)}, "{}",
              {"kind": "meanp", "model": cfg.to_dict()}, {"data": {"num_frames": 3}},
              {"val/t2v/R@1": metric})
  ckpt.close()
  return root


def _assert_params(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)


# ---- the loader: one test per form ----


@pytest.mark.parametrize("name, origin, kind", [("converted", "converted", "clip"), ("hf", "hf_dir", "clip")])
def test_converted_and_hf_directories(sources, clip_params, name, origin, kind):
  loaded = clipvip_jax.load_checkpoint(sources / name)
  assert (loaded.kind, loaded.origin, loaded.step, loaded.config) == (kind, origin, None, clip_params[0])
  _assert_params(loaded.params, clip_params[1])


@pytest.mark.parametrize("step, expected", [(None, 3), ("latest", 3), ("best", 2), (1, 1), ("1", 1)])
def test_workdir_steps(sources, clip_params, step, expected):
  loaded = clipvip_jax.load_checkpoint(sources / "run", step=step)
  assert (loaded.kind, loaded.origin, loaded.step) == ("meanp", "workdir", expected)
  assert loaded.config == clip_params[0] and loaded.run_config == {"data": {"num_frames": 3}}
  _assert_params(loaded.params, _step_params(clip_params[1], expected))


@pytest.mark.parametrize("name, kind, layout", [("clipvip_tiny", "clipvip", "clipvip"),
                                                ("clip2video_tiny", "clip2video", "clip2video")])
def test_original_pytorch_files(fixtures_dir, name, kind, layout):
  loaded = clipvip_jax.load_checkpoint(fixtures_dir / f"{name}.pt", fixtures_dir / f"{name}_config.json")
  assert (loaded.kind, loaded.origin, loaded.source_format) == (kind, "file", layout)
  assert sorted(loaded.params) == sorted(kinds.param_shapes(kind, loaded.config))
  import torch
  state = torch.load(fixtures_dir / f"{name}.pt", map_location="cpu", weights_only=True)
  state = state.get("state_dict", state)
  ours, theirs = (next(k for k in d if k.endswith("logit_scale")) for d in (loaded.params, state))
  np.testing.assert_array_equal(loaded.params[ours], state[theirs].float().numpy())  # a value copied as is


@pytest.mark.parametrize("make, options, message", [
    (lambda root: root / "missing", {}, "does not exist"),
    (lambda root: root, {}, "is neither a converted checkpoint"),
    (lambda root: root / "converted", {"config": {"a": 1}}, "already carries its model config"),
    (lambda root: root / "run", {"config": {"a": 1}}, "already carries its model config"),
    (lambda root: root / "converted", {"step": 2}, "a step applies to training workdirs"),
    (lambda root: root / "run", {"format": "hf_clip"}, "a format applies to original checkpoint files"),
    (lambda root: root / "run", {"step": 7}, "has no checkpoint of step 7"),
    (lambda root: root / "converted", {"config": "/no/cfg.json"}, "config file /no/cfg.json does not exist"),
])
def test_options_that_do_not_apply_are_one_sentence(sources, make, options, message):
  with pytest.raises((ValueError, OSError), match=re.escape(message)):
    loading.load_checkpoint(make(sources), **options)


def test_a_workdir_without_a_finished_step(tmp_path):
  (tmp_path / "run" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(loading.CheckpointError, match="without a finished checkpoint yet"):
    loading.load_checkpoint(tmp_path / "run")


# ---- the public API ----


@pytest.mark.parametrize("name, step, expected", [("converted", None, None), ("hf", None, None),
                                                  ("run", None, 3), ("run", "best", 2), ("run", 1, 1)])
def test_load_pretrained_reads_every_form(sources, clip_params, name, step, expected):
  model = clipvip_jax.load_pretrained(sources / name, step=step)
  want = clip_params[1] if expected is None else _step_params(clip_params[1], expected)
  _assert_params(flat_params(model.model), want)
  assert model.kind == ("clip" if expected is None else "meanp")


def test_a_meanp_workdir_is_a_video_model(sources):
  model = clipvip_jax.load_pretrained(sources / "run")
  video = np.random.default_rng(0).normal(size=(1, 3, 32, 32, 3)).astype(np.float32)
  forward = model.encode_video(video)
  backward = model.encode_video(video[:, ::-1])
  np.testing.assert_allclose(np.asarray(forward), np.asarray(backward), atol=1e-5)  # meanP ignores order


# ---- train --config.init.checkpoint ----


def _init(config):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  ms = model_init.init_model(config, mesh, tuple(tuple(r) for r in config.sharding_rules))
  return ms, {k: np.asarray(v) for k, v in flat_params(ms.model()).items()}


@pytest.mark.parametrize("name, expected", [("converted", None), ("hf", None), ("run", 3)])
def test_train_init_from_our_own_forms(sources, clip_params, name, expected):
  ms, got = _init(_tiny_config("meanp", str(sources / name)))
  assert ms.kind == "meanp" and ms.source == str(sources / name)
  _assert_params(got, clip_params[1] if expected is None else _step_params(clip_params[1], expected))


@pytest.mark.parametrize("name, kind", [("clipvip_tiny", "clipvip"), ("clip2video_tiny", "clip2video")])
def test_train_init_from_original_files(fixtures_dir, name, kind):
  path, config = fixtures_dir / f"{name}.pt", fixtures_dir / f"{name}_config.json"
  loaded = loading.load_checkpoint(path, config)
  ms, got = _init(_tiny_config(kind, str(path), str(config)))
  assert ms.kind == kind and ms.config == loaded.config
  _assert_params(got, loaded.params)


def test_train_init_refuses_a_kind_that_cannot_start_it(sources, fixtures_dir):
  config = _tiny_config("meanp", str(fixtures_dir / "clipvip_tiny.pt"), str(fixtures_dir / "clipvip_tiny_config.json"))
  with pytest.raises(ValueError, match="holds a 'clipvip' model, which cannot initialise a 'meanp' model"):
    _init(config)


@pytest.mark.slow
def test_the_train_command_starts_from_a_training_workdir(sources, clip_params, tmp_path_factory, capsys):
  """python -m clipvip_jax.train --config.init.checkpoint=WORKDIR: one step at a learning rate of ~0 keeps the
  parameters the loader read (the workdir's latest step) in the new run's checkpoint."""
  from conftest import synthetic_shards
  shards = synthetic_shards(tmp_path_factory, num_clips=24, seed=2)
  out = tmp_path_factory.mktemp("train") / "run"
  assert cli.train_main(["--config", "configs/tiny_test.py:meanp", "--workdir", str(out),
                         f"--config.init.checkpoint={sources / 'run'}", f"--config.data.shard_dir={shards}",
                         "--config.total_steps=1", "--config.eval.split=", "--config.optim.lr=1e-12",
                         "--config.optim.lr_floor=0.0"]) == 0, capsys.readouterr().err
  trained = loading.load_checkpoint(out)
  assert (trained.kind, trained.step) == ("meanp", 1)
  want = _step_params(clip_params[1], 3)
  for k, v in want.items():
    np.testing.assert_allclose(trained.params[k], v, atol=1e-6, err_msg=k)


# ---- the kind registry is the one source ----


def _is_kind_name(node) -> bool:
  return isinstance(node, ast.Constant) and node.value in kinds.KINDS


def _kind_list(node) -> bool:
  """A hand-written tuple/list/set of two or more kind names."""
  return (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2
          and all(_is_kind_name(e) for e in node.elts))


def _kind_special_cases(source: str) -> list[str]:
  """Code (docstrings and comments aside) that compares something named *kind* with a kind name, or that lists
  kinds by hand. A loop over kinds named by hand (the demo's choice of models) is not a special case."""
  tree = ast.parse(source)
  iterated = {id(n.iter) for n in ast.walk(tree) if isinstance(n, (ast.For, ast.comprehension))}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      operands = [node.left, *node.comparators]
      names = [o for o in operands if _is_kind_name(o) or _kind_list(o)]
      if names and any("kind" in ast.unparse(o).lower() for o in operands if o not in names):
        found.append(ast.unparse(node))
    elif _kind_list(node) and id(node) not in iterated:
      found.append(ast.unparse(node))
  return found


def test_the_check_finds_special_cases():
  for code in ('if kind == "meanp": pass', "ok = src_kind != 'clip'", 'ok = "meanp" == ms.kind',
               'ok = model.kind in ("clip", "meanp")', 'KINDS = ("clip", "meanp")', 'D = {"onnx": ["clip", "meanp"]}'):
    assert _kind_special_cases(code), code
  for code in ('ok = mode == "clip2video"', 'ok = kind == "file"', '"""kind "clip" or ("clip", "meanp")"""',
               'm = [k for k in ("clipvip", "meanp")]', 'ok = kind in KINDS'):
    assert not _kind_special_cases(code), code


def test_no_kind_is_special_cased_outside_the_registry():
  """Recipes (configs, a recipes/ folder) are exempt: a recipe names the kind it trains and that kind's options."""
  found = {}
  for path in sorted((REPO / "clipvip_jax").rglob("*.py")):
    if path == REPO / "clipvip_jax" / "kinds.py" or "recipes" in path.relative_to(REPO).parts:
      continue
    hits = _kind_special_cases(path.read_text(encoding="utf-8"))
    if hits:
      found[str(path.relative_to(REPO))] = hits
  assert found == {}


def test_kind_tables_derive_from_the_registry():
  from clipvip_jax import demo
  from clipvip_jax.convert import export_hf
  from clipvip_jax.export import spec, writer
  from clipvip_jax.retrieval.model import default_recipe
  from clipvip_jax.train import model_flops
  assert spec.EXPORTABLE_KINDS == tuple(kinds.KINDS)
  assert writer.DYNAMIC_FRAME_KINDS == {f: kinds.dynamic_frame_kinds(f) for f in ("onnx", "stablehlo")}
  assert "meanp" in writer.DYNAMIC_FRAME_KINDS["onnx"] and "clipvip" not in writer.DYNAMIC_FRAME_KINDS["onnx"]
  assert model_init.TRAINABLE_KINDS == kinds.TRAINABLE_KINDS == ("meanp", "clipvip", "clip2video")
  assert export_hf.EXPORTABLE_KINDS == ("clip", "clipvip")
  assert [title for _, title in demo.MODELS] == [kinds.get("clipvip").title, kinds.get("meanp").title]
  data = {"batch_size": 2, "num_frames": 3, "max_text_len": 16}
  flops = {}
  for kind in kinds.TRAINABLE_KINDS:
    config = _tiny_config(kind)
    cfg = model_init.model_config(config.model)
    assert isinstance(cfg, kinds.config_class(kind))
    flops[kind] = model_flops.train_step_flops("nce", kind, cfg, data)
    recipe = default_recipe(kind, cfg)
    assert (recipe.sampling, recipe.resize_mode) == kinds.recipe_values(kind, cfg)[1:3]
    assert kinds.max_frames(kind, cfg) == getattr(cfg, "frame_positions", None)  # only clip2video has a table
  assert len(set(flops.values())) == 3 and all(f > 0 for f in flops.values())  # each kind its own count
  with pytest.raises(ValueError, match="not trained"):
    model_flops.train_step_flops("nce", "clip", None, data)


def test_every_kind_resolves_and_meanp_shares_clips_parameters(clip_params):
  cfg, _ = clip_params
  for name, kind in kinds.KINDS.items():
    assert kinds.model_class(name).__name__ and kinds.config_class(name).from_dict
    for ref in (kind.train_flops, kind.from_base, kind.hf_export):
      if ref:
        assert callable(kinds.resolve(ref)), ref
  assert kinds.param_shapes("meanp", cfg) == kinds.param_shapes("clip", cfg)
  assert kinds.init_route("clip", "meanp") == kinds.init_route("meanp", "clip") == "same"
  assert kinds.init_route("clip", "clipvip") == "base" and kinds.init_route("clipvip", "clip2video") is None
  assert kinds.video_kind("clip") == "meanp" and kinds.video_kind("clipvip") == "clipvip"
  with pytest.raises(ValueError, match="no options of its own"):
    kinds.config_for_clip("meanp", cfg, {"num_proxies": 2})

