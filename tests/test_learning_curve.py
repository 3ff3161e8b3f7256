"""bench/learning_curve.py's pure helpers: cumulative stage offsets, training time, losses, points, table.

No weights, no JAX work: metrics.jsonl lines and points are plain dicts.
"""

import pytest

from bench import learning_curve as curve
from e2llm_jax import config_utils


def test_stage_offsets_sum_the_stages_before():
  offsets = curve.stage_offsets([400, 250, 100], [4, 2, 8], [1200.0, 900.0, 30.0])
  assert offsets == [(0, 0, 0.0), (400, 1600, 1200.0), (650, 2100, 2100.0)]
  # An unknown training time stays unknown for every later stage.
  assert curve.stage_offsets([10, 10, 10], [1, 1, 1], [None, 5.0, 5.0]) == [
      (0, 0, 0.0), (10, 10, None), (20, 20, None)]


def test_training_seconds_skips_the_gap_before_a_resume():
  records = [{"step": 5, "steps_per_s": 0.5, "time": 100.0},
             {"step": 10, "steps_per_s": 1.0, "time": 105.0},
             # resumed an hour later: the first interval after it is its own (5 steps at 0.25/s)
             {"step": 15, "steps_per_s": 0.25, "time": 3725.0}]
  assert curve.training_seconds(records) == [(0, 0.0), (5, 10.0), (10, 15.0), (15, 35.0)]
  without_rate = [{"step": 5, "steps_per_s": 1.0, "time": 50.0}, {"step": 10, "time": 53.0}]
  assert curve.training_seconds(without_rate) == [(0, 0.0), (5, 5.0), (10, 8.0)]
  assert curve.training_seconds([{"step": 5}]) == []


def test_value_at_interpolates_and_holds_past_the_ends():
  points = [(0, 0.0), (10, 20.0), (20, 30.0)]
  assert curve.value_at(points, 5) == 10.0
  assert curve.value_at(points, 20) == 30.0
  assert curve.value_at(points, 50) == 30.0
  assert curve.value_at([], 5) is None


def test_mean_near_averages_the_window_before_the_step():
  records = [{"step": s, "recon_loss": float(s), "ift_loss": None} for s in (5, 10, 15, 20, 25)]
  assert curve.mean_near(records, "recon_loss", 20, 10) == 17.5  # steps 15 and 20
  assert curve.mean_near(records, "ift_loss", 20, 10) is None
  assert curve.mean_near(records, "recon_loss", 2, 1) is None


def test_select_points_by_cumulative_step():
  stage_steps, offsets = [[50, 100], [50, 100]], [0, 100]
  assert curve.select_points(stage_steps, offsets, "all") == [
      (0, 50, 50), (0, 100, 100), (1, 50, 150), (1, 100, 200)]
  assert curve.select_points(stage_steps, offsets, "200,50") == [(0, 50, 50), (1, 100, 200)]
  with pytest.raises(SystemExit, match=r"cumulative steps \[120\].*\[50, 100, 150, 200\]"):
    curve.select_points(stage_steps, offsets, "50,120")


def test_markdown_table_has_a_line_per_point_and_baseline():
  columns = ["niah_single_1@4096", "qa_1@4096"]
  point = {"cumulative_step": 450, "stage": 2, "step": 50, "examples": 1800, "wall_min": 31.25,
           "recon_loss": 1.23456, "ift_loss": None,
           "scores": {"niah_single_1@4096": 50.0, "qa_1@4096": 25.0}, "mean": 37.5}
  baseline = {"method": "none", "scores": {"niah_single_1@4096": 0.0}, "mean": 0.0}
  lines = curve.markdown_table(columns, [point], [baseline]).splitlines()
  assert lines[0] == ("| step | stage:step | examples | wall min | recon | ift | niah_single_1@4096 | "
                      "qa_1@4096 | mean |")
  assert lines[2] == "| 450 | 2:50 | 1800 | 31.2 | 1.235 | – | 50.00 | 25.00 | 37.50 |"
  assert lines[3] == "| none (baseline) |  |  |  |  |  | 0.00 | – | 0.00 |"
  assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_smoothed_is_debiased_and_constant_on_a_constant():
  assert curve.smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
  assert curve.smoothed([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])


def test_shared_model_keys_exist_in_the_base_config():
  config = config_utils.base_config()
  for key in curve.SHARED_MODEL_KEYS:
    config_utils.get_path(config, key)  # a renamed key fails here, not after an hour of scoring


def test_logged_steps_skips_a_line_still_being_written(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 5, "ift_loss": 1.0}\n{"note": "no step"}\n{"step": 10, "ift_lo')
  assert curve.logged_steps(path) == [{"step": 5, "ift_loss": 1.0}]
  assert curve.logged_steps(tmp_path / "absent.jsonl") == []
