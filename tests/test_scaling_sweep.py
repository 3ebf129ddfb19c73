"""`jetfm sweep pretrain` end to end: a 2 x 2 study (tiny sizes, 2 steps) with a parent MLflow run,
a tagged child run per point, the fit files; a rerun skips finished points; --dry-run plans only."""

import itertools
import json

import pytest
import yaml
from accelerate.state import AcceleratorState, GradientState
from test_scaling_trainer import store, tokens  # noqa: F401 - fixtures: tokenized shards, a migrated MLflow store

from jetfm import sweep
from jetfm.config_io import load_config
from jetfm.data.reader import make_loader
from jetfm.data.shards import Manifest
from jetfm.models.pretrain import build_pretrain_model
from jetfm.scaling.flops import ModelShapes, step_flops

LADDER = {"sizes": {"a": {"dim": 8, "num_blocks": 1, "num_heads": 1, "head_blocks": 1},
                    "b": {"dim": 16, "num_blocks": 1, "num_heads": 2, "head_blocks": 1}}}


def study_args(tmp_path, tokens, *extra, uri=None):  # noqa: F811
    from test_trainer import tiny_config

    base = tiny_config(tmp_path, tokens, name="base", builder=None, objective={"name": "joint"},
                       model={"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.0},
                       data={"path": str(tokens), "batch_size": 8, "shuffle_buffer": 8},
                       train={"eval_every": 2, "eval_batches": 1, "log_every": 1},
                       tracking={"enabled": True})
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(yaml.safe_dump(LADDER))
    return ["pretrain", "--base", str(base), "--ladder", str(ladder), "--sizes", "a,b", "--train-jets", "16,48",
            "--steps", "2", "--out", str(tmp_path / "study"), "--bootstrap", "0",
            *(["--set", f"tracking.uri={uri}"] if uri else []), *extra]


def test_a_2x2_study_runs_tracks_fits_and_resumes(tmp_path, tokens, store, capsys):  # noqa: F811
    import mlflow

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert sweep.main(study_args(tmp_path, tokens, uri=store)) == 0
    out = tmp_path / "study"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/summary.json")}
    assert sorted(summaries) == ["a-D16-s2", "a-D48-s2", "b-D16-s2", "b-D48-s2"]
    for name, summary in summaries.items():
        scaling = summary["scaling"]
        assert summary["status"] == "completed" and scaling["size"] == name[0] and scaling["flops"] > 0
        assert scaling["unique_jets"] == (16 if "D16" in name else 48) and scaling["jets_seen"] == 16
    assert summaries["a-D16-s2"]["scaling"]["N"] < summaries["b-D16-s2"]["scaling"]["N"]
    # the trainer's FLOPs = the analytic formula over the batches the point trained on (its config, its order)
    cfg = load_config(out / "configs" / "b-D48-s2.yaml")
    loader = make_loader(cfg.data, cfg.data.train_split, seed=cfg.seed, shuffle=True, drop_uneven=True,
                         require_tokens=True)
    shapes = ModelShapes.from_model(build_pretrain_model(cfg, Manifest.load(tokens)))
    batches = list(itertools.islice(loader, 2))
    flops = sum(step_flops(shapes, b.seqlens, objective="joint", mask_fraction=0.4).total for b in batches)
    assert summaries["b-D48-s2"]["scaling"]["flops"] == pytest.approx(flops, rel=1e-12)
    fit = json.loads((out / "fit" / "fit.json").read_text())
    assert set(fit["objectives"]) == {"ntp", "mpm"} and (out / "fit" / "study.md").exists()

    client = mlflow.MlflowClient(store)
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(summaries)
    for run in children:
        tags, name = run.data.tags, run.info.run_name
        assert tags["jetfm.size"] == name[0] and tags["jetfm.D"] == name.split("-")[1][1:]
        assert tags["jetfm.N"] == str(summaries[name]["scaling"]["N"]) and tags["jetfm.objective"] == "joint"
        assert run.data.metrics["compute/flops"] == pytest.approx(summaries[name]["scaling"]["flops"], rel=1e-6)
    assert "fit" in [a.path for a in client.list_artifacts(parent)]

    # rerun: every point is skipped, the same parent run
    capsys.readouterr()
    assert sweep.main(study_args(tmp_path, tokens, uri=store)) == 0
    assert capsys.readouterr().err.count("finished, skipped") == 4
    assert json.loads((out / "study.json").read_text())["parent_run_id"] == parent


def test_dry_run_prints_the_grid_and_trains_nothing(tmp_path, tokens, capsys):  # noqa: F811
    assert sweep.main(study_args(tmp_path, tokens, "--dry-run", "--measure-steps", "1")) == 0
    text = capsys.readouterr().out
    for name in ("a-D16-s2", "a-D48-s2", "b-D16-s2", "b-D48-s2"):
        assert name in text
    assert "4 points, about" in text and not (tmp_path / "study" / "runs").exists()


def test_budgets_set_the_steps_and_bad_grids_are_refused(tmp_path, tokens, capsys):  # noqa: F811
    assert sweep.main(study_args(tmp_path, tokens, "--steps", "1", "--budgets", "1e9")) == 2
    assert "exactly one of --steps, --epochs and --budgets" in capsys.readouterr().err
    args = study_args(tmp_path, tokens, "--dry-run", "--measure-steps", "0")
    args[args.index("--steps"):args.index("--steps") + 2] = ["--budgets", "1e8,1e9"]
    assert sweep.main(args) == 0
    text = capsys.readouterr().out
    assert "a-D16-C1e08" in text and "b-D48-C1e09" in text
    args = study_args(tmp_path, tokens, "--sizes", "a,zz")
    assert sweep.main(args) == 2 and "'zz'" in capsys.readouterr().err


def test_slurm_runner_writes_the_points_and_the_array_script_runs_one_per_task(tmp_path, tokens, store, capsys):  # noqa: F811
    import os
    import subprocess
    from pathlib import Path

    assert sweep.main(study_args(tmp_path, tokens, "--runner", "slurm", uri=store)) == 0
    out = tmp_path / "study"
    points = (out / "slurm" / "points.txt").read_text().split()
    assert [Path(p).name for p in points] == ["a-D16-s2.yaml", "a-D48-s2.yaml", "b-D16-s2.yaml", "b-D48-s2.yaml"]
    assert "sbatch --array=0-3" in capsys.readouterr().err  # no sbatch here: the command is printed
    assert not (out / "runs").exists()

    # the array script: task i hands line i to launchers/slurm.sh (a stand-in that prints its arguments)
    fake = tmp_path / "checkout"
    (fake / "launchers").mkdir(parents=True)
    (fake / "launchers" / "slurm.sh").write_text('echo "slurm.sh $*"\n')
    script = Path(sweep.__file__).resolve().parent.parent / "launchers" / "sweep_slurm.sh"
    env = {**os.environ, "JETFM_DIR": str(fake), "SLURM_ARRAY_TASK_ID": "2"}
    done = subprocess.run(["bash", str(script), str(out / "slurm" / "points.txt")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip().endswith(f"slurm.sh {points[2]}")
    env["SLURM_ARRAY_TASK_ID"] = "4"
    done = subprocess.run(["bash", str(script), str(out / "slurm" / "points.txt")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "has no line 5" in done.stderr
