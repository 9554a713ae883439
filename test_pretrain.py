"""
MAE-KTSR's two stages as commands (pretrain.py, `fit --backbone maektsr`, `table maektsr`): the points regime
reads no spectrum but the run's labelled pixels, the encoder reaches stage 2 intact, fit refuses an encoder
that would make its run dishonest, a pre-training run resumes exactly, and the table pre-trains per row.
"""

import json
from pathlib import Path

import pytest
import torch

import evaluate
import maektsr
import pretrain
import runs
import tables
import train
from conftest import FAST, _crash_on_call, _demo_dir, _fit, _fit_argv

PRE = ("--patch", "32", "--stride", "32", "--batch-size", "2", "--device", "cpu")


def _pretrain(root: Path, out: Path, *flags: str, epochs: int = 1, test: str = "demo_02") -> dict:
    """`python train.py pretrain` on root into out (test held out), checked; -> its encoder.pt."""
    assert train.main(["pretrain", "--data", str(root), "--out", str(out), "--epochs", str(epochs),
                       "--test-scenes", test, *PRE, *flags]) == 0
    return torch.load(out / "encoder.pt", weights_only=True)


def test_a_new_pretraining_in_a_folder_with_a_cut_short_log_keeps_only_its_own_steps(tmp_path):
    out = tmp_path / "pre"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    _pretrain(_demo_dir(tmp_path), out)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1


def test_points_pretraining_reads_no_spectrum_but_the_runs_labelled_pixels(tmp_path, monkeypatch):
    """Every spectrum pre-training is handed is one of the run's labelled spectra (those fit draws for the
    same seed and ratio), every other pixel of its batches is zero, and S2-MAE is told which are known."""
    root, seen, real_step = _demo_dir(tmp_path), [], maektsr.pretrain_step
    monkeypatch.setattr(maektsr, "pretrain_step",
                        lambda mae, opt, hsi, rgb, srf, g, lr, known: seen.append((hsi, known))
                        or real_step(mae, opt, hsi, rgb, srf, g, lr, known))
    encoder = _pretrain(root, tmp_path / "pre", "--label-ratio", "0.01", epochs=2)
    run = _fit(root, tmp_path / "fit", "--label-ratio", "0.01")
    assert encoder["labels"].keys() == run["labels"].keys() == {"demo_00", "demo_01"}
    for name, labels in run["labels"].items():
        assert torch.equal(encoder["labels"][name]["coords"], labels["coords"])
    assert len(seen) == 8 and all(known is not None and known.any() for _, known in seen)
    assert _only_labelled_spectra(seen, run)


def test_the_leak_check_catches_a_pretraining_that_reads_unlabelled_spectra(tmp_path, monkeypatch):
    """The check above, against a planted leak: pre-training handed every pixel's spectrum (the label sets
    drawn at ratio 1 while the run keeps its 1 %)."""
    root, seen, real_step, real_draw = _demo_dir(tmp_path), [], maektsr.pretrain_step, pretrain.make_label_sets
    monkeypatch.setattr(maektsr, "pretrain_step",
                        lambda mae, opt, hsi, rgb, srf, g, lr, known: seen.append((hsi, known))
                        or real_step(mae, opt, hsi, rgb, srf, g, lr, known))
    monkeypatch.setattr(pretrain, "make_label_sets", lambda scenes, ratio, *a: real_draw(scenes, 1.0, *a))
    _pretrain(root, tmp_path / "pre", "--label-ratio", "0.01")
    assert not _only_labelled_spectra(seen, _fit(root, tmp_path / "fit", "--label-ratio", "0.01"))


def _only_labelled_spectra(seen: list, run: dict) -> bool:
    """Every batch (hsi, known) pre-training was handed is zero off its known pixels, and every spectrum at
    a known pixel is one of the run's labelled spectra."""
    labelled = {tuple(s.tolist()) for v in run["labels"].values() for s in v["spectra"]}
    return all(torch.equal(hsi, torch.where(known, hsi, 0.0))
               and {tuple(s.tolist()) for s in hsi.permute(0, 2, 3, 1)[known[:, 0]]} <= labelled
               for hsi, known in seen)


def test_cubes_pretraining_reads_every_pixel_of_the_training_scenes(tmp_path, monkeypatch):
    root, seen, real_step = _demo_dir(tmp_path), [], maektsr.pretrain_step
    monkeypatch.setattr(maektsr, "pretrain_step",
                        lambda mae, opt, hsi, rgb, srf, g, lr, known: seen.append((hsi, known))
                        or real_step(mae, opt, hsi, rgb, srf, g, lr, known))
    encoder = _pretrain(root, tmp_path / "pre", "--source", "cubes")
    assert encoder["regime"] == "cubes" and encoder["source_scenes"] == ["demo_00", "demo_01"]
    assert seen and all(known is None and (hsi.sum(1) > 0).all() for hsi, known in seen)


def test_a_pretrained_encoder_reaches_stage_two_intact_and_frozen(tmp_path):
    """fit --mae-ckpt puts the encoder's weights into the body; frozen (the default), training leaves them as
    they were pre-trained, and eval rebuilds the network from the checkpoint alone."""
    root = _demo_dir(tmp_path)
    encoder = _pretrain(root, tmp_path / "pre", "--label-ratio", "0.01")
    run = _fit(root, tmp_path / "fit", "--label-ratio", "0.01", "--backbone", "maektsr", "--mae-ckpt",
               str(tmp_path / "pre" / "encoder.pt"))
    body = {k[len("body.mae.encoder."):]: v for k, v in run["model"].items() if k.startswith("body.mae.encoder.")}
    assert body.keys() == encoder["encoder"].keys() and run["model_config"]["mae_window"] == 32  # FAST's --patch
    assert all(torch.equal(body[k], encoder["encoder"][k]) for k in body)
    assert any(not torch.equal(v, run["model"][k]) for k, v in _fit(root, tmp_path / "fit0", "--label-ratio", "0.01",
                                                                    "--backbone", "maektsr", "--mae-init", "random",
                                                                    epochs=1)["model"].items()
               if k.startswith("body.mae.encoder."))  # a random encoder is another one
    _fit(root, tmp_path / "fit", "--resume", "--backbone", "maektsr", epochs=None)  # its encoder is in last.pt
    report = evaluate.evaluate(tmp_path / "fit" / "last.pt", tmp_path / "ev", seeds=1, device="cpu")
    assert report["overall"]["psnr"]["mean"] > 0


@pytest.mark.parametrize("pre,fit,words", [
    (["--source", "cubes", "--test-scenes", "demo_00"], ["--test-scenes", "demo_01"], "demo_01"),
    (["--source", "cubes"], ["--val-scenes", "demo_01"], "demo_01"),
    (["--source", "cubes", "--srf", "cie1931"], [], "cie1931"),
    (["--label-ratio", "0.05"], ["--label-ratio", "0.01"], "label ratio 0.05"),
    (["--label-ratio", "0.01", "--seed", "1"], ["--label-ratio", "0.01"], "seed 1"),
    (["--source", "cubes"], ["--label-ratio", "0.01"], "whole cubes"),
], ids=["test scene", "validation scene", "camera response", "more labels", "other labels", "cubes, few labels"])
def test_fit_refuses_an_encoder_that_would_make_its_run_dishonest_in_one_sentence(tmp_path, capsys, pre, fit, words):
    root = _demo_dir(tmp_path)
    assert train.main(["pretrain", "--data", str(root), "--out", str(tmp_path / "pre"), "--epochs", "1",
                       *(["--test-scenes", "demo_02"] if "--test-scenes" not in pre else []), *PRE, *pre]) == 0
    capsys.readouterr()
    argv = ["fit", "--data", str(root), "--out", str(tmp_path / "fit"), "--epochs", "1", *FAST, "--device", "cpu",
            "--backbone", "maektsr", "--mae-ckpt", str(tmp_path / "pre" / "encoder.pt"),
            *(["--test-scenes", "demo_02"] if "--test-scenes" not in fit else []), *fit]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "--mae-ckpt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,words", [
    (["--backbone", "maektsr"], "--mae-ckpt"),
    (["--mae-ckpt", "x.pt"], "--mae-ckpt"),
    (["--mae-init", "random"], "--mae-init"),
    (["--no-isff"], "--no-isff"),
    (["--backbone", "maektsr", "--mae-init", "random", "--mae-ckpt", "x.pt"], "--mae-ckpt"),
    (["--backbone", "maektsr", "--mae-ckpt", "{tmp}/missing.pt"], "missing.pt"),
    (["--backbone", "maektsr", "--mae-init", "random", "--patch", "36"], "multiple of 8"),
])
def test_maektsr_flags_that_do_not_fit_together_are_one_sentence(tmp_path, capsys, flags, words):
    argv = ["fit", "--out", str(tmp_path / "r"), "--epochs", "1", *FAST, *[f.replace("{tmp}", str(tmp_path))
                                                                          for f in flags]]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("crop", [16, None], ids=["other size", "not recorded"])
def test_fit_refuses_an_encoder_pre_trained_on_crops_of_another_size_than_its_patch(tmp_path, capsys, crop):
    """Stage 2 runs the encoder in windows of fit's --patch (maektsr A13), the context it must have been
    pre-trained on; an encoder from before encoders recorded their crop cannot say."""
    root = _demo_dir(tmp_path)
    encoder = _pretrain(root, tmp_path / "pre", "--source", "cubes", "--patch", str(crop or 32))
    assert encoder["crop"] == (crop or 32)
    if crop is None:
        del encoder["crop"]
        torch.save(encoder, tmp_path / "pre" / "encoder.pt")
    capsys.readouterr()
    argv = _fit_argv(root, tmp_path / "fit", "--label-ratio", "1", "--device", "cpu", "--backbone", "maektsr",
                     "--mae-ckpt", str(tmp_path / "pre" / "encoder.pt"))
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert ("16-pixel crops" if crop else "does not record") in err and "--patch 32" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_run_from_before_encoder_windows_is_read_with_its_patch_as_window(tmp_path):
    """A checkpoint whose model settings predate Config.mae_window gets what fit now sets: its --patch."""
    root = _demo_dir(tmp_path)
    run = _fit(root, tmp_path / "fit", "--label-ratio", "0.01", "--backbone", "maektsr", "--mae-init", "random",
               "--patch", "40", "--stride", "40")
    del run["model_config"]["mae_window"]
    torch.save(run, tmp_path / "old.pt")
    assert runs.load_checkpoint(tmp_path / "old.pt")["model_config"]["mae_window"] == 40
    assert runs.build_model(runs.load_checkpoint(tmp_path / "old.pt"), torch.device("cpu")).body.window == 40


def test_pretraining_resumed_after_a_crash_ends_with_the_same_encoder_and_refuses_other_settings(tmp_path,
                                                                                                 monkeypatch):
    root = _demo_dir(tmp_path)
    straight = _pretrain(root, tmp_path / "straight", "--label-ratio", "0.01", epochs=3)
    real_step = _crash_on_call(monkeypatch, maektsr, "pretrain_step", 6)  # 4 steps an epoch: in epoch two
    with pytest.raises(KeyboardInterrupt):
        _pretrain(root, tmp_path / "crashed", "--label-ratio", "0.01", epochs=3)
    assert torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(maektsr, "pretrain_step", real_step)
    for contradiction in (["--label-ratio", "0.05"], ["--source", "cubes"], ["--test-scenes", "demo_01"]):
        assert train.main(["pretrain", "--out", str(tmp_path / "crashed"), "--resume", *contradiction]) == 2
    assert train.main(["pretrain", "--out", str(tmp_path / "crashed"), "--resume", "--device", "cpu",
                       "--test-scenes", "demo_02", "--label-ratio", "0.01"]) == 0  # what the run has: accepted
    resumed = torch.load(tmp_path / "crashed" / "encoder.pt", weights_only=True)
    assert all(torch.equal(straight["encoder"][k], resumed["encoder"][k]) for k in straight["encoder"])


def test_table_maektsr_pretrains_each_seed_of_its_s2mae_rows_on_that_rows_regime(tmp_path, monkeypatch):
    """The fits and evals are stubbed: the table's wiring is under test. Each S2-MAE row pre-trains once per
    seed, on its regime's source, with the fit's labels, seed and split, and its fit loads that encoder;
    no other row has one; a second call pre-trains nothing again but finishes a pre-training cut short."""
    fits, pres = [], []

    def fake_fit(args):
        fits.append(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"step": 1}, Path(args.out) / "last.pt")
        return Path(args.out) / "last.pt"

    def fake_pretrain(args):
        pres.append(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({}, Path(args.out) / "encoder.pt")
        return Path(args.out) / "encoder.pt"

    def fake_eval(ckpt, out, **k):
        Path(out).mkdir(parents=True, exist_ok=True)
        report = {"overall": {m: {"mean": 1.0} for m in tables.TABLE_METRICS}, "label_ratio": 1e-4}
        (Path(out) / "metrics.json").write_text(json.dumps(report))

    monkeypatch.setattr(train, "fit", fake_fit)
    monkeypatch.setattr(pretrain, "pretrain", fake_pretrain)
    monkeypatch.setattr(evaluate, "evaluate", fake_eval)
    argv = ["table", "maektsr", "--out", str(tmp_path / "t"), "--seeds", "2", "--test-scenes", "demo_02"]
    assert train.main(argv) == 0
    assert len(fits) == 2 * len(tables.TABLES["maektsr"]) and len(pres) == 2 * 2
    for args in fits:
        pre = [p for p in pres if Path(p.out).parent == Path(args.out)]
        assert (args.mae_ckpt != "") == ("S2_MAE" in args.out) == bool(pre)
        if pre:
            p = pre[0]
            assert args.mae_ckpt == str(Path(p.out) / "encoder.pt")
            assert (p.source, p.label_ratio, p.seed, p.test_scenes) == (
                "points" if args.label_ratio < 1 else "cubes", args.label_ratio, args.seed, ["demo_02"])
    assert sorted(a.seed for a in fits) == sorted([0, 1] * len(tables.TABLES["maektsr"]))
    fits.clear(), pres.clear()
    for f in [*(tmp_path / "t").rglob("metrics.json"), *(tmp_path / "t").rglob("last.pt")]:
        f.unlink()  # every fit runs again from the start
    cut = next((tmp_path / "t").rglob("encoder.pt"))
    cut.unlink()
    torch.save({}, cut.parent / "last.pt")  # one pre-training was cut short
    assert train.main(argv) == 0
    assert len(fits) == 2 * len(tables.TABLES["maektsr"])
    assert [(Path(p.out), p.resume, p.given) for p in pres] == [(cut.parent, True, {"resume", "max_minutes", "device",
                                                                                    "out"})]  # the rest are kept
