"""`prefopt compare` and `prefopt runs` on a real SQLite store with runs of two methods."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from prefopt.cli import app
from prefopt.config import RunConfig
from prefopt.tracking import Tracker

# run name -> (algorithm, extra tags, [(step, eval/kl, eval/reward, eval/win_rate or None)])
RUNS = {
    "dpo-beta-0.1": ("dpo", {}, [(0, 0, .2, .5), (10, 1, .5, .6), (20, 2, .7, .7), (30, 4, .8, .75)]),
    "dpo-beta-1": ("dpo", {}, [(0, 0, .2, None), (10, .5, .4, None), (20, 1, .55, None)]),
    "ppo-kl-6": ("sft", {"algorithm": "ppo"}, [(0, 0, .2, None), (10, 2, .45, None),
                                                (20, 5, .66, None)]),
}
# Worked by hand. Largest KL both methods reach: min(4, 5) = 4. Frontiers at KL 4:
# dpo-beta-0.1 .8 (its vertex); dpo-beta-1 .55 (flat after KL 1);
# ppo (0,.2)-(2,.45)-(5,.66) is concave, so .45 + .21 * 2/3 = .59.
EXPECTED = {  # best reward, KL at best, reward at KL 4, win rate
    "dpo-beta-0.1": (.8, 4, .8, .75),
    "dpo-beta-1": (.55, 1, .55, None),
    "ppo-kl-6": (.66, 5, .59, None),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    ids = {}
    for name, (algorithm, tags, evals) in RUNS.items():
        cfg = RunConfig.model_validate({
            "output_dir": str(project / "runs" / name),
            "algorithm": {"name": algorithm, "beta": 0.1 if name == "dpo-beta-0.1" else None},
            "tracking": {"experiment": "sweep", "run_name": name},
        })
        with Tracker.start(cfg, tags=tags) as tracker:
            tracker.log_config()
            for step, kl, reward, win in evals:
                tracker.log_metrics({"loss": 0.69, "eval/kl": kl, "eval/reward": reward,
                                     "eval/win_rate": win}, step=step)
        ids[name] = tracker.run_id
    # A run that never evaluated is left out of the comparison.
    with Tracker.start(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
            update={"run_name": "no-eval"})})) as tracker:
        tracker.log_metrics({"loss": 0.69}, step=1)
    return project, tracker.tracking_uri, ids


def invoke(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_compare_writes_png_and_a_table_whose_rows_are_the_runs(store, tmp_path):
    from matplotlib.image import imread
    from mlflow import MlflowClient

    project, uri, ids = store
    out = tmp_path / "out"
    result = invoke("compare", "--experiment", "sweep", "--tracking-uri", uri, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "no-eval" in result.output  # named as left out

    with open(out / "comparison.csv", newline="") as f:
        rows = {r["run_name"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(RUNS)
    for name, (best, kl_at_best, at_matched, win) in EXPECTED.items():
        row = rows[name]
        assert row["run_id"] == ids[name]
        assert row["method"] == ("ppo-gt" if name.startswith("ppo") else "dpo")
        assert float(row["matched_kl"]) == 4
        assert float(row["best_reward"]) == pytest.approx(best)
        assert float(row["kl_at_best"]) == pytest.approx(kl_at_best)
        assert float(row["reward_at_matched_kl"]) == pytest.approx(at_matched)
        assert row["win_rate"] == ("" if win is None else str(win))
        assert int(row["num_evals"]) == len(RUNS[name][2])
    assert rows["dpo-beta-0.1"]["params"] == "beta=0.1" and rows["ppo-kl-6"]["params"] == ""
    markdown = (out / "comparison.md").read_text()
    assert markdown.count("\n| dpo | dpo-") == 2 and markdown.count("\n| ppo-gt | ppo-") == 1
    assert "dpo 0.8, ppo-gt 0.59" in markdown

    png = out / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[:2] == (825, 1200)  # 8 x 5.5 inches at 150 dpi

    # The plot and the table are logged into a comparison run of the same experiment.
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweep")
    comparisons = [r for r in client.search_runs([experiment.experiment_id])
                   if r.data.tags.get("prefopt.comparison") == "true"]
    assert len(comparisons) >= 1
    latest = max(comparisons, key=lambda r: r.info.start_time)
    assert {f.path for f in client.list_artifacts(latest.info.run_id)} == {
        "frontier.png", "comparison.csv", "comparison.md"}
    assert latest.data.metrics["matched_kl"] == 4
    assert latest.data.metrics["frontier_at_matched_kl/ppo-gt"] == pytest.approx(.59)
    assert latest.info.status == "FINISHED"

    # Comparing again ignores the comparison runs themselves.
    again = invoke("compare", "-e", "sweep", "--tracking-uri", uri, "--out", str(tmp_path / "2"),
                   "--at-kl", "1")
    assert again.exit_code == 0, again.output
    with open(tmp_path / "2" / "comparison.csv", newline="") as f:
        rows = {r["run_name"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(RUNS)
    assert float(rows["dpo-beta-0.1"]["reward_at_matched_kl"]) == pytest.approx(.5)
    assert float(rows["ppo-kl-6"]["reward_at_matched_kl"]) == pytest.approx(.2 + .25 / 2)


def test_compare_default_output_and_store(store, monkeypatch):
    """Without options, compare reads runs/mlflow.db and writes to runs/compare/<experiment>."""
    project, uri, _ = store
    monkeypatch.chdir(project)
    result = invoke("compare", "-e", "sweep")
    assert result.exit_code == 0, result.output
    assert (project / "runs" / "compare" / "sweep" / "frontier.png").is_file()


def test_runs_lists_the_experiment(store, monkeypatch):
    from prefopt.tracking import cli

    monkeypatch.setattr(cli.console, "width", 200)  # a wide terminal: nothing folded
    _, uri, ids = store
    result = invoke("runs", "--experiment", "sweep", "--tracking-uri", uri, "--limit", "50")
    assert result.exit_code == 0, result.output
    for name, run_id in ids.items():
        assert name in result.output and run_id[:8] in result.output
    assert "compare-" in result.output and "no-eval" in result.output


def test_clear_errors(store, tmp_path):
    _, uri, _ = store
    result = invoke("compare", "-e", "nope", "--tracking-uri", uri)
    assert result.exit_code == 2
    assert "no experiment 'nope'" in result.output and "sweep" in result.output
    missing = f"sqlite:///{tmp_path}/none.db"
    result = invoke("runs", "--tracking-uri", missing)
    assert result.exit_code == 2 and "no MLflow store at" in result.output
    assert not (tmp_path / "none.db").exists()
    result = invoke("compare", "-e", "sweep", "--tracking-uri", uri, "--x", "eval/missing")
    assert result.exit_code == 2 and "has both eval/missing and eval/reward" in result.output


def _run(project, experiment: str, name: str, tree: dict, tags: dict, evals, *, limits: dict | None = None) -> str:
    """A finished run with evaluations [(step, kl, kl_se, reward, reward_se)] and its tags."""
    cfg = RunConfig.model_validate({"output_dir": str(project / "runs" / name),
                                    "tracking": {"experiment": experiment, "run_name": name}} | tree)
    with Tracker.start(cfg, tags=tags) as tracker:
        tracker.log_config()
        for step, kl, kl_se, reward, reward_se in evals:
            tracker.log_metrics({"eval/kl": kl, "eval/kl_se": kl_se, "eval/reward": reward,
                                 "eval/reward_se": reward_se}, step=step)
        if limits is not None:
            tracker.log_dict(limits, "limits.json")
            tracker.set_tags({"eval.limits": 16})
    return tracker.run_id


def test_compare_keeps_one_evaluation_names_ppo_by_its_reward_and_flags_points_above_the_optimum(tmp_path):
    """Runs evaluated two ways are not drawn on one plane (one line names the others); PPO on the
    task's truth and PPO on a reward model are two series; an evaluation above the optimum by more
    than its errors is flagged."""
    ppo = {"algorithm": {"name": "ppo"}, "data": {"task": "imdb_sentiment", "format": "prompt_only"}}
    alike, other = {"eval.fingerprint": "aaaa1111"}, {"eval.fingerprint": "bbbb2222"}
    point = {"kl": 0.0, "kl_se": 0.0, "reward_se": 0.001, "label": "", "ess": None, "reliable": True}
    limits = {"best_of_n": [point | {"kl": 0.0, "reward": 0.2}, point | {"kl": 3.0, "reward": 0.5}],
              "optimum": [point | {"kl": 0.0, "reward": 0.2}, point | {"kl": 4.0, "reward": 0.6}]}
    _run(tmp_path, "cmp", "gt", ppo, alike, [(0, 0, 0, .2, .01), (10, 2, .1, .4, .01), (20, 4, .1, .5, .01)],
         limits=limits)
    _run(tmp_path, "cmp", "rm", ppo | {"reward": {"source": "model", "model_path": str(tmp_path)}}, alike,
         [(0, 0, 0, .2, .01), (10, 2, .1, .7, .01)])  # at KL 2 the optimum is .4: .7 is far above it
    _run(tmp_path, "cmp", "longer-eval", ppo, other, [(0, 0, 0, .3, .01), (10, 1, .1, .9, .01)])
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    result = CliRunner().invoke(app, ["compare", "-e", "cmp", "--tracking-uri", uri, "--out", str(tmp_path / "o"),
                                      "--kl-levels", "1,2"], catch_exceptions=False, terminal_width=250)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 run(s) were evaluated differently" in text and "bbbb2222: longer-eval" in text
    with open(tmp_path / "o" / "comparison.csv", newline="") as f:
        rows = {r["run_name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"gt", "rm"}
    assert rows["gt"]["method"] == "ppo-gt" and rows["rm"]["method"] == "ppo-rm"
    markdown = (tmp_path / "o" / "comparison.md").read_text()
    # The matched-KL table: each method ± its evaluation error, the limits, the difference.
    assert "| ppo-gt | 0.300 ± 0.007 (eval) | 0.400 ± 0.010 (eval) |" in markdown
    assert "| optimum | 0.300 ± 0.001 (limit) | 0.400 ± 0.001 (limit) |" in markdown
    assert "ppo-gt − ppo-rm at kl=2: -0.300 ± 0.014" in markdown
    assert "ABOVE THE OPTIMUM: rm at step 10: reward 0.700 at KL 2.000, the optimum's 0.400" in text
    assert "ABOVE THE OPTIMUM: gt" not in text
