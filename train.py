"""
Train Pixel-SSR, and the command line of every job: `python train.py [fit|eval|predict|table|pretrain] ...`.

  python train.py                                   # built-in demo: short fit on synthetic scenes, then eval
  python train.py fit --data DIR --out RUN [--label-ratio 0.0001] [--epochs N | --max-minutes M] [--resume]
  python train.py eval --ckpt RUN/last.pt --out DIR [--seeds K] [--scenes A B ...]        # evaluate.py
  python train.py predict --ckpt CKPT --rgb IMAGE --out DIR [--points FILE.csv]           # predict.py
  python train.py table NAME --data DIR --out DIR [--max-minutes M] [--seeds K]           # tables.py
  python train.py pretrain --source points|cubes --data DIR --out PRE  # MAE-KTSR stage 1, pretrain.py
  python train.py fit --backbone maektsr --mae-ckpt PRE/encoder.pt ...  # its stage 2 (maektsr.py)

This file is the training script, read top to bottom: the run's settings (TrainConfig), the learning
rate, the training loop (fit), then the pieces of a step, the checks of a run's flags, the command line.
The protocol (paper Sec. 3.1 and 4.1; docs/design.md):
  - every training scene gets one fixed set of max(1, floor(omega.H.W)) labelled pixels, drawn once
    from the run seed and saved in the checkpoint (labels.py): a spectrometer measures fixed points;
  - the network input is a fresh sparse Gamma cube every step, Gamma(alpha, theta) fitted to the
    labelled spectra by moments; evaluation fixes it by seed;
  - Adam (2e-4, betas 0.9/0.99), polynomial decay with power 1.5 to zero, batch 8 of 128x128 patches,
    each cut around one of its scene's labelled pixels (the paper's "one point spectrum per patch");
  - validation scenes (taken out of training) pick best.pt; test scenes never choose anything;
  - --label-ratio 1 is image-level supervision, 0 the unsupervised mode (Table 2).
Exact resume: every random choice of a step (batch order, augmentation, Gamma cube) is drawn from a
generator seeded by (run seed, epoch, step), so a checkpoint needs no RNG state to continue exactly.

Glossary: omega = --label-ratio; Y^p = the labelled spectra (target, at mask); X = rgb = S.Y with S the
spectral response (--srf); Y^r = the network's HSI; alpha, theta = the Gamma's shape and scale; M = the
root-polynomial map of the classical baseline and of the opt-in --prior rootpoly (evaluate.prior_map).
"""

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import backbones
import cameras
import data
import evaluate
import losses
import maektsr
import pixelssr as P
import predict
import pretrain
import tables
from labels import PatchDataset, augment_exposure, expand_label_sets, gamma_params, make_label_sets
from runs import (Budget, Ranks, UsageError, add_run_flags, autocast, drop_log_after, keep_freed_cpu_memory,
                  load_checkpoint, load_weights, parse_run_args, positive, provenance, refuse_contradiction, save_atomic,
                  seeded, share, slice_shares, start_ranks, unwrap)


@dataclasses.dataclass
class TrainConfig:
    label_ratio: float = 1e-4       # omega: 0.01 %, the paper's headline setting (Table 1)
    epochs: int = 200               # paper Sec. 4.1
    max_minutes: float = 0.0        # > 0: stop after this long; alone, it also sets the lr schedule's length
    batch_size: int = 8             # patches per step
    patch: int = 128                # the paper's minimum input size
    stride: int = 64                # patch positions of an epoch
    lr: float = 2e-4                # Adam, paper Sec. 4.1
    lr_power: float = 1.5           # polynomial decay to zero, paper Sec. 4.1
    seed: int = 0                   # label sets, init, batches, augmentation, Gamma cubes
    srf: str = "cie1964"            # S: RGB = S.Y (NTIRE 2020 "clean" convention)
    points: str = "gamma"           # input point spectra: gamma, gaussian or zeros (Table 3 ablation)
    val_seeds: int = 1              # Gamma draws per validation scene
    val_every: int = 0              # > 0: also validate every this many steps (a learning curve in log.jsonl)
    label_patches: bool = True      # cut each patch around one of its scene's fixed labels (paper: one per patch)
    pair_patches: bool = False      # and around a second label within reach where one is (not the paper's; on
                                    # with measured_points, so that a fed label has an unfed one beside it)
    loss_weights: str = "phsi=1,rep=1,ssim=0.3,p2i=0.3"  # Eq. (15): 1, beta1, beta2, beta3
    warmup: int = 0                 # linear lr warm-up steps (the paper has none)
    exposure: float = 1.0           # > 1: scale each sample's RGB and spectra by a factor in [1/k, k]
    ema: float = 0.0                # > 0: validate, save and evaluate an average of the weights with this decay
    amp: str = "none"               # "bf16": the network's forward under bfloat16 autocast (GPUs; see autocast)
    mae_init: str = "pretrained"    # --backbone maektsr: its encoder from --mae-ckpt, or "random" (a capacity control)
    mae_ckpt: str = ""              # the encoder `train.py pretrain` wrote (OUT/encoder.pt)
    # beyond the paper: each labelled pixel of a patch enters its point cube with its true spectrum with this
    # probability, so that the network learns to use a spectrometer's points (eval --calib-points, predict --points)
    measured_points: float = 0.0
    prior_library: str = "none"     # --prior rootpoly's map also fitted on a reflectance library (beyond the paper)

def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Polynomial decay from cfg.lr to zero with power cfg.lr_power (paper Sec. 4.1), after a linear
    warm-up over the first cfg.warmup steps (none in the paper)."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    return warm * cfg.lr * (1 - min(step, total_steps) / total_steps) ** cfg.lr_power


# -----------------------------------------------------------------------------
# fit: the training loop

def fit(args: argparse.Namespace) -> Path:
    """Train one run (args from fit_args); under torchrun every rank runs this and rank 0 alone writes.
    Returns the checkpoint the run's result is: best.pt with validation scenes, else last.pt."""
    ranks, device = start_ranks(args.device)
    try:
        return fit_on(args, ranks, device)
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()


def fit_on(args: argparse.Namespace, ranks: Ranks, device: torch.device) -> Path:
    """fit's body on this process's rank and device: build or resume the run, train it to its budget,
    checkpoint each epoch; returns the result's checkpoint as fit does."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, cfg, mcfg, split = run_settings(args)
    if not split["train"]:
        raise UsageError(f"{args.data}: no training scenes left after the test/validation split.")
    if cfg.batch_size < ranks.world:
        raise UsageError(f"--batch-size {cfg.batch_size} cannot be split among {ranks.world} processes.")
    srf = torch.from_numpy(cameras.srf_matrix(cfg.srf))
    root = ckpt["data"] if ckpt is not None else args.data  # a resumed run reads its own data folder
    train_scenes = data.load_scenes(root, split["train"])
    val_scenes = data.load_scenes(root, split["val"])
    stored = ckpt["labels"] if ckpt is not None else make_label_sets(train_scenes, cfg.label_ratio, cfg.seed, srf)
    labels = expand_label_sets(stored, train_scenes, srf)
    gamma = tuple(ckpt["gamma"]) if ckpt is not None else gamma_params(labels, train_scenes, srf)

    dataset = PatchDataset([(train_scenes[n], labels[n]["coords"].numpy()) for n in split["train"]],
                           srf.numpy(), patch=cfg.patch, stride=cfg.stride, around_labels=cfg.label_patches,
                           pairs=cfg.pair_patches)
    steps_per_epoch = max(1, len(dataset) // cfg.batch_size)
    torch.manual_seed(cfg.seed)
    # channels-last weights, and so activations (a convolution's output takes its weight's layout): oneDNN's
    # own layout, where SS2D's permute to (b, h, w, c) costs no copy (docs/performance.md, "Channels-last").
    model = backbones.network(mcfg).to(device, memory_format=torch.channels_last)
    if model.prior is not None and ckpt is None:
        model.prior.copy_(torch.from_numpy(evaluate.prior_map(labels, cfg.prior_library, srf)))
    if cfg.mae_ckpt and ckpt is None:  # MAE-KTSR's stage 2: the pre-trained encoder, checked (pretrain.py)
        pretrain.attach_encoder(model.body, cfg.mae_ckpt, split, cfg.srf, labels, cfg.label_ratio, cfg.patch)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)
    run = {"model_config": dataclasses.asdict(mcfg), "train_config": dataclasses.asdict(cfg), "step": 0,
           "total_steps": cfg.epochs * steps_per_epoch, "best_psnr": -math.inf, "data": root, "split": split,
           "labels": stored, "gamma": list(gamma),  # with the weights and Adam's state: the checkpoint
           "provenance": ckpt["provenance"] if ckpt is not None and "provenance" in ckpt else provenance(device)}
    if ckpt is not None:
        load_weights(model, ckpt, "model", out / "last.pt")
        optimizer.load_state_dict(ckpt["optimizer"])
        run.update(step=ckpt["step"], total_steps=ckpt["total_steps"], best_psnr=ckpt["best_psnr"])
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None  # the weights validated and saved for eval
    if ema is not None and ckpt is not None:
        load_weights(ema, ckpt, "ema", out / "last.pt")
    srf_dev, weights = srf.to(device), losses.parse_weights(cfg.loss_weights)
    net = model if ranks.world == 1 else DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    judged = model if ema is None else ema  # the network validation scores and eval will build

    if ranks.main:
        print(f"training on {len(split['train'])} scenes ({', '.join(split['train'])}), "
              f"{sum(len(v['coords']) for v in labels.values())} labelled pixels, {len(dataset)} patches/epoch, "
              f"Gamma alpha={gamma[0]:.3f} theta={gamma[1]:.4f}, device {device}"
              + (f", {ranks.world} processes" if ranks.world > 1 else ""))
        if cfg.label_ratio == 0:
            print(UNSUPERVISED_WARNING)
        if ckpt is not None:
            drop_log_after(out / "log.jsonl", run["step"])  # the steps after last.pt are redone
    # line-buffered: each step lands; a new run starts its own log, not after a cut-short earlier one's steps
    log = open(out / "log.jsonl" if ranks.main else os.devnull, "a" if ckpt is not None else "w", buffering=1)
    budget = Budget(cfg.max_minutes, sized=cfg.max_minutes > 0 and not args.epochs_given and ckpt is None)
    pbar = tqdm(total=run["total_steps"], initial=run["step"], dynamic_ncols=True, disable=not ranks.main)
    first = run["step"]
    validating = bool(val_scenes) and ranks.main
    if validating and cfg.val_every and run["step"] == 0:  # the learning curve starts where training does
        validation(judged, val_scenes, srf, cfg, gamma, mcfg.points, run, log, out, model, optimizer, ema)
    while run["step"] < run["total_steps"]:
        step = run["step"]
        epoch, i = divmod(step, steps_per_epoch)
        batch, points, fed = draw_batch(dataset, epoch, i, cfg, gamma, mcfg.points, device)
        lr = get_lr(step, run["total_steps"], cfg)
        loss, terms = train_step(net, optimizer, batch, points, srf_dev, lr, weights, ranks, cfg.amp, fed)
        if not torch.isfinite(loss):
            kept = out / "last.pt"
            raise UsageError(f"{out}: the loss became {loss.item()} at step {step}; " + (
                f"{kept} holds the last good state." if kept.is_file() else "no checkpoint was saved yet."))
        if ema is not None:
            update_ema(ema, model, cfg.ema)
        step = run["step"] = step + 1
        total = budget.total_steps(step, step - first, run["total_steps"])
        run["total_steps"], out_of_time = ranks.agree([total, budget.out_of_time()])  # rank 0's clock decides
        pbar.total = run["total_steps"]
        pbar.update(1)
        pbar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()} | {"lr": f"{lr:.2e}"})
        log.write(json.dumps({"step": step, "epoch": epoch, "lr": lr, "loss": loss.item(),
                              **{k: v.item() for k, v in terms.items()}}) + "\n")
        end_of_epoch = step % steps_per_epoch == 0 or step == run["total_steps"] or out_of_time
        if validating and (end_of_epoch or (cfg.val_every and step % cfg.val_every == 0)):
            validation(judged, val_scenes, srf, cfg, gamma, mcfg.points, run, log, out, model, optimizer, ema)
        if end_of_epoch and ranks.main:
            save_atomic(checkpoint(run, model, optimizer, ema), out / "last.pt")
        if out_of_time:
            if ranks.main:
                print(f"\nstopped after {cfg.max_minutes} minutes at step {step}/{run['total_steps']}; "
                      f"--resume continues from {out / 'last.pt'}")
            break
    pbar.close()
    log.close()
    return out / ("best.pt" if val_scenes else "last.pt")


def checkpoint(run: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               ema: torch.nn.Module | None) -> dict:
    """What a checkpoint holds (runs.CHECKPOINT_KEYS): the run's settings and state, the weights, Adam's state."""
    return {**run, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {})}


def validation(judged, val_scenes: dict, srf: torch.Tensor, cfg: "TrainConfig", gamma, points: str, run: dict,
               log, out: Path, model, optimizer, ema) -> None:
    """Log the validation PSNR at this step (a learning curve) and keep the best state as best.pt."""
    psnr = validate(judged, val_scenes, srf, cfg, gamma, points)
    log.write(json.dumps({"step": run["step"], "val_psnr": psnr}) + "\n")
    if psnr > run["best_psnr"]:
        run["best_psnr"] = psnr
        save_atomic(checkpoint(run, model, optimizer, ema), out / "best.pt")


# -----------------------------------------------------------------------------
# the pieces of a step

def draw_batch(dataset: PatchDataset, epoch: int, i: int, cfg: TrainConfig, gamma: tuple[float, float],
               points: str, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor,
                                                            torch.Tensor | None]:
    """Batch i of an epoch, ((rgb, target, mask), point cube, fed), on the device; fed (b, 1, h, w): the
    labels whose true spectra are in the cube (--measured-points), else None. Every draw (the epoch's order,
    the patches' flips, the exposure, the points) is seeded by (seed, epoch, i), so a resumed run draws
    exactly what the uninterrupted one did."""
    order = torch.randperm(len(dataset), generator=seeded(cfg.seed, epoch))
    g = seeded(cfg.seed, epoch, i)
    rgb, target, mask = dataset.batch(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], g)
    rgb, target = augment_exposure(rgb, target, cfg.exposure, g)
    pts = P.sample_points(target.shape, cfg.label_ratio, *gamma, generator=g, dist=points, device=device)
    fed = None
    if cfg.measured_points:  # a random part of the patch's fixed labels, at their pixels, over the Gamma cube
        fed = (mask & (torch.rand(mask.shape, generator=g) < cfg.measured_points)).to(device)  # (b, 1, h, w)
        pts = torch.where(fed, target.to(device), pts)
    return tuple(t.to(device) for t in (rgb, target, mask)), pts, fed

def slice_loss(model, batch, points, srf, weights: dict, part: slice, amp: str = "none",
               fed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms of Eq. (15) on batch[part], each weighted by slice_shares into that slice's share of
    the whole batch's term: summed over the slices of a batch they are its terms, and so are their
    gradients. The forward runs under `autocast(amp)`, the losses in float32 (see there)."""
    rgb, target, mask = batch
    shares = slice_shares(mask, part)
    with autocast(amp, rgb.device):
        hsi, y3 = model(rgb[part], points[part], None if fed is None else fed[part])
    # The losses outside autocast, on float32 outputs (see autocast).
    _, terms = losses.pixel_ssr_loss(unwrap(model), rgb[part], hsi.float(), y3.float(), target[part], mask[part],
                                srf, weights)
    return {k: v * shares[k] for k, v in terms.items()}

def train_step(model, optimizer, batch, points, srf, lr: float, weights: dict, ranks: Ranks = Ranks(),
               amp: str = "none", fed: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One Adam step on one batch; returns the whole batch's loss and its terms (Eq. 15).

    Data parallel (ranks.world > 1, `model` wrapped in DistributedDataParallel): every rank holds the
    whole batch and runs its slice of it (slice_loss); the ranks' shares add up to the whole batch's
    loss. One process: the slice is the whole batch, every share 1.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    terms = slice_loss(model, batch, points, srf, weights, ranks.part(batch[0].shape[0]), amp, fed)
    loss = sum(weights[k] * v for k, v in terms.items())
    whole = dict(zip(terms, ranks.sum(torch.stack([v.detach() for v in terms.values()]))))
    whole_loss = sum(weights[k] * v for k, v in whole.items())
    if not torch.isfinite(whole_loss):  # the same decision on every rank
        return whole_loss, whole
    optimizer.zero_grad(set_to_none=True)
    # DistributedDataParallel averages the ranks' gradients; the whole batch's is their sum.
    (loss * ranks.world if ranks.world > 1 else loss).backward()
    optimizer.step()
    return whole_loss, whole

@torch.no_grad()
def update_ema(ema: P.DyProMamba, model: P.DyProMamba, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, weights and buffers alike (the prior map is a buffer
    that never changes, so averaging it is a no-op)."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        e.lerp_(m, 1 - decay)

def validate(model, val_scenes: dict, srf: torch.Tensor, cfg: "TrainConfig", gamma, points: str) -> float:
    """Mean whole-image PSNR over the validation scenes and cfg.val_seeds Gamma draws each."""
    model.eval()
    return float(np.mean([evaluate.eval_scene(model, h, srf, cfg.label_ratio, gamma, points, s)[1]["psnr"]
                          for h in val_scenes.values() for s in range(cfg.val_seeds)]))

# -----------------------------------------------------------------------------
# a run's settings: fit's flags, what the checkpoint keeps of them, what --resume may change

# the model Config fields that are fit flags of the same name (the switches as --no-spa etc.); with
# --points and the loss weights, every ablation of Tables 2-6 is a flag
MODEL_FLAGS = ("use_spa", "use_hf", "use_spe", "use_prompt_ssm", "use_drpn", "spa_transform", "backbone", "output", "prior",
               "use_isff", "mae_freeze", "point_path")

# --resume continues a run with its own settings: a flag that says otherwise is an error, except these,
# which belong to the session (the time budget, the device), not to the run
RESUME_MAY_CHANGE = {"max_minutes", "device", "resume", "out"}

# weight of the physical prior (smooth, non-negative spectra; losses.pixel_ssr_loss) in the unsupervised mode
UNSUPERVISED_PRIOR = 1.0

# said when such a run starts (what was measured of the mode: docs/results.md, "The three supervision modes")
UNSUPERVISED_WARNING = ("warning: unsupervised mode (--label-ratio 0): the classical smoothest non-negative spectrum "
                        "consistent with the RGB needs no training, and in every run measured so far the network "
                        "stayed below it; eval reports both side by side.")

def run_configs(args) -> tuple[TrainConfig, P.Config]:
    """The TrainConfig and model Config of a new run from fit's arguments, checked. Three settings follow
    from others: without the DRPN there is no Y3 for L_P2I to constrain, so that term's weight is 0 (and
    M_H2R is not built); at label ratio 0 (unsupervised) the loss adds the physical prior of smooth,
    non-negative spectra, since nothing else ties the spectra outside what the camera sees (unless
    --loss-weights says otherwise); at label ratio 1 (image-level supervision) the network gets no point
    cube unless --points is given, as the paper's supervised baselines."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    weights = losses.parse_weights(cfg.loss_weights)  # a typo stops the run here, not after the data is read
    if cfg.exposure < 1 or cfg.warmup < 0 or cfg.val_every < 0 or not 0 <= cfg.ema < 1:
        raise ValueError(f"--exposure must be >= 1 (got {cfg.exposure}), --warmup and --val-every >= 0 "
                         f"(got {cfg.warmup}, {cfg.val_every}), --ema in [0, 1) (got {cfg.ema}).")
    if not 0 <= cfg.label_ratio <= 1:
        raise ValueError(f"--label-ratio is a fraction of the pixels, from 0 to 1; got {cfg.label_ratio}.")
    if cfg.measured_points and not (0 < cfg.label_ratio < 1 and cfg.measured_points < 1):
        raise ValueError(f"--measured-points feeds a part of the labelled pixels to the network: it needs a label ratio "
                         f"between 0 and 1 (got {cfg.label_ratio}) and a share below 1, so that some labels are only "
                         f"scored (got {cfg.measured_points}).")
    if args.point_path and not cfg.measured_points and not args.resume:  # a resumed run keeps its own
        raise ValueError("--point-path learns from the labels fed beside the scored ones: it needs --measured-points.")
    if cfg.prior_library != "none" and args.prior != "rootpoly":
        raise ValueError("--prior-library is what --prior rootpoly's map is fitted on: it needs --prior rootpoly.")
    if not args.use_drpn and weights["p2i"]:
        if "loss_weights" in args.given:
            raise ValueError("--no-drpn leaves no Y3 for L_P2I to constrain: give it weight 0 (p2i=0).")
        weights["p2i"] = 0.0
    if cfg.label_ratio == 0 and "loss_weights" not in args.given:
        weights["smooth"] = UNSUPERVISED_PRIOR
    check_mae_flags(cfg, args)
    if cfg.measured_points and "pair_patches" not in args.given:
        cfg = dataclasses.replace(cfg, pair_patches=True)
    if cfg.label_ratio >= 1 and "points" not in args.given:
        cfg = dataclasses.replace(cfg, points="zeros")
    cfg = dataclasses.replace(cfg, loss_weights=losses.format_weights(weights))
    return cfg, P.Config(points=cfg.points, h2r=weights["p2i"] > 0, mae_window=cfg.patch,
                         **{k: getattr(args, k) for k in MODEL_FLAGS})

def check_mae_flags(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """MAE-KTSR's stage 2 takes its encoder from --mae-ckpt unless --mae-init random or --no-isff (no encoder);
    its flags mean nothing to another body. A resumed run keeps the encoder its checkpoint holds."""
    if args.resume:
        return
    mae_flags = sorted(args.given & {"use_isff", "mae_freeze", "mae_init", "mae_ckpt"})
    if args.backbone != "maektsr" and mae_flags:
        raise ValueError(f"{flag_name(mae_flags[0])} is a flag of --backbone maektsr; this run's body is "
                         f"{args.backbone}.")
    wants = args.backbone == "maektsr" and args.use_isff and cfg.mae_init == "pretrained"
    if wants and not cfg.mae_ckpt:
        raise ValueError("--backbone maektsr needs --mae-ckpt FILE (train.py pretrain writes OUT/encoder.pt), or "
                         "--mae-init random for an encoder that is not pre-trained, or --no-isff for the CNN alone.")
    if cfg.mae_ckpt and not wants:
        raise ValueError("--mae-ckpt is the encoder of --backbone maektsr with ISFF and --mae-init pretrained; "
                         "this run has no use for it.")
    token = maektsr.MAEConfig.patch
    if args.backbone == "maektsr" and args.use_isff and cfg.patch % token:  # a patch is one encoder window (A13)
        raise ValueError(f"--backbone maektsr encodes each --patch as one window of {token}-pixel tokens: give a "
                         f"--patch that is a multiple of {token} (got {cfg.patch}).")

def flag_name(dest: str) -> str:
    """fit's option for a setting: use_spa -> --no-spa, label_ratio -> --label-ratio."""
    return "--" + (f"no-{dest[4:]}" if dest.startswith("use_") else dest).replace("_", "-")

def check_resume(args, ckpt: dict) -> None:
    """Raise, in one sentence, if a flag given with --resume contradicts the checkpoint's run."""
    cfg, mcfg = run_configs(args)
    now = {**dataclasses.asdict(cfg), **dataclasses.asdict(mcfg), "loss_weights": losses.parse_weights(cfg.loss_weights)}
    was = {**dataclasses.asdict(TrainConfig()), **dataclasses.asdict(P.Config()),  # a field added since: its default
           **ckpt["train_config"], **ckpt["model_config"],
           "loss_weights": losses.parse_weights(ckpt["train_config"]["loss_weights"])}
    for role in ("test", "val"):  # scene lists compare as sets of names
        now[f"{role}_scenes"] = sorted(data.scene_name(n) for n in getattr(args, f"{role}_scenes") or [])
        was[f"{role}_scenes"] = sorted(ckpt["split"][role])
    now["data"] = str(Path(args.data).resolve()) if args.data else None
    was["data"] = str(Path(ckpt["data"]).resolve()) if ckpt["data"] else None
    for name in sorted(args.given - RESUME_MAY_CHANGE):
        if now[name] != was[name]:
            refuse_contradiction(flag_name(name), now[name], was[name])

def run_settings(args) -> tuple[dict | None, TrainConfig, P.Config, dict[str, list[str]]]:
    """(the checkpoint --resume continues, or None; the training and model configs; the scene split).
    A resumed run keeps its own settings and data folder, except the time budget, which belongs to this
    session; a new run takes them from the flags."""
    ckpt = load_checkpoint(Path(args.out) / "last.pt") if args.resume else None
    if ckpt is None:
        cfg, mcfg = run_configs(args)
        train, val, test = data.split_scenes(data.scene_names(args.data), args.test_scenes, args.val_scenes)
        return None, cfg, mcfg, {"train": train, "val": val, "test": test}
    check_resume(args, ckpt)
    cfg = dataclasses.replace(TrainConfig(**ckpt["train_config"]), max_minutes=args.max_minutes)
    return ckpt, cfg, P.Config(**ckpt["model_config"]), ckpt["split"]

# -----------------------------------------------------------------------------
# the command line

def add_arguments(f: argparse.ArgumentParser) -> None:
    """fit's flags; each sets the TrainConfig field, or the pixelssr.Config field, of its dest."""
    d = TrainConfig()
    add_run_flags(f, d, out="runs/pixelssr")
    f.add_argument("--lr-power", type=float, default=d.lr_power)
    f.add_argument("--val-seeds", type=positive, default=d.val_seeds)
    f.add_argument("--points", default=d.points, choices=["gamma", "gaussian", "zeros"])
    for name in ("val_every", "warmup"):
        f.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    f.add_argument("--exposure", type=float, default=d.exposure, help="exposure augmentation factor k >= 1")
    f.add_argument("--ema", type=float, default=d.ema, help="decay of a weight average used for eval (0: none)")
    f.add_argument("--measured-points", type=share, default=d.measured_points, metavar="P",
                   help="feed each labelled pixel of a patch into the point cube with its true spectrum with "
                        "probability P (beyond the paper: for eval --calib-points and predict --points); "
                        "implies --pair-patches unless --no-pair-patches")
    f.add_argument("--point-path", action="store_true",
                   help="with --measured-points: a last layer spreading the fed spectra to the pixels of their "
                        "material (beyond the paper; measured.py)")
    f.add_argument("--loss-weights", default=d.loss_weights, help="Eq. (15) weights, e.g. phsi=1,rep=1,ssim=0.3,p2i=0.3")
    f.add_argument("--label-patches", action=argparse.BooleanOptionalAction, default=d.label_patches,
                   help="cut each training patch around a labelled pixel (the label set stays fixed)")
    f.add_argument("--pair-patches", action=argparse.BooleanOptionalAction, default=d.pair_patches,
                   help="with --label-patches, cut each patch around a second labelled pixel within reach too, "
                        "where there is one (beyond the paper)")
    f.add_argument("--output", default=P.Config.output, choices=["abs", "linear"],
                   help="output layer: abs (non-negative, default) or linear (the paper's bare conv)")
    f.add_argument("--prior", default=P.Config.prior, choices=["none", "rootpoly"],
                   help="rootpoly: learn a correction to the root-polynomial map of the labels (beyond the paper)")
    f.add_argument("--prior-library", default=d.prior_library, choices=evaluate.PRIOR_LIBRARIES,
                   help="with --prior rootpoly: fit its map on the labels and these measured reflectances")
    add_model_flags(f)
    f.add_argument("--amp", default=d.amp, choices=["none", "bf16"],
                   help="bf16: the forward under bfloat16 autocast (GPUs), scan, FRFT and losses in float32")


def add_model_flags(f: argparse.ArgumentParser) -> None:
    """fit's flags for the network (Tables 2, 4 and 5); each sets the pixelssr.Config field of its dest."""
    f.add_argument("--backbone", default=P.Config.backbone, choices=list(backbones.BODIES),
                   help="the body after the DRPN (Table 2): dypro (the paper's), mst++, hscnn+, or maektsr "
                        "(MAE-KTSR's stage 2, pretrain.py)")
    for name, what in (("spa", "P_spa, the Spa-FRFT prompt"), ("hf", "P_hf, the Spa-HF prompt"),
                       ("spe", "P_spe, the spectral prompt"), ("prompt_ssm", "the PromptSSMs' prompted attention"),
                       ("drpn", "the whole DRPN (Y3 = the point cube; no L_P2I)")):
        f.add_argument(flag_name("use_" + name), dest="use_" + name, action="store_false", help=f"Table 4: without {what}")
    f.add_argument("--spa-transform", default=P.Config.spa_transform, choices=["frft", "fft"],
                   help="Table 5: the transform of the P_spa branch")
    f.add_argument("--no-isff", dest="use_isff", action="store_false",
                   help="maektsr: without the Inter-Stage Feature Fusion (and its encoder): the stage-2 CNN alone")
    f.add_argument("--mae-ckpt", default=TrainConfig.mae_ckpt, help="maektsr: the encoder train.py pretrain wrote")
    f.add_argument("--mae-init", default=TrainConfig.mae_init, choices=["pretrained", "random"],
                   help="maektsr: the encoder from --mae-ckpt, or random (the same network, not pre-trained)")
    f.add_argument("--mae-freeze", default=P.Config.mae_freeze, choices=["all", "none", "last"],
                   help="maektsr: which encoder weights stay frozen: all (default), none, all but the last block")


def fit_parser() -> argparse.ArgumentParser:
    """fit's own parser, for fit_args (table and pretrain build fit's arguments with it)."""
    f = argparse.ArgumentParser(prog="train.py fit", description="train on a folder of scenes")
    add_arguments(f)
    return f


def fit_args(argv: list[str], **settings) -> argparse.Namespace:
    """fit's settings from command-line flags, then `settings` (dests, e.g. out="RUN", use_spa=False) on top.
    args.given: the dests the flags or the settings gave, whatever their value (run_configs and check_resume
    tell a given value from a default one)."""
    return parse_run_args(fit_parser(), argv, TrainConfig.epochs, **settings)


def demo() -> None:
    """No arguments: a short fit on the built-in synthetic scenes, then eval. Proves the pipeline only."""
    print("pixelssr demo: synthetic scenes built from measured ColorChecker spectra - a pipeline check, "
          "not a benchmark. Train on CAVE for real numbers (README).")
    run = "runs/demo"
    # Two minutes are few steps on a CPU: the paper's lr 2e-4 (tuned for 200 epochs) would barely move the weights,
    # so the demo takes 3e-3 and the CPU recipe of the README (a correction to the root-polynomial map, exposure
    # augmentation, warm-up); why and what each measured: docs/results.md, "The demo".
    ckpt = fit(fit_args(["--out", run, "--max-minutes", "2", "--patch", "64", "--stride", "32",
                         "--batch-size", "4", "--label-ratio", "0.001", "--lr", "3e-3", "--test-scenes", "demo_03",
                         "--prior", "rootpoly", "--exposure", "2", "--warmup", "10"]))
    report = evaluate.evaluate(ckpt, f"{run}/eval", seeds=2)
    net, base = report["overall"], report["root_poly_baseline"]
    steps = load_checkpoint(ckpt)["step"]
    print(f"\nnetwork {net['psnr']['mean']:.2f} dB, SSIM {net['ssim']['mean']:.3f}, SAM {net['sam']['mean']:.2f} deg; "
          f"root-polynomial regression on the same labels {base['psnr']['mean']:.2f} dB, SSIM "
          f"{base['ssim']['mean']:.3f}, SAM {base['sam']['mean']:.2f} deg, after {steps} steps.\nThese scenes are "
          f"mixtures of ColorChecker spectra, which the regression nearly spans; on real scenes (CAVE) see the "
          f"README's results.")


def main(argv: list[str] | None = None) -> int:
    """`python train.py fit | eval | predict | pretrain | table ...`; no command: the demo. Returns the exit
    status: 0, or 2 after a usage error printed in one sentence."""
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_cpu_memory()
    ap = argparse.ArgumentParser(description="Pixel-SSR: hyperspectral images from RGB and a few point spectra.")
    sub = ap.add_subparsers(dest="cmd")
    add_arguments(sub.add_parser("fit", help="train on a folder of scenes (no --data: the built-in demo scenes)"))
    evaluate.add_arguments(sub.add_parser("eval", help="full-image metrics on test scenes"))
    predict.add_arguments(sub.add_parser("predict", help="reconstruct a cube from your own RGB image"))
    pretrain.add_arguments(sub.add_parser("pretrain", help="MAE-KTSR stage 1: pre-train S2-MAE for --backbone maektsr"))
    t = sub.add_parser("table", help="run one of the paper's tables (every row a fit and an eval) and write table.md",
                       allow_abbrev=False,  # --seed is a fit flag, not short for --seeds
                       epilog="Any other fit flag (e.g. --patch 64 --lr 2e-3 --epochs 200) is passed to every run.")
    tables.add_arguments(t)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv[:1] != ["fit"]:
            raise UsageError(f"{argv[0] if argv else 'the demo'} runs in one process: start it with python, "
                             f"not torchrun (only fit is data parallel).")
        if not argv:
            demo()
        elif argv[0] == "fit":
            ap.parse_args(argv)  # --help and malformed flags as argparse says them
            fit(fit_args(argv[1:]))
        elif argv[0] == "pretrain":
            ap.parse_args(argv)
            pretrain.pretrain(pretrain.pretrain_args(argv[1:]))
        elif argv[0] == "table":
            tables.table(tables.parse(t, argv[1:], fit_args), fit, fit_args)
        else:
            args = ap.parse_args(argv)
            {"eval": evaluate.run, "predict": predict.run}[args.cmd](args)
    except (UsageError, ValueError) as e:  # bad input: one sentence, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    gc.freeze()  # the imports' objects (torch's, ~10^5) live to the end: the collector, at exit too, skips them
    sys.exit(main())
