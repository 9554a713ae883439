"""
The `table` command (tables.py): every row of a paper table is a fit and an eval, written to table.md and
table.json with the classical baselines' rows; a second call after an interruption redoes nothing that
finished and resumes the fit that did not.
"""

import json
from pathlib import Path

import pytest
import torch

import evaluate
import tables
import train
from conftest import FAST, _demo_dir


def test_table_writes_every_row_and_a_second_call_after_an_interruption_redoes_nothing_finished(tmp_path, monkeypatch):
    """`table modes` on tiny budgets: a first call is interrupted in the second row's eval; the second call
    neither refits nor re-evaluates the first row, resumes the second row's fit (no step redone) and runs the
    third; table.md then has every row and a baseline row per label ratio, and table.json every run."""
    root, out = _demo_dir(tmp_path), tmp_path / "table"
    argv = ["table", "modes", "--data", str(root), "--out", str(out), "--test-scenes", "demo_02", "--epochs", "1", *FAST]
    fits, evals, real_fit, real_eval = [], [], train.fit, evaluate.evaluate

    def eval_then_stop(ckpt, *a, **k):
        evals.append(ckpt)
        if len(evals) == 2:
            raise KeyboardInterrupt
        return real_eval(ckpt, *a, **k)

    monkeypatch.setattr(train, "fit", lambda args: fits.append(args) or real_fit(args))
    monkeypatch.setattr(evaluate, "evaluate", eval_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    second = out / tables.row_dir(tables.TABLES["modes"][1][0]) / "seed0"
    step = torch.load(second / "last.pt", weights_only=True)["step"]
    fits.clear(), evals.clear()
    monkeypatch.setattr(evaluate, "evaluate", lambda ckpt, *a, **k: evals.append(ckpt) or real_eval(ckpt, *a, **k))
    assert train.main(argv) == 0
    assert [f.resume for f in fits] == [True, False] and Path(fits[0].out) == second
    assert torch.load(second / "last.pt", weights_only=True)["step"] == step
    assert [Path(c).parent for c in evals] == [second, out / tables.row_dir(tables.TABLES["modes"][2][0]) / "seed0"]
    md = (out / "table.md").read_text()
    assert all(label in md for label, _ in tables.TABLES["modes"])
    # the classical rows: unsupervised and image-level (0.01 % of a 48 x 48 scene is one pixel, too few to regress)
    assert "smoothest non-negative spectrum" in md and md.count("root-polynomial regression") == 1
    assert len(json.loads((out / "table.json").read_text())["rows"]) == 3


def test_folds_hold_each_scene_out_in_turn_and_never_train_validate_or_fit_the_prior_on_it(tmp_path):
    """`table recipe --folds` with a validation scene: one fold per other scene, whose run tests on that scene
    alone; the scene is in none of that run's training scenes, validation scenes or label sets (which the
    root-polynomial prior and the regression are fitted on), and the validation scene is never a fold.
    Each fold reports the checkpoint its validation chose (best.pt), as fit does. table.md has each fold's
    PSNR beside the regression's."""
    root, out = _demo_dir(tmp_path), tmp_path / "table"
    argv = ["table", "recipe", "--folds", "--data", str(root), "--out", str(out), "--val-scenes", "demo_02",
            "--label-ratio", "0.01", "--epochs", "1", *FAST]
    assert train.main(argv) == 0
    result = json.loads((out / "table.json").read_text())
    for row in result["rows"]:
        assert [r["fold"] for r in row["runs"]] == ["demo_00", "demo_01"]
        for r in row["runs"]:
            run = out / tables.row_dir(row["label"]) / f"fold_{r['fold']}" / "seed0"
            ckpt = torch.load(run / "last.pt", weights_only=True)
            assert ckpt["split"]["test"] == [r["fold"]] and ckpt["split"]["val"] == ["demo_02"]
            assert r["fold"] not in ckpt["split"]["train"] + list(ckpt["labels"])
            assert list(r["report"]["scenes"]) == [r["fold"]]
            assert Path(r["report"]["checkpoint"]) == run / "best.pt"
    md = (out / "table.md").read_text()
    assert "PSNR per fold" in md and all(f"| demo_0{i} |" in md for i in range(2))
    for r in result["rows"][0]["runs"]:  # the last column: the first row's regression on its own labels
        line = next(x for x in md.splitlines() if x.startswith(f"| {r['fold']} |"))
        assert line.split("|")[-2].strip() == f"{r['report']['root_poly_baseline']['psnr']['mean']:.4g}"
