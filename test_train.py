"""
Property tests of train.py, end to end through `python train.py fit` on the demo scenes and on crops of the
real CAVE sample: resuming after a crash, the learning curve, the weight average (EMA), the run's fixed
label sets and what the loss sees of them, the unsupervised and image-level modes, data-parallel training
(torchrun, gloo) and bf16 autocast, the learning rate and the time budget, the root-polynomial prior, every
flag saved in the checkpoint, what --resume refuses, every body fitting, and the command line's one-sentence
errors. Real-data tests are skipped, saying why, when ../shared/data is not beside the checkout.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import backbones
import cameras
import data
import evaluate
import labels
import losses
import pixelssr as P
import runs
import train
from conftest import (REAL_TEST, _assert_close, _crash_on_call, _demo_dir, _eval, _fit, _fit_argv, _inputs, _model, _real_crops,
                      _scene_dir, needs_data)

FEW_STEPS = ("--patch", "16", "--stride", "64", "--batch-size", "6")  # on the real crops: two steps an epoch


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_fit_resumed_after_a_crash_mid_epoch_ends_with_the_same_weights(tmp_path, monkeypatch, extra):
    root = _demo_dir(tmp_path)
    straight = _fit(root, tmp_path / "straight", *extra, epochs=3)

    real_loss = _crash_on_call(monkeypatch, losses, "pixel_ssr_loss", 6)  # 2 scenes x 4 patches / batch 2: in epoch two
    with pytest.raises(KeyboardInterrupt):
        _fit(root, tmp_path / "crashed", *extra, epochs=3)
    assert torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)["step"] == 4  # end of epoch one
    monkeypatch.setattr(losses, "pixel_ssr_loss", real_loss)
    resumed = _fit(root, tmp_path / "crashed", *extra, "--resume", epochs=3)
    for key in ("model", "ema") if extra else ("model",):  # the weight average resumes exactly too
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key])


def test_a_checkpoint_write_that_fails_keeps_the_last_good_one_and_says_so_in_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    runs.save_atomic({"step": 1}, path)

    def disk_full(obj, f):
        Path(f).write_bytes(b"half a checkpo")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(runs.UsageError) as e:
        runs.save_atomic({"step": 2}, path)
    message = str(e.value)
    assert str(tmp_path) in message and "No space left" in message and "--resume" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the half-written file is gone
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_the_log_holds_every_finished_step_while_the_run_goes_on(tmp_path, monkeypatch):
    """log.jsonl is written line by line, so a run killed (or read) mid-way shows every step it took."""
    root, out, seen, real_loss = _demo_dir(tmp_path), tmp_path / "run", [], losses.pixel_ssr_loss

    def read_the_log(*a, **k):
        log = out / "log.jsonl"
        seen.append(len(log.read_text().splitlines()) if log.exists() else 0)
        return real_loss(*a, **k)

    monkeypatch.setattr(losses, "pixel_ssr_loss", read_the_log)
    _fit(root, out, epochs=1)
    assert seen == list(range(len(seen))) and len(seen) > 1


@pytest.mark.parametrize("bad_step", [1, 5])  # before the first epoch's last.pt, and after it
def test_a_non_finite_loss_stops_the_run_in_one_sentence_naming_what_was_kept(tmp_path, monkeypatch, capsys, bad_step):
    real, calls = train.train_step, [0]

    def nan_at_bad_step(*a, **k):
        calls[0] += 1
        loss, terms = real(*a, **k)
        return (loss * float("nan"), terms) if calls[0] == bad_step else (loss, terms)

    monkeypatch.setattr(train, "train_step", nan_at_bad_step)
    out = tmp_path / "run"
    assert train.main(_fit_argv(_demo_dir(tmp_path), out, epochs=2)) != 0
    err = capsys.readouterr().err
    assert f"the loss became nan at step {bad_step - 1}" in err and "Traceback" not in err
    kept = (out / "last.pt").is_file()
    assert kept == (bad_step == 5) and ("holds the last good state" in err) == kept
    assert ("no checkpoint was saved yet" in err) != kept


def test_a_new_run_in_a_folder_with_a_cut_short_log_keeps_only_its_own_steps(tmp_path):
    """A run cut before its first checkpoint leaves log.jsonl and no last.pt; a new fit into that folder
    (as `table` starts one) logs steps 1, 2, ... alone, not after the dead run's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    ckpt = _fit(_demo_dir(tmp_path), out, epochs=1)
    assert [r["step"] for r in _log_losses(out)] == list(range(1, ckpt["step"] + 1))


def test_learning_curve_starts_at_the_untrained_network_and_ends_at_the_saved_one(tmp_path):
    """--val-every N logs the validation PSNR at step 0, every N steps and at the end; the first point is
    the network before any step, the last is the one in last.pt."""
    root = _demo_dir(tmp_path)
    out = tmp_path / "run"
    _fit(root, out, "--val-every", "1", "--val-scenes", "demo_01", epochs=2)
    curve = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_psnr"]) for r in curve if "val_psnr" in r]
    ckpt = runs.load_checkpoint(str(out / "last.pt"))
    assert [s for s, _ in curve] == list(range(ckpt["step"] + 1))
    cfg, srf = train.TrainConfig(**ckpt["train_config"]), torch.from_numpy(cameras.srf_matrix())
    val = {"demo_01": np.load(root / "demo_01.npy")}
    torch.manual_seed(cfg.seed)
    untrained = backbones.network(P.Config(**ckpt["model_config"]))
    for model, (_, psnr) in ((untrained, curve[0]), (runs.build_model(ckpt, torch.device("cpu")), curve[-1])):
        model.to(memory_format=torch.channels_last)  # as fit trains and validates (the layout changes the rounding)
        assert train.validate(model, val, srf, cfg, ckpt["gamma"], "gamma") == pytest.approx(psnr, abs=1e-9)


def test_ema_is_the_decayed_average_of_the_weights():
    torch.manual_seed(0)
    ema, model = P.DyProMamba(P.Config()), P.DyProMamba(P.Config())
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    train.update_ema(ema, model, 0.75)
    for k, v in ema.state_dict().items():  # ema <- 0.75 ema + 0.25 model
        torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * model.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_eval_builds_the_weight_average_when_the_run_kept_one(tmp_path):
    root = _demo_dir(tmp_path)
    _fit(root, tmp_path / "run", "--ema", "0.5")
    ckpt = runs.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    built = runs.build_model(ckpt, torch.device("cpu")).state_dict()
    assert all(torch.equal(built[k], ckpt["ema"][k]) for k in built)


def test_label_sets_are_fixed_counted_and_drawn_only_from_training_scenes(tmp_path):
    """The checkpoint's label sets: one per training scene (none for test or validation scenes), the
    promised count, the seeded draw, the scene's own spectra; and Gamma(alpha, theta) is the moment fit of
    those labelled spectra alone (not of every training spectrum, which the run must not read)."""
    root = _demo_dir(tmp_path)
    out = tmp_path / "run"
    ckpt = _fit(root, out, "--label-ratio", "0.01", "--val-scenes", "demo_01")
    assert set(ckpt["labels"]) == {"demo_00"} and ckpt["split"]["test"] == ["demo_02"]
    coords = ckpt["labels"]["demo_00"]["coords"].numpy()
    assert len(coords) == max(1, int(0.01 * 48 * 48))
    np.testing.assert_array_equal(coords, labels.draw_label_set(48, 48, 0.01, labels.scene_seed(0, "demo_00")))
    cube = np.load(root / "demo_00.npy")
    np.testing.assert_allclose(ckpt["labels"]["demo_00"]["spectra"].numpy(), cube[coords[:, 0], coords[:, 1]])
    labelled = cube[coords[:, 0], coords[:, 1]].astype(np.float64)
    m, v = labelled.mean(), labelled.var()
    assert ckpt["gamma"] == pytest.approx([m * m / v, v / m], rel=1e-9)
    assert (out / "best.pt").is_file()  # validation scenes choose best.pt


def _coded_demo_dir(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three 48 x 48 demo scenes whose bands 0, 1 and 2 say which pixel a spectrum came from: (row + 1) / 256,
    (col + 1) / 256 and (scene + 1) / 16, exact in float32, so that a labelled spectrum names its origin after
    any crop, flip or rotation."""
    cubes = {}
    for i, (name, cube) in enumerate(data.demo_scenes(n=3, size=64)):
        cube = cube[:48, :48].copy()
        cube[..., 0] = (np.arange(48)[:, None] + 1) / 256
        cube[..., 1] = (np.arange(48)[None, :] + 1) / 256
        cube[..., 2] = (i + 1) / 16
        cubes[name] = cube
    return _scene_dir(tmp_path, cubes), cubes


def _loss_input_spy(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Records (rgb, target, mask) of every call of losses.pixel_ssr_loss, passing the call through unchanged."""
    calls, real_loss = [], losses.pixel_ssr_loss

    def spy(*a, **k):
        calls.append(tuple(t.detach().cpu().clone() for t in (a[1], a[4], a[5])))
        return real_loss(*a, **k)

    monkeypatch.setattr(losses, "pixel_ssr_loss", spy)
    return calls


def _spied_fit(tmp_path, monkeypatch, ratio: str) -> tuple[Path, Path, dict, list]:
    """One epoch on the demo crops at --label-ratio ratio, the loss's inputs recorded: (data folder, run
    folder, its last.pt, the loss calls)."""
    root, out = _demo_dir(tmp_path), tmp_path / "run"
    calls = _loss_input_spy(monkeypatch)
    return root, out, _fit(root, out, "--label-ratio", ratio), calls


def test_the_loss_sees_only_the_runs_fixed_labelled_pixels_in_every_epoch(tmp_path, monkeypatch):
    """Over two epochs, every pixel the loss is told is labelled (its mask) carries the spectrum of a pixel of
    the fixed label set saved in the checkpoint, and only that pixel's own spectrum; so the labelled pixels
    seen never grow beyond that set, wherever the patches fall. Tested through the training loop with a spy
    on the loss's inputs. Guards against label sets redrawn every epoch (seeded with the epoch), which over
    the epochs leaks the whole image; one epoch, or a resume that replays the redraw, cannot show it."""
    root, cubes = _coded_demo_dir(tmp_path)
    calls = _loss_input_spy(monkeypatch)
    out = tmp_path / "run"
    ckpt = _fit(root, out, "--label-ratio", "0.01", epochs=2)
    assert len(calls) == ckpt["step"] >= 2
    fixed = {(name, r, c) for name, v in ckpt["labels"].items() for r, c in v["coords"].tolist()}
    assert set(ckpt["labels"]) == {"demo_00", "demo_01"}
    assert all(len(v["coords"]) == P.num_points(48, 48, 0.01) for v in ckpt["labels"].values())
    seen = set()
    for _, target, mask in calls:
        for i, _, y, x in torch.nonzero(mask).tolist():
            spectrum = target[i, :, y, x].numpy()
            r, c, scene = (int(round(float(v))) - 1 for v in spectrum[:3] * (256, 256, 16))
            name = f"demo_{scene:02d}"
            assert (name, r, c) in fixed, f"{name} pixel {(r, c)} is not in the run's label set"
            np.testing.assert_array_equal(spectrum, cubes[name][r, c])  # that pixel's own spectrum, whole
            seen.add((name, r, c))
    assert seen  # and the loss did see labels


def test_unsupervised_mode_has_no_labels_and_fits_gamma_to_the_rgb(tmp_path, monkeypatch):
    """omega = 0: no label set, the loss never sees a labelled pixel, and Gamma(alpha, theta) is the
    method-of-moments fit of the training scenes' RGB values (computed here in numpy from the cubes), not of
    their spectra. Guards against the unsupervised Gamma fitted to the hidden training spectra, which the
    unsupervised mode must never read (a check that alpha, theta are finite and positive accepts it)."""
    root, out, ckpt, calls = _spied_fit(tmp_path, monkeypatch, "0")
    assert all(len(v["coords"]) == 0 for v in ckpt["labels"].values())
    assert calls and not any(mask.any() for _, _, mask in calls)
    s = cameras.srf_matrix().astype(np.float64)
    rgb = np.concatenate([(np.load(root / f"{n}.npy").astype(np.float64) @ s.T).ravel() for n in ("demo_00", "demo_01")])
    m, v = rgb.mean(), rgb.var()
    assert ckpt["gamma"] == pytest.approx([m * m / v, v / m], rel=1e-5)


def test_image_level_run_keeps_the_rule_not_the_spectra_and_every_pixel_supervises(tmp_path, monkeypatch):
    """--label-ratio 1: the checkpoint holds {"every_pixel": (H, W)} per scene, not the spectra (a ~0.8 GB
    file on CAVE, rewritten every epoch); every pixel of every patch reaches L_pHSI with its own spectrum; no
    point cube by default (the paper's supervised baselines); eval re-derives the labels for its regression."""
    _, run, ckpt, calls = _spied_fit(tmp_path, monkeypatch, "1")
    assert {n: v["every_pixel"].tolist() for n, v in ckpt["labels"].items()} == {"demo_00": [48, 48], "demo_01": [48, 48]}
    assert ckpt["model_config"]["points"] == "zeros"
    assert calls and all(mask.all() for _, _, mask in calls)
    assert all(torch.equal(target, target * mask) and (target.sum(1) > 0).all() for _, target, mask in calls)
    report = _eval(run, tmp_path / "ev")
    assert report["labelled_pixels"] == 2 * 48 * 48 and "root_poly_baseline" in report


@needs_data
def test_unsupervised_mode_trains_the_prior_and_eval_reports_the_smoothest_baseline(tmp_path, monkeypatch):
    """--label-ratio 0 on real crops: the loss has the smoothness prior (weight saved with the run), no label
    reaches it, and eval reports the smoothest-spectrum answer beside the network (there are no labels for
    a regression)."""
    root, run = _real_crops(tmp_path), tmp_path / "run"
    terms = []
    monkeypatch.setattr(losses, "pixel_ssr_loss", lambda *a, _real=losses.pixel_ssr_loss: terms.append(_real(*a)[1]) or _real(*a))
    ckpt = _fit(root, run, "--label-ratio", "0", test=REAL_TEST, patches=FEW_STEPS)
    assert losses.parse_weights(ckpt["train_config"]["loss_weights"])["smooth"] > 0
    assert terms and all("smooth" in t and t["phsi"] == 0 for t in terms)
    report = _eval(run, tmp_path / "ev")
    assert "smoothest_baseline" in report and "root_poly_baseline" not in report


@needs_data
def test_fit_eval_predict_end_to_end_on_real_crops(real_run, tmp_path):
    run, ev, pr, report = real_run.run, real_run.eval, tmp_path / "pred", real_run.report
    assert list(report["scenes"]) == [REAL_TEST] and report["seeds"] == [0, 1]
    assert {"rmse", "psnr", "psnr_bandwise", "ssim", "sam", "mrae"} <= set(report["overall"])
    assert set(real_run.ckpt) == {*runs.CHECKPOINT_KEYS, "provenance"}
    assert "root_poly_baseline" in report  # 115 labelled pixels in 3 scenes: enough to fit it
    cube = data.load_scene(ev / REAL_TEST / "cube.mat")
    np.testing.assert_allclose(cube, np.load(ev / REAL_TEST / "cube.npy"))
    assert cube.shape == (64, 64, 31)
    assert scipy.io.loadmat(ev / REAL_TEST / "cube.mat")["wavelengths"].size == 31
    for f in ("preview.png", "error_rmse_0-0.1.png", "spectra.csv"):
        assert (ev / REAL_TEST / f).is_file()
    assert train.main(["predict", "--ckpt", str(run / "last.pt"), "--rgb", str(ev / REAL_TEST / "preview.png"),
                       "--out", str(pr), "--tile", "48"]) == 0
    assert np.load(pr / "cube.npy").shape == (64, 64, 31)


def _log_losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@needs_data
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_gloo_processes_train_the_weights_of_one_process(real_run, tmp_path):
    """`torchrun --nproc_per_node 2 train.py fit` on CPU (gloo) with real_run's settings (6 steps of batch 2,
    one sample per process, 1 % labels spread unevenly among the patches): rank 0 logs the same steps and
    whole-batch loss terms as the single process, and ends with its weights up to float rounding, which
    Adam magnifies where a gradient is near 0 (2.3e-6 measured; L_pHSI averaged per process: 7e-4)."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *_fit_argv(real_run.root, out, *real_run.fit_flags, test=REAL_TEST)],
                          cwd=Path(__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training on") == 1  # rank 0 alone prints (and writes)
    one, two = _log_losses(real_run.run), _log_losses(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for r1, r2 in zip(one, two):
        assert {k: r2[k] for k in r1} == pytest.approx(r1, rel=1e-5)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == real_run.ckpt["step"]
    diff = max((ckpt["model"][k] - v).abs().max().item() for k, v in real_run.ckpt["model"].items())
    assert diff < train.TrainConfig().lr / 10, f"largest weight difference {diff:.3g}"


def test_the_slices_shares_add_up_to_the_whole_batchs_loss_terms_and_gradient():
    """A batch of 4 split among 3 ranks (slices of 1, 1 and 2 samples) with its labelled pixels spread
    unevenly (0, 1 and 7): the slices' shares of each term add up to the whole batch's term, and their
    gradients to its gradient. Guards against per-slice means averaged over the ranks, which would weigh
    each label by 1 / its slice's label count (and the slices by 1 / their number, whatever their size)."""
    m = _model()
    rgb, pts = _inputs(4, 8, 8)
    mask = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    mask[1, 0, 2, 3] = mask[2, 0, :2, :2] = mask[3, 0, 5, 1:4] = True
    target = torch.rand(4, 31, 8, 8, generator=torch.Generator().manual_seed(1)) * mask
    batch, srf, w = (rgb, target, mask), torch.from_numpy(cameras.srf_matrix()), losses.LOSS_WEIGHTS
    parts = [runs.Ranks(r, 3).part(4) for r in range(3)]
    assert parts == [slice(0, 1), slice(1, 2), slice(2, 4)]

    def terms_and_grads(part: slice):
        terms = train.slice_loss(m, batch, pts, srf, w, part)
        return terms, torch.autograd.grad(sum(w[k] * v for k, v in terms.items()), list(m.parameters()))

    whole, whole_grads = terms_and_grads(slice(0, 4))
    sliced = [terms_and_grads(part) for part in parts]
    for k, v in whole.items():
        assert sum(t[k] for t, _ in sliced).item() == pytest.approx(v.item(), rel=1e-6), k
    scale = max(g.abs().max().item() for g in whole_grads)
    for i, g in enumerate(whole_grads):
        _assert_close(sum(grads[i] for _, grads in sliced), g, 1e-5, f"gradient {i}", scale=scale)


def test_bf16_training_step_runs_the_network_in_bf16_and_the_losses_and_weights_in_float32(monkeypatch):
    """train_step(amp="bf16") on CPU: the network's convolutions ran in bfloat16, the losses saw float32
    outputs with autocast off, and the weights (what checkpoints save) are float32 after the Adam step."""
    m = _model()
    rgb, pts = _inputs(2, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, 0, 3, 4] = True
    batch = (rgb, torch.rand(2, 31, 8, 8) * mask, mask)
    seen, real_loss = {}, losses.pixel_ssr_loss
    m.body.out.register_forward_hook(lambda mod, inp, out: seen.__setitem__("conv", out.dtype))

    def loss_spy(model, rgb, hsi, y3, *a, **k):
        seen["loss"] = (hsi.dtype, y3.dtype, torch.is_autocast_enabled("cpu"))
        return real_loss(model, rgb, hsi, y3, *a, **k)

    monkeypatch.setattr(losses, "pixel_ssr_loss", loss_spy)
    before = copy.deepcopy(m.state_dict())
    loss, _ = train.train_step(m, torch.optim.Adam(m.parameters()), batch, pts, torch.from_numpy(cameras.srf_matrix()),
                               1e-3, losses.LOSS_WEIGHTS, amp="bf16")
    assert torch.isfinite(loss) and seen["conv"] == torch.bfloat16
    assert seen["loss"] == (torch.float32, torch.float32, False)
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())
    assert not torch.equal(m.body.out.weight, before["body.out.weight"])  # the step was taken


def test_learning_rate_decays_polynomially_to_zero():
    cfg = train.TrainConfig()
    assert train.get_lr(0, 100, cfg) == cfg.lr and train.get_lr(100, 100, cfg) == 0
    assert train.get_lr(50, 100, cfg) == pytest.approx(cfg.lr * 0.5**1.5)


def test_warm_up_rises_linearly_then_the_decay_takes_over():
    cfg = dataclasses.replace(train.TrainConfig(), warmup=10)
    assert train.get_lr(0, 100, cfg) == pytest.approx(cfg.lr / 10)
    assert train.get_lr(4, 100, cfg) == pytest.approx(cfg.lr / 2 * (1 - 0.04) ** 1.5)
    assert train.get_lr(50, 100, cfg) == pytest.approx(cfg.lr * 0.5 ** 1.5)


def test_time_budget_schedule_ends_at_the_budget(monkeypatch):
    """Guards against a --max-minutes schedule sized from the slow first steps (which stopped at 16 of 30
    minutes): steps of 2 s then 1 s in a 100 s budget end the schedule at the ~97 steps that fit."""
    clock = [0.0]
    monkeypatch.setattr(runs.time, "time", lambda: clock[0])
    budget, step, total = runs.Budget(100 / 60, sized=True), 0, 10**6
    while step < total and not budget.out_of_time():
        clock[0] += 2.0 if step < 3 else 1.0
        step += 1
        total = budget.total_steps(step, step, total)
    assert total == step == 97 and clock[0] <= 100


def test_exposure_augmentation_scales_rgb_and_spectra_together():
    """Guards against scaling one side only (X = S.Y broken) or a factor outside [1/k, k]."""
    hsi = torch.rand(64, 31, 4, 4)
    rgb = cameras.rgb_from_hsi(hsi, "cie1964")
    r2, h2 = labels.augment_exposure(rgb, hsi, 2.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r2, cameras.rgb_from_hsi(h2, "cie1964"), rtol=1e-5, atol=1e-6)
    scale = (h2 / hsi).flatten(1)
    assert torch.allclose(scale, scale[:, :1]) and scale.min() >= 0.5 - 1e-6 and scale.max() <= 2 + 1e-6
    assert scale.std() > 0.1


def test_rootpoly_prior_starts_at_the_baseline_fitted_on_the_runs_labels(tmp_path):
    """Guards against a prior fitted on other pixels than the run's labels, or one that the network does
    not start from: a fresh model with --prior rootpoly outputs |M(X)|, M = fit_root_poly(labels)."""
    root = _demo_dir(tmp_path)
    run = tmp_path / "run"
    _fit(root, run, "--label-ratio", "0.01", "--prior", "rootpoly", "--lr", "1e-12")
    ckpt = runs.load_checkpoint(str(run / "last.pt"))
    lab = ckpt["labels"].values()
    expected = evaluate.fit_root_poly(torch.cat([v["rgb"] for v in lab]).numpy(), torch.cat([v["spectra"] for v in lab]).numpy())
    np.testing.assert_allclose(ckpt["model"]["prior"].numpy(), expected, rtol=1e-5, atol=1e-6)
    model = runs.build_model(ckpt, torch.device("cpu"))
    rgb = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        out = model(rgb, torch.zeros(1, 31, 16, 16))[0]
    base = torch.from_numpy(P.root_poly_features(rgb[0].permute(1, 2, 0).reshape(-1, 3).numpy()) @ expected)
    torch.testing.assert_close(out[0].permute(1, 2, 0).reshape(-1, 31), base.float().abs(), rtol=1e-3, atol=1e-4)


def test_prior_library_fits_the_prior_on_labels_and_colorchecker_and_eval_scores_that_map(tmp_path):
    """--prior-library colorchecker: the prior's map is the least-squares fit of the run's labels and the
    24 ColorChecker spectra (each with its RGB S.y), here numpy's lstsq on those 26 rows and the
    ridge's (2 labels: too few alone); eval scores that map beside the labels' regression, as numpy does."""
    root, run = _demo_dir(tmp_path), tmp_path / "run"
    _fit(root, run, "--label-ratio", "0.0001", "--prior", "rootpoly", "--prior-library", "colorchecker")
    ckpt = runs.load_checkpoint(str(run / "last.pt"))
    s = cameras.srf_matrix("cie1964").astype(np.float64)
    spectra = np.concatenate([*(v["spectra"].double().numpy() for v in ckpt["labels"].values()), cameras.COLORCHECKER.T])
    rgb = np.concatenate([*(v["rgb"].double().numpy() for v in ckpt["labels"].values()), cameras.COLORCHECKER.T @ s.T])
    assert len(spectra) == 26
    feats = P.root_poly_features(rgb)  # the ridge of evaluate.fit_root_poly, as the rows sqrt(ridge) I and 0
    m = np.linalg.lstsq(np.vstack([feats, 1e-3 * np.eye(6)]), np.vstack([spectra, np.zeros((6, 31))]), rcond=None)[0]
    np.testing.assert_allclose(feats @ ckpt["model"]["prior"].double().numpy(), feats @ m, atol=1e-4)
    report = _eval(run, tmp_path / "eval")
    truth = data.load_scenes(root, ["demo_02"])["demo_02"].astype(np.float64)
    pred = np.clip(P.root_poly_features(truth @ s.T) @ m, 0, 1)
    expected = 10 * np.log10(1 / np.mean((pred - truth) ** 2))
    assert report["root_poly_library_baseline"]["psnr"]["mean"] == pytest.approx(expected, abs=1e-3)
    assert "root_poly_baseline" not in report  # 2 labels: too few for the labels' own regression


# one fit per flag set: the switches of Tables 3-6 reach the checkpoint, and eval rebuilds that network
_FLAG_SETS = {
    "no_spa_no_prompt_ssm_gaussian": (["--no-spa", "--no-prompt-ssm", "--points", "gaussian"],
                                      {"use_spa": False, "use_prompt_ssm": False, "points": "gaussian"}),
    "no_hf_no_spe_fft_no_ssim": (["--no-hf", "--no-spe", "--spa-transform", "fft", "--loss-weights", "ssim=0"],
                                 {"use_hf": False, "use_spe": False, "spa_transform": "fft"}),
    "no_drpn": (["--no-drpn"], {"use_drpn": False, "h2r": False}),
    "measured_points": (["--measured-points", "0.5"], {}),
}


@pytest.mark.parametrize("flags", _FLAG_SETS)
def test_every_fit_flag_is_saved_in_the_checkpoint_and_eval_rebuilds_that_network(flags, tmp_path, monkeypatch):
    """Each flag lands in the checkpoint's model config, the weights saved are that network's, and eval builds
    exactly that network (its parameters are the checkpoint's, strictly) and runs it. Loss weights of 0 are
    saved as given, and without the DRPN L_P2I's weight is saved as 0."""
    argv, fields = _FLAG_SETS[flags]
    root, run = _demo_dir(tmp_path), tmp_path / "run"
    ckpt = _fit(root, run, *argv)
    assert {k: ckpt["model_config"][k] for k in fields} == fields
    assert ckpt["train_config"]["measured_points"] == (0.5 if "--measured-points" in argv else 0)
    assert ckpt["train_config"]["pair_patches"] == ("--measured-points" in argv)
    weights = losses.parse_weights(ckpt["train_config"]["loss_weights"])
    assert weights["ssim"] == (0 if "ssim=0" in argv else 0.3) and weights["p2i"] == (0 if "--no-drpn" in argv else 0.3)
    built = []
    monkeypatch.setattr(evaluate, "build_model", lambda *a, _real=runs.build_model: built.append(_real(*a)) or built[-1])
    _eval(run, tmp_path / "ev")
    assert dataclasses.asdict(built[0].cfg) == ckpt["model_config"]
    state = built[0].state_dict()
    assert state.keys() == ckpt["model"].keys() and all(torch.equal(v.cpu(), ckpt["model"][k]) for k, v in state.items())


def test_resume_refuses_a_flag_that_contradicts_the_run_and_takes_a_new_time_budget(tmp_path, capsys):
    """--resume continues a run with its own settings: a new --epochs (once silently dropped), a switch or a
    loss weight that differs is one line naming the flag and exit code 2; the same values again, or a new
    --max-minutes (the session's budget), are accepted."""
    root, run = _demo_dir(tmp_path), tmp_path / "run"
    _fit(root, run, "--loss-weights", "ssim=0")

    def resume(*flags: str) -> int:  # no --epochs: the run's own unless flags give one
        return train.main(_fit_argv(root, run, "--resume", *flags, epochs=None))

    capsys.readouterr()
    for flags, named in ((["--epochs", "2"], "--epochs"), (["--no-spa"], "--no-spa"), (["--loss-weights", "ssim=0.3"],
                         "--loss-weights"), (["--test-scenes", "demo_01"], "--test-scenes")):
        assert resume(*flags) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err and "contradicts" in err and "Traceback" not in err
    assert resume("--epochs", "1", "--loss-weights", "rep=1,ssim=0", "--max-minutes", "5") == 0


@needs_data
@pytest.mark.parametrize("backbone", list(backbones.BODIES))
def test_every_backbone_fits_two_steps_and_evaluates_on_a_real_crop(backbone, tmp_path):
    """With the shared DRPN, point spectra and losses: two training steps on real crops, then eval's report."""
    root, run = _real_crops(tmp_path), tmp_path / "run"
    mae = ["--mae-init", "random"] if backbone == "maektsr" else []  # test_pretrain.py fits it with a pre-trained one
    ckpt = _fit(root, run, "--label-ratio", "0.01", "--backbone", backbone, *mae, test=REAL_TEST, patches=FEW_STEPS)
    assert ckpt["step"] == 2 and ckpt["model_config"]["backbone"] == backbone
    report = _eval(run, tmp_path / "ev")
    assert math.isfinite(report["overall"]["psnr"]["mean"])


@pytest.mark.parametrize("argv,words", [
    (["fit", "--data", "/no/such/folder", "--out", "{tmp}/r"], "/no/such/folder"),
    (["eval", "--ckpt", "{tmp}/missing.pt"], "missing.pt"),
    (["predict", "--ckpt", "{tmp}/bad.pt", "--rgb", "x.png"], "bad.pt"),
    (["fit", "--data", "{tmp}/nan", "--out", "{tmp}/r"], "nan_scene.npy"),
    (["eval", "--ckpt", "{tmp}/foreign.pt"], "foreign.pt"),
    (["fit", "--out", "{tmp}/r", "--test-scenes", "no_such_scene"], "no_such_scene"),
    (["fit", "--out", "{tmp}/r", "--device", "cuda:7"], "cuda:7"),
    (["fit", "--out", "{tmp}/r", "--loss-weights", "phsi=1,sim=0.3"], "'sim'"),
    (["fit", "--out", "{tmp}/r", "--exposure", "0.5"], "--exposure"),
    (["fit", "--out", "{tmp}/r", "--measured-points", "1"], "--measured-points"),
    (["fit", "--out", "{tmp}/r", "--label-ratio", "1", "--measured-points", "0.5"], "--measured-points"),
    (["fit", "--out", "{tmp}/r", "--prior-library", "colorchecker", "--epochs", "1"], "--prior rootpoly"),
    (["fit", "--out", "{tmp}/r", "--prior", "rootpoly", "--label-ratio", "0.0001"], "--prior-library"),
])
def test_bad_input_is_one_sentence_naming_the_file_or_flag_and_no_traceback(tmp_path, capsys, argv, words):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "nan").mkdir()
    cube = np.full((40, 40, 31), 0.5, np.float32)
    cube[3, 4, 5] = np.nan
    np.save(tmp_path / "nan" / "nan_scene.npy", cube)
    assert train.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["eval", "--ckpt", "x.pt", "--seeds", "0"], ["fit", "--batch-size", "0"],
                                  ["fit", "--stride", "-4"]])
def test_non_positive_counts_are_refused_by_the_command_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and "not a positive integer" in capsys.readouterr().err
