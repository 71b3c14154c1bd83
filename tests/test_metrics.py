"""Retrieval metrics: hand-computed rankings, the originals' tie rule, multi-caption and DSL."""

import jax.numpy as jnp
import numpy as np
import pytest

from clipvip_jax import losses
from clipvip_jax.metrics import dual_softmax_host, retrieval_metrics, with_dual_softmax


def _sorted_position_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """The originals' rule, spelled out: sort each row of -scores and keep every position equal to -target."""
  _, positions = np.nonzero(np.sort(-scores, axis=1) == -targets[:, None])
  return positions


def _stats(ranks: np.ndarray) -> dict[str, float]:
  return {"R@1": 100 * np.mean(ranks < 1), "R@5": 100 * np.mean(ranks < 5), "R@10": 100 * np.mean(ranks < 10),
          "MdR": np.median(ranks) + 1, "MnR": np.mean(ranks) + 1}


def _reference_metrics(sim: np.ndarray, text_to_video: np.ndarray | None) -> dict[str, float]:
  """By the sort-based definition: t2v on the rows; v2t on the max over each video's captions."""
  if text_to_video is None:
    text_to_video = np.arange(sim.shape[0])
  t2v = _sorted_position_ranks(sim, sim[np.arange(sim.shape[0]), text_to_video])
  per_set = np.stack([sim[text_to_video == g].max(axis=0) for g in range(sim.shape[1])])  # [set, video]
  v2t = _sorted_position_ranks(per_set.T, np.diag(per_set))
  return {f"{d}/{k}": v for d, ranks in (("t2v", t2v), ("v2t", v2t)) for k, v in _stats(ranks).items()}


def _assert_metrics(got: dict[str, float], want: dict[str, float]) -> None:
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_single_caption_hand_computed():
  sim = np.array([[0.9, 0.1, 0.2],
                  [0.8, 0.7, 0.1],   # correct 0.7, one better (0.8): rank 1
                  [0.3, 0.6, 0.5]])  # correct 0.5, one better (0.6): rank 1
  # Columns: video 0 [0.9, 0.8, 0.3], video 1 [0.1, 0.7, 0.6], video 2 [0.2, 0.1, 0.5]: all rank 0.
  got = retrieval_metrics(sim)
  assert all(type(value) is float for value in got.values())  # plain floats, ready for logging
  _assert_metrics(got, {
      "t2v/R@1": 100 / 3, "t2v/R@5": 100.0, "t2v/R@10": 100.0, "t2v/MdR": 2.0, "t2v/MnR": 1 + 2 / 3,
      "v2t/R@1": 100.0, "v2t/R@5": 100.0, "v2t/R@10": 100.0, "v2t/MdR": 1.0, "v2t/MnR": 1.0})


def test_recall_cut_offs_and_median_of_even_count():
  # 12 candidates; text i has its correct video beaten by exactly `better[i]` others.
  better = np.array([0, 4, 5, 9, 10, 11])
  sim = np.zeros((6, 12))
  for i, count in enumerate(better):
    sim[i, :count] = 2.0  # `count` strictly better videos, and the correct one, video 11
    sim[i, 11] = 1.0
  labels = np.full(6, 11)
  # t2v is all this test checks; every video needs a caption for v2t, so add one per video.
  sim = np.vstack([sim, np.eye(12)])
  labels = np.concatenate([labels, np.arange(12)])
  got = retrieval_metrics(sim, labels)
  ranks = np.concatenate([better, np.zeros(12, int)])
  assert got["t2v/R@1"] == pytest.approx(100 * 13 / 18)
  assert got["t2v/R@5"] == pytest.approx(100 * 14 / 18)   # ranks 0 and 4
  assert got["t2v/R@10"] == pytest.approx(100 * 16 / 18)  # + ranks 5 and 9
  assert got["t2v/MdR"] == np.median(ranks) + 1
  assert got["t2v/MnR"] == pytest.approx(ranks.mean() + 1)
  even = retrieval_metrics(np.array([[3.0, 0, 0, 0],
                                     [4.0, 3, 0, 0],    # rank 1
                                     [0.0, 0, 3, 0],
                                     [0.0, 4, 0, 3]]))  # rank 1
  assert even["t2v/MdR"] == 1.5  # ranks [0, 1, 0, 1]: median 0.5, + 1


def test_ties_follow_the_originals_sorted_position_rule():
  sim = np.array([[0.5, 0.5, 0.1],   # correct video 0 ties with video 1: pooled ranks 0 and 1
                  [0.2, 0.9, 0.1],   # rank 0
                  [0.7, 0.7, 0.7]])  # three-way tie: ranks 0, 1, 2
  got = retrieval_metrics(sim)
  pooled = np.array([0, 1, 0, 0, 1, 2])
  assert got["t2v/R@1"] == pytest.approx(100 * 3 / 6)
  assert got["t2v/MdR"] == np.median(pooled) + 1 == 1.5
  assert got["t2v/MnR"] == pytest.approx(pooled.mean() + 1)
  _assert_metrics(got, _reference_metrics(sim, None))

  optimistic = retrieval_metrics(sim, ties="optimistic")  # one rank per query: strictly greater count
  assert optimistic["t2v/R@1"] == 100.0 and optimistic["t2v/MnR"] == 1.0
  pessimistic = retrieval_metrics(sim, ties="pessimistic")  # ranks [1, 0, 2]
  assert pessimistic["t2v/R@1"] == pytest.approx(100 / 3)
  assert pessimistic["t2v/MdR"] == 2.0 and pessimistic["t2v/MnR"] == pytest.approx(2.0)


def test_multi_caption_hand_computed():
  text_to_video = np.array([0, 0, 1, 2, 2])
  sim = np.array([[0.9, 0.2, 0.1],    # video 0: rank 0
                  [0.3, 0.4, 0.2],    # video 0: 0.4 better, rank 1
                  [0.1, 0.5, 0.6],    # video 1: 0.6 better, rank 1
                  [0.2, 0.1, 0.55],   # video 2: rank 0
                  [0.8, 0.3, 0.4]])   # video 2: 0.8 better, rank 1
  # v2t scores each video against each caption set by the max over the set:
  # set 0 = [0.9, 0.4, 0.2], set 1 = [0.1, 0.5, 0.6], set 2 = [0.8, 0.3, 0.55].
  # Video 0 column [0.9, 0.1, 0.8]: rank 0; video 1 [0.4, 0.5, 0.3]: 0; video 2 [0.2, 0.6, 0.55]: 1.
  _assert_metrics(retrieval_metrics(sim, text_to_video), {
      "t2v/R@1": 40.0, "t2v/R@5": 100.0, "t2v/R@10": 100.0, "t2v/MdR": 2.0, "t2v/MnR": 1.6,
      "v2t/R@1": 200 / 3, "v2t/R@5": 100.0, "v2t/R@10": 100.0, "v2t/MdR": 1.0, "v2t/MnR": 4 / 3})
  # Caption order does not matter.
  order = np.array([4, 2, 0, 3, 1])
  _assert_metrics(retrieval_metrics(sim[order], text_to_video[order]), retrieval_metrics(sim, text_to_video))


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_matches_sort_definition_with_many_ties_and_any_chunk(multi):
  rng = np.random.default_rng(0)
  n_video = 37
  text_to_video = np.concatenate([np.arange(n_video), rng.integers(0, n_video, 50)]) if multi else None
  n_text = n_video if text_to_video is None else text_to_video.size
  sim = rng.integers(0, 6, size=(n_text, n_video)).astype(np.float32) / 5  # many exact ties
  want = _reference_metrics(sim, text_to_video)
  for chunk_size in (1, 7, 1024):
    _assert_metrics(retrieval_metrics(sim, text_to_video, chunk_size=chunk_size), want)


def test_one_caption_per_video_as_multi_equals_single():
  rng = np.random.default_rng(1)
  sim = rng.normal(size=(20, 20))
  _assert_metrics(retrieval_metrics(sim, np.arange(20)), retrieval_metrics(sim))


def test_dual_softmax_host_matches_original_and_device_version(fixtures_dir):
  data = np.load(fixtures_dir / "clipvip_losses.npz")
  sim = data["subtitle"] @ data["video"].T
  np.testing.assert_allclose(dual_softmax_host(sim, chunk_size=4), data["dsl_sim"], rtol=1e-5, atol=1e-7)
  rng = np.random.default_rng(2)
  sim = np.tanh(rng.normal(size=(9, 5))).astype(np.float32)
  np.testing.assert_allclose(dual_softmax_host(sim, chunk_size=2), losses.dual_softmax(jnp.asarray(sim)),
                             rtol=1e-5, atol=1e-7)


def test_with_dual_softmax_reports_both():
  rng = np.random.default_rng(3)
  sim = np.tanh(rng.normal(size=(12, 12))).astype(np.float32)
  both = with_dual_softmax(sim)
  assert {k: v for k, v in both.items() if not k.startswith("dsl_")} == retrieval_metrics(sim)
  assert {k[4:]: v for k, v in both.items() if k.startswith("dsl_")} == retrieval_metrics(dual_softmax_host(sim))


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match="non-square matrix needs text_to_video"):
    retrieval_metrics(np.zeros((3, 2)))
  with pytest.raises(ValueError, match="outside"):
    retrieval_metrics(np.zeros((3, 2)), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="have no text"):
    retrieval_metrics(np.zeros((3, 3)), np.array([0, 0, 1]))
  with pytest.raises(ValueError, match="3 integer video indices"):
    retrieval_metrics(np.zeros((3, 3)), np.array([0.0, 1.0, 2.0]))
  with pytest.raises(ValueError, match="NaN"):
    retrieval_metrics(np.array([[1.0, np.nan], [0.0, 1.0]]))
  with pytest.raises(ValueError, match="ties must be one of"):
    retrieval_metrics(np.eye(2), ties="random")
