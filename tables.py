"""
`python train.py table NAME`: one of the paper's experiments, every row a fit and an eval per seed.

  branches   Table 4: the DRPN's branches and the PromptSSMs' prompted attention, one switched off a row
  transform  Table 5: the P_spa branch with the FRFT or the FFT
  points     Table 3: Gamma or Gaussian point spectra at 0.01 / 0.1 / 1 / 10 % labels
  losses     Table 6: Eq. (15) without one term a row
  paradigm   Table 2: the paper's bodies (dypro, mst++, hscnn+) unsupervised, with Pixel-SSR at 0.01 %, supervised
  modes      Table 2's three supervision modes with DyPro-Mamba
  labels     Tables 7-9: the label ratio
  maektsr    MAE-KTSR (its abstract's claim): Pixel-SSR, the stage-2 CNN alone, with a random encoder, with
             S2-MAE pre-trained and ISFF, at 0.01 % labels (pre-trained on the labelled points) and at
             image level (on the training cubes); --max-minutes is each stage's budget
  recipe     the CPU recipe (beyond the paper: --prior rootpoly --exposure 2 --warmup 10), the same with the
             ColorChecker's spectra in the prior's fit (--prior-library colorchecker), and the paper's network

--folds runs every row once per scene of --data with that scene as the only test scene and the others
training (leave-one-scene-out; --val-scenes are never a fold), so that no scene that chose a setting is
the one it is reported on; table.md adds each fold's PSNR beside the regression's.

A row is a label and the fit settings it changes (fit's dests, e.g. use_spa=False); the table's own
flags and any other fit flag apply to every row. A second call after an interrupted one finishes the cut
runs and redoes nothing that finished. Writes table.json and table.md: mean +- std over the training
seeds (each its eval's mean over Gamma draws and test scenes; with --folds over folds and seeds, the
spread of scenes), and the classical baseline of each label ratio as its own row.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import pretrain
from runs import UsageError, positive

PAPER_BODIES = ("dypro", "mst++", "hscnn+")  # Table 2's; backbones.BODIES also holds MAE-KTSR's stage 2

# rows of each table: (label, the fit settings the row changes)
TABLES = {
    "branches": [("full (Table 4, last row)", {}), ("w/o P_spa", {"use_spa": False}), ("w/o P_hf", {"use_hf": False}),
                 ("w/o P_spe", {"use_spe": False}), ("w/o DRPN", {"use_drpn": False}),
                 ("w/o PromptSSM attention", {"use_prompt_ssm": False})],
    "transform": [("P_spa with FFT", {"spa_transform": "fft"}), ("P_spa with FRFT", {})],
    "points": [(f"{dist}, {r * 100:g} %", {"points": dist, "label_ratio": r})
               for r in (1e-4, 1e-3, 1e-2, 1e-1) for dist in ("gaussian", "gamma")],
    "losses": [(f"w/o L_{t}", {"loss_weights": f"{k}=0"}) for k, t in (("p2i", "P2I"), ("phsi", "pHSI"), ("rep", "rep"),
                                                                      ("ssim", "SSIM"))] + [("all four (Eq. 15)", {})],
    "paradigm": [(f"{b}, {mode}", {"backbone": b, "label_ratio": r}) for b in PAPER_BODIES
                 for mode, r in (("unsupervised", 0.0), ("+ Pixel-SSR 0.01 %", 1e-4), ("supervised", 1.0))],
    "modes": [("unsupervised (omega = 0)", {"label_ratio": 0.0}), ("pixel-level (omega = 0.01 %)", {"label_ratio": 1e-4}),
              ("image-level (omega = 1)", {"label_ratio": 1.0})],
    "labels": [(f"omega = {r * 100:g} %", {"label_ratio": r}) for r in (1e-4, 1e-3, 1e-2, 1e-1)],
    # MAE-KTSR's claim: pre-training (stage 1) beats the same stage 2 with a random encoder at equal labels.
    # "pretrain": the row first pre-trains S2-MAE on that regime's data (pretrain.py), then fits with it.
    "maektsr": [(f"{name}, {mode}", {"label_ratio": r, **row}) for mode, r, source in
                (("0.01 %", 1e-4, "points"), ("image level", 1.0, "cubes"))
                for name, row in (("Pixel-SSR (DyPro-Mamba)", {}),
                                  ("stage-2 CNN alone", {"backbone": "maektsr", "use_isff": False}),
                                  ("random encoder + ISFF", {"backbone": "maektsr", "mae_init": "random"}),
                                  (f"S2-MAE ({source}) + ISFF", {"backbone": "maektsr", "pretrain": source}))],
    "recipe": [("CPU recipe (prior, exposure, warm-up)", {"prior": "rootpoly", "exposure": 2.0, "warmup": 10}),
               ("CPU recipe, ColorChecker in the prior", {"prior": "rootpoly", "exposure": 2.0, "warmup": 10,
                                                          "prior_library": "colorchecker"}),
               ("the paper's network (defaults)", {})],
}
TABLE_METRICS = ("psnr", "ssim", "sam", "mrae", "rmse")

BASELINES = {"root_poly_baseline": "root-polynomial regression on the run's labels",
             "smoothest_baseline": "smoothest non-negative spectrum (no labels)",
             "root_poly_library_baseline": "root-polynomial regression on the labels and the ColorChecker"}


def row_dir(label: str) -> str:
    """A row's folder name: its label with every character but letters and digits made "_"."""
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def table(args: argparse.Namespace, fit: Callable, fit_args: Callable) -> dict:
    """Run every row of table args.name over args.seeds training seeds (and with --folds every fold), each a
    fit and an eval, skipping runs whose eval is written and resuming fits that were cut short; write
    table.json and table.md.
    fit and fit_args are train.py's (handed in: train.py dispatches this command, so this file does not
    import it)."""
    out = Path(args.out)
    shared = {"max_minutes": args.max_minutes, "device": args.device, **({"data": args.data} if args.data else {})}
    rows, test_scenes = [], folds(args, fit_args)
    for label, settings in TABLES[args.name]:
        runs, fit_settings = [], {k: v for k, v in settings.items() if k != "pretrain"}
        for fold in test_scenes:
            test = [fold] if fold else args.test_scenes  # None: fit's default
            test = {"test_scenes": test} if test is not None else {}
            for seed in range(args.seeds):
                run = out / row_dir(label) / (f"fold_{fold}" if fold else "") / f"seed{seed}"
                report = run / "eval" / "metrics.json"
                if not report.is_file():
                    print(f"\n== {args.name}: {label}{f', test scene {fold}' if fold else ''}, seed {seed}")
                    chosen = fit_run(args, fit, fit_args, fit_args(args.fit_args, **shared, **test, **fit_settings,
                                                                   seed=seed, out=str(run)), settings.get("pretrain"))
                    evaluate.evaluate(chosen, run / "eval", seeds=args.eval_seeds, tile=args.tile, device=args.device)
                ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
                runs.append({"seed": seed, "fold": fold, "steps": ckpt["step"], "report": json.loads(report.read_text())})
        rows.append({"label": label, "settings": settings, "runs": runs})
    result = {"table": args.name, "command": "python train.py table " + " ".join(args.argv), "rows": rows}
    with open(out / "table.json", "w") as f:
        json.dump(result, f, indent=2)
    (out / "table.md").write_text(table_markdown(result))
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}")
    return result


def folds(args: argparse.Namespace, fit_args: Callable) -> list[str | None]:
    """The test scene of each fold with --folds: every scene of --data but the validation scenes, in turn;
    without it one fold, None, whose test scenes are --test-scenes' (or fit's default)."""
    if not args.folds:
        return [None]
    if args.test_scenes is not None:
        raise UsageError("--folds makes each scene the test scene in turn; drop --test-scenes.")
    val = set(data.split_scenes(data.scene_names(args.data), [], fit_args(args.fit_args).val_scenes)[1])
    return [n for n in data.scene_names(args.data) if n not in val]


def fit_run(args: argparse.Namespace, fit: Callable, fit_args: Callable, run_args: argparse.Namespace,
            source: str | None) -> Path:
    """One row's fit into run_args.out: finished with its own settings if a cut-short one is there, else new,
    after MAE-KTSR's pre-training on `source`'s data when the row asks for it. Returns fit's result: best.pt
    where --val-scenes chose one, else last.pt."""
    run = Path(run_args.out)
    if (run / "last.pt").is_file():  # cut short before its eval: finish it, keep what it did
        print("(resumed)")
        return fit(fit_args([], out=str(run), resume=True, max_minutes=args.max_minutes, device=args.device))
    if source:
        run_args.mae_ckpt = str(stage_one(run / "pretrain", run_args, source))
    return fit(run_args)


def stage_one(out: Path, fit_args: argparse.Namespace, source: str) -> Path:
    """MAE-KTSR's pre-training for one row and seed, on `source`'s data under the fit's split, labels, seed,
    camera response, patches and budget; resumed if it was cut short, skipped if its encoder is written."""
    if (out / "encoder.pt").is_file():
        return out / "encoder.pt"
    budget = {"max_minutes": fit_args.max_minutes, "device": fit_args.device, "out": str(out)}
    if (out / "last.pt").is_file():  # cut short: finish it with its own settings
        return pretrain.pretrain(pretrain.pretrain_args([], resume=True, **budget))
    shared = ("data", "test_scenes", "val_scenes", "label_ratio", "seed", "srf", "patch", "stride", "batch_size")
    args = pretrain.pretrain_args([], **{k: getattr(fit_args, k) for k in shared}, source=source, **budget)
    if fit_args.epochs_given:
        args.epochs, args.epochs_given = fit_args.epochs, True
    print(f"\n== pre-training S2-MAE ({source}) into {out}")
    return pretrain.pretrain(args)


def table_markdown(result: dict) -> str:
    """The paper's layout: a row per setting, PSNR / SSIM / SAM / MRAE / RMSE as mean +- std over the row's runs
    (training seeds, and folds with --folds; each its eval's mean over Gamma draws and test scenes), the steps trained, then one row per classical
    baseline (per label ratio: the regression on each seed's labels, or the smoothest spectrum without any)."""
    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.4g} ± {np.std(values):.2g}" if len(values) > 1 else f"{values[0]:.4g}"

    head = ["setting", *(m.upper() for m in TABLE_METRICS), "steps"]
    lines = [f"`{result['command']}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baselines = {}
    for row in result["rows"]:
        reports = [r["report"] for r in row["runs"]]
        lines.append(f"| {row['label']} | " + " | ".join(cell([r["overall"][m]["mean"] for r in reports]) for m in TABLE_METRICS)
                     + f" | {'/'.join(str(r['steps']) for r in row['runs'])} |")
        for key, name in BASELINES.items():
            if key in reports[0]:
                baselines.setdefault((name, reports[0]["label_ratio"]), [r[key] for r in reports if key in r])
    for (name, ratio), reports in baselines.items():
        lines.append(f"| {name} (omega = {ratio * 100:g} %) | " + " | ".join(cell([r[m]["mean"] for r in reports])
                                                                         for m in TABLE_METRICS) + " | - |")
    return "\n".join(lines + fold_lines(result["rows"], cell)) + "\n"


def classical(report: dict) -> dict | None:
    """An eval's first classical baseline in BASELINES' order (the labels' own regression before the library's
    map), or None."""
    return next((report[k] for k in BASELINES if k in report), None)


def fold_lines(rows: list[dict], cell: Callable) -> list[str]:
    """With --folds: PSNR per test scene, each row's (over its seeds) beside the classical baseline of the
    first row's runs on that fold (the regression on that row's labels, "-" where it has none); none without
    folds."""
    scenes = list(dict.fromkeys(r["fold"] for r in rows[0]["runs"] if r.get("fold")))
    if not scenes:
        return []
    first = f"{rows[0]['label']}: its classical baseline"
    lines = ["", "PSNR per fold (test scene):", "", "| test scene | " + " | ".join(row["label"] for row in rows)
             + f" | {first} |", "|" + "---|" * (len(rows) + 2)]
    for scene in scenes:
        runs = [[r["report"] for r in row["runs"] if r["fold"] == scene] for row in rows]
        base = [b["psnr"]["mean"] for b in map(classical, runs[0]) if b is not None]
        lines.append(f"| {scene} | " + " | ".join(cell([r["overall"]["psnr"]["mean"] for r in reports]) for reports in runs)
                     + f" | {cell(base) if base else '-'} |")
    return lines


# -----------------------------------------------------------------------------
# the command line

def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("name", choices=list(TABLES))
    t.add_argument("--data", default=None, help="folder of scenes (default: the demo scenes)")
    t.add_argument("--out", required=True, help="table folder: a run folder per row and seed, table.md, table.json")
    t.add_argument("--max-minutes", type=float, default=0.0, help="time budget of each run (0: --epochs)")
    t.add_argument("--seeds", type=positive, default=1, help="training seeds per row (mean +- std)")
    t.add_argument("--eval-seeds", type=positive, default=1, help="Gamma draws per scene in each eval")
    t.add_argument("--test-scenes", nargs="*", default=None)
    t.add_argument("--folds", action="store_true", help="leave-one-scene-out: each scene of --data the test scene in turn")
    t.add_argument("--tile", type=int, default=0, help="eval tile size (0: whole images, the protocol)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def parse(t: argparse.ArgumentParser, argv: list[str], fit_args: Callable) -> argparse.Namespace:
    """The table's own flags from argv (after "table"); the rest are fit flags for every run, checked here
    with fit_args so that an unknown or malformed one stops the table before its first row."""
    args, args.fit_args = t.parse_known_args(argv)
    args.argv = argv
    fit_args(args.fit_args)
    return args
