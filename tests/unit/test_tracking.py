"""Tracking pieces that need no MLflow store: URIs, params, tags, report files."""

from __future__ import annotations

import csv
import json

import pytest

from prefopt.config import RunConfig
from prefopt.tracking.store import (
    artifact_root,
    resolve_tracking_uri,
    slug,
    sqlite_file,
    tracking_uri_source,
    ui_hint,
)


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    """The tests below decide MLFLOW_TRACKING_URI themselves, whatever the shell has."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def cfg(**tree) -> RunConfig:
    return RunConfig.model_validate(tree)


def test_default_uri_is_one_sqlite_file_beside_the_output_dirs(tmp_path):
    a = resolve_tracking_uri(cfg(output_dir=str(tmp_path / "runs" / "a")))
    b = resolve_tracking_uri(cfg(output_dir=str(tmp_path / "runs" / "b")))
    assert a == b == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert a.startswith("sqlite:////")  # an absolute path
    assert artifact_root(a) == f"file://{tmp_path}/runs/mlartifacts"


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(cfg()) == f"sqlite:///{tmp_path}/runs/mlflow.db"  # runs/default
    given = cfg(tracking={"uri": "sqlite:///store/x.db?timeout=20"})
    assert resolve_tracking_uri(given) == f"sqlite:///{tmp_path}/store/x.db?timeout=20"
    assert sqlite_file(resolve_tracking_uri(given)) == tmp_path / "store" / "x.db"


def test_other_uris_are_used_as_given():
    for uri in ("http://127.0.0.1:5000", "postgresql://u@db/mlflow", "file:///tmp/mlruns"):
        assert resolve_tracking_uri(cfg(tracking={"uri": uri})) == uri
        assert artifact_root(uri) is None  # the server or MLflow decides
    assert ui_hint("http://h:5000") == "open http://h:5000 in a browser"
    assert ui_hint("sqlite:////a/b.db") == "mlflow ui --backend-store-uri sqlite:////a/b.db"


def test_mlflow_tracking_uri_is_used_when_the_config_sets_none(tmp_path, monkeypatch):
    # MLflow's own convention: config, then $MLFLOW_TRACKING_URI, then the local SQLite file.
    run = cfg(output_dir=str(tmp_path / "runs" / "a"))
    assert resolve_tracking_uri(run) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert tracking_uri_source(run).startswith("output_dir")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri(run) == "http://mlflow.internal:5000"
    assert tracking_uri_source(run) == "MLFLOW_TRACKING_URI"
    monkeypatch.chdir(tmp_path)  # a relative SQLite path from the environment is made absolute too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///shared/m.db")
    assert resolve_tracking_uri(run) == f"sqlite:///{tmp_path}/shared/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty: as if unset
    assert resolve_tracking_uri(run) == f"sqlite:///{tmp_path}/runs/mlflow.db"


def test_the_config_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    given = cfg(tracking={"uri": "http://from-config:5000"})
    assert resolve_tracking_uri(given) == "http://from-config:5000"
    assert tracking_uri_source(given) == "tracking.uri"


def test_an_unreachable_server_from_the_environment_is_named_as_such(monkeypatch):
    import socket

    from prefopt.tracking.store import TrackingError, check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingError, match=r"^MLFLOW_TRACKING_URI: no MLflow server answers at http://127\.0\.0\.1:"
                       r".*or unset MLFLOW_TRACKING_URI for the local SQLite store$") as err:
        check_reachable(cfg(), timeout_s=2)
    assert err.value.exit_code == 4


def test_slug():
    assert slug("my exp/1") == "my-exp-1"
    assert slug("dpo_vs_ppo.v2") == "dpo_vs_ppo.v2"
    assert slug("///") == "experiment"


def test_tracking_config_validation():
    from prefopt.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="tracking.experiment"):
        build_config({"tracking": {"experiment": ""}}, source="x.yaml")
    with pytest.raises(ConfigError, match="tracking.registr"):
        build_config({"tracking": {"registr_model": "m"}}, source="x.yaml")
    assert cfg(tracking={"register_model": "tiny"}).tracking.register_model == "tiny"


# ----------------------------------------------------------------- params and tags


def test_flatten_config_writes_every_leaf_once():
    from prefopt.tracking.tracker import flatten_config

    flat = flatten_config(cfg(train={"lr": 1e-4}, policy={"deepspeed": {"extra": {"a": {"b": 1}}}})
                          .model_dump(mode="json"))
    assert flat["train.lr"] == "0.0001"
    assert flat["train.adam_betas"] == "[0.9, 0.999]"
    assert flat["model.path"] == "null"
    assert flat["data.packing"] == "true"
    assert flat["algorithm.name"] == "dpo"  # strings stay unquoted
    assert flat["model.tiny.hidden_size"] == "64"
    assert flat["policy.deepspeed.extra.a.b"] == "1"
    assert flatten_config({"empty": {}}) == {"empty": "{}"}
    assert all(not isinstance(v, dict) for v in flat.values())


def test_long_param_values_are_cut_to_the_oldest_server_limit():
    from prefopt.tracking.tracker import PARAM_VALUE_LIMIT, flatten_config

    assert PARAM_VALUE_LIMIT == 500
    flat = flatten_config({"deepspeed": {"extra": {"blob": "x" * 2000}}, "short": "y" * 500})
    value = flat["deepspeed.extra.blob"]
    assert len(value) == 500 and value.startswith("x" * 400) and value.endswith("config.yaml]")
    assert flat["short"] == "y" * 500  # exactly at the limit: kept whole


def test_algorithm_tags():
    from prefopt.tracking.tracker import algorithm_tags

    assert algorithm_tags(cfg(algorithm={"name": "dpo"})) == {"algorithm": "offline", "loss": "dpo"}
    assert algorithm_tags(cfg(algorithm={"name": "kto"})) == {"algorithm": "offline", "loss": "kto"}
    assert algorithm_tags(cfg(algorithm={"name": "sft"})) == {"algorithm": "offline", "loss": "sft"}


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    from prefopt.tracking.tracker import git_commit

    assert git_commit(tmp_path) is None
    # The package's own checkout: the HEAD git itself reports there (None when not a checkout).
    import shutil
    import subprocess
    from pathlib import Path

    import prefopt

    commit = git_commit()
    if shutil.which("git") is None:
        assert commit is None
        return
    package = Path(prefopt.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert commit == (head.stdout.strip() if head.returncode == 0 else None)
    assert commit is None or len(commit) == 40


# ----------------------------------------------------------------- report files


def comparison():
    from prefopt.tracking.frontier import Point, RunCurve, compare

    return compare([
        RunCurve("id-dpo", "dpo-1", "dpo", "beta=0.1",
                 [Point(0, .1, 0), Point(1, .5, 10), Point(2, .7, 20)], {20: .8}),
        RunCurve("id-ppo", "ppo|1", "ppo", "", [Point(0, .1, 0), Point(3, .4, 10)]),
    ])


def test_csv_and_markdown(tmp_path):
    from prefopt.tracking.report import CSV_COLUMNS, write_csv, write_markdown

    cmp = comparison()
    with open(write_csv(cmp, tmp_path / "t.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["run_id"], r["method"]) for r in rows] == [("id-dpo", "dpo"), ("id-ppo", "ppo")]
    dpo, ppo = rows
    # Largest KL both reach: min(2, 3) = 2. ppo's frontier (0,.1)-(3,.4) is at .3 there.
    assert float(dpo["matched_kl"]) == 2 and float(ppo["matched_kl"]) == 2
    assert (float(dpo["best_reward"]), float(dpo["kl_at_best"]), float(dpo["win_rate"])) == (.7, 2, .8)
    assert float(ppo["reward_at_matched_kl"]) == pytest.approx(.3)
    assert ppo["win_rate"] == "" and ppo["params"] == ""

    md = write_markdown(cmp, tmp_path / "t.md", experiment="e", x="eval/kl", y="eval/reward")
    text = md.read_text()
    assert "| method | run | params | best reward | kl at best | reward at kl=2 |" in text
    assert "| ppo | ppo\\|1 | - | 0.4 | 3 | 0.3 | - | 2 |" in text
    assert "dpo 0.7, ppo 0.3" in text


def test_plot_is_a_png(tmp_path):
    from matplotlib.image import imread

    from prefopt.tracking.report import plot_frontier

    path = plot_frontier(comparison(), tmp_path / "f.png", x="eval/kl", y="eval/reward", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something is drawn


def test_commands_and_math_do_not_import_mlflow():
    # MLflow and Ray take seconds to import: `prefopt --help` must not pay for them. prefopt.cli
    # holds every command (compare, runs, submit, job ...).
    import subprocess
    import sys

    code = ("import sys, prefopt.cli, prefopt.tracking.frontier, prefopt.tracking.report; "
            "print(json.dumps({m: m in sys.modules for m in ('mlflow', 'ray')}))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == {"mlflow": False, "ray": False}
