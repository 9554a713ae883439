"""
MAE-KTSR's stage 1: pre-train S2-MAE (maektsr.py) and hand its encoder to stage 2.

  python train.py pretrain --source points|cubes --data DIR --test-scenes ... --out PRE [--label-ratio 0.0001]
  python train.py fit --backbone maektsr --mae-ckpt PRE/encoder.pt --data DIR --test-scenes ... --out RUN

The paper pre-trains on the full cubes of its training sets: the fully supervised regime. A label-efficient
run must not pre-train on spectra it does not have, so the data the encoder learns from is a regime of its
own, kept in the encoder's checkpoint and checked by `fit` (attach_encoder, docs/design.md "MAE-KTSR"):
  - points (the default below label ratio 1): the RGB of the training scenes and the run's fixed labelled
    pixels, the very label sets `fit` draws for the same seed and ratio (labels.make_label_sets). Band tokens
    carry those pixels' spectra alone (maektsr A8); every other spectrum is zeroed here, before the model.
  - cubes: the full cubes of the training scenes (image-level supervision, label ratio 1), or of another
    dataset given by --data (e.g. pre-train on ICVL, train and test on CAVE).
`fit` refuses an encoder pre-trained on one of its test or validation scenes, under another camera
response, (points) on labels its run does not have, or on crops of another size than its --patch (stage 2
runs the encoder in windows of --patch pixels, maektsr A13).

Training follows MAE: AdamW (betas 0.9 / 0.95, weight decay 0.05), linear warm-up, then a cosine decay to
zero; masks and batches are drawn from generators seeded by (seed, epoch, step), so a resumed run is exact.
OUT/last.pt holds the whole run (for --resume); OUT/encoder.pt what stage 2 loads.

Glossary: see maektsr.py (hsi = Y, rgb = X = S.Y, known = the pixels whose spectrum the run has).
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

import cameras
import data
import maektsr
from labels import PatchDataset, expand_label_sets, make_label_sets
from runs import (Budget, UsageError, add_run_flags, drop_log_after, load_checkpoint, parse_run_args, pick_device,
                  refuse_contradiction, save_atomic, seeded)

# what OUT/last.pt (the run, for --resume) and OUT/encoder.pt (what fit --mae-ckpt loads) hold
RUN_KEYS = ("pretrain_config", "data", "split", "labels", "step", "total_steps", "mae", "optimizer")
ENCODER_KEYS = ("config", "encoder", "regime", "source_scenes", "data", "srf", "label_ratio", "label_seed", "labels")


@dataclasses.dataclass
class PretrainConfig:
    source: str = "points"          # what the encoder may read: "points" (the run's labels) or "cubes" (whole scenes)
    label_ratio: float = 1e-4       # omega of the "points" regime: fit's 0.01 % labels, drawn as fit draws them
    epochs: int = 100               # over patch positions; most CPU runs stop at --max-minutes first
    max_minutes: float = 0.0        # > 0: stop after this long, the schedule sized to the budget
    batch_size: int = 8             # crops per step
    patch: int = 128                # a 16 x 16 token grid at MAE patch 8 (A1)
    stride: int = 64                # crop positions of an epoch
    lr: float = 1e-3                # AdamW; MAE's 1.5e-4 x batch/256 is for 4096-crop batches of ImageNet
    warmup: int = 20                # linear warm-up steps, as MAE's
    weight_decay: float = 0.05      # MAE's
    seed: int = 0                   # label sets (as fit's), init, batches, masks
    srf: str = "cie1964"            # S: must be the camera response of the fit that loads the encoder
    masking: str = "both"           # maektsr.MAEConfig.masking: both, spectral or spatial (ablations)
    band_lo: float = 0.6            # the range of a sample's band mask ratio (A3)
    band_hi: float = 0.97
    rgb_only: float = 0.25          # probability of ratio 1, the stage-2 case (A2)
    spatial_ratio: float = 0.5      # fraction of positions that lose all their band tokens (A3)


def get_lr(step: int, total_steps: int, cfg: PretrainConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then a cosine decay from cfg.lr to zero (MAE's schedule)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    done = min(1.0, (step - cfg.warmup) / max(1, total_steps - cfg.warmup))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))


def mae_config(cfg: PretrainConfig) -> maektsr.MAEConfig:
    return maektsr.MAEConfig(masking=cfg.masking, band_ratio=(cfg.band_lo, cfg.band_hi), rgb_only=cfg.rgb_only,
                             spatial_ratio=cfg.spatial_ratio)


# -----------------------------------------------------------------------------
# the pre-training loop

def pretrain(args: argparse.Namespace) -> Path:
    """Pre-train S2-MAE on the regime's data; returns OUT/encoder.pt."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    ckpt, cfg, split, root = settings(args)
    srf = torch.from_numpy(cameras.srf_matrix(cfg.srf))
    scenes = data.load_scenes(root, split["train"])
    # the pixels whose spectra pre-training may read: fit's label sets for this seed and ratio, or every pixel
    stored = ckpt["labels"] if ckpt is not None else make_label_sets(
        scenes, cfg.label_ratio if cfg.source == "points" else 1.0, cfg.seed, srf)
    coords = {n: v["coords"].numpy() for n, v in expand_label_sets(stored, scenes, srf).items()}
    # PatchDataset keeps the spectra of those pixels alone: the rest of each cube is dropped once its RGB is made
    dataset = PatchDataset([(scenes[n], coords[n]) for n in split["train"]], srf.numpy(), patch=cfg.patch,
                           stride=cfg.stride, around_labels=cfg.source == "points")
    steps_per_epoch = max(1, len(dataset) // cfg.batch_size)

    torch.manual_seed(cfg.seed)
    mae = maektsr.S2MAE(mae_config(cfg)).to(device)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    run = {"pretrain_config": dataclasses.asdict(cfg), "data": root, "split": split,
           "labels": stored, "step": 0, "total_steps": cfg.epochs * steps_per_epoch}
    if ckpt is not None:
        mae.load_state_dict(ckpt["mae"])
        optimizer.load_state_dict(ckpt["optimizer"])
        run.update(step=ckpt["step"], total_steps=ckpt["total_steps"])
    print(f"pre-training S2-MAE ({cfg.source}) on {len(split['train'])} scenes ({', '.join(split['train'])})"
          + (f", {sum(len(c) for c in coords.values())} labelled pixels" if cfg.source == "points" else "")
          + f", {len(dataset)} crops/epoch, device {device}")

    if ckpt is not None:
        drop_log_after(out / "log.jsonl", run["step"])  # the steps after last.pt are redone
    log = open(out / "log.jsonl", "a" if ckpt is not None else "w", buffering=1)  # a new run: a log of its own
    budget = Budget(cfg.max_minutes, sized=cfg.max_minutes > 0 and not args.epochs_given and ckpt is None)
    pbar = tqdm(total=run["total_steps"], initial=run["step"], dynamic_ncols=True)
    first, srf_dev = run["step"], srf.to(device)
    while run["step"] < run["total_steps"]:
        step = run["step"]
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(len(dataset), generator=seeded(cfg.seed, epoch))
        g = seeded(cfg.seed, epoch, i)  # the crops' flips, then the masks
        rgb, hsi, known = crops(dataset, order[i * cfg.batch_size:(i + 1) * cfg.batch_size], g, cfg.source)
        lr = get_lr(step, run["total_steps"], cfg)
        terms = maektsr.pretrain_step(mae, optimizer, hsi.to(device), rgb.to(device), srf_dev, g, lr,
                                      None if known is None else known.to(device))
        if not math.isfinite(terms["total"]):
            raise UsageError(f"{out}: the loss became {terms['total']} at step {step}; "
                             f"{out / 'last.pt'} holds the last good state.")
        step = run["step"] = step + 1
        run["total_steps"] = budget.total_steps(step, step - first, run["total_steps"])
        pbar.total = run["total_steps"]
        pbar.update(1)
        pbar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()} | {"lr": f"{lr:.2e}"})
        log.write(json.dumps({"step": step, "epoch": epoch, "lr": lr, **terms}) + "\n")
        out_of_time = budget.out_of_time()
        if step % steps_per_epoch == 0 or step == run["total_steps"] or out_of_time:
            save_atomic({**run, "mae": mae.state_dict(), "optimizer": optimizer.state_dict()}, out / "last.pt")
        if out_of_time:
            print(f"\nstopped after {cfg.max_minutes} minutes at step {step}/{run['total_steps']}; "
                  f"--resume continues from {out / 'last.pt'}")
            break
    pbar.close()
    log.close()
    encoder = {**maektsr.encoder_state(mae), "regime": cfg.source, "source_scenes": split["train"], "data": root,
               "srf": cfg.srf, "label_ratio": cfg.label_ratio if cfg.source == "points" else 1.0,
               "label_seed": cfg.seed, "labels": stored, "crop": cfg.patch}
    save_atomic(encoder, out / "encoder.pt")
    print(f"wrote {out / 'encoder.pt'} (fit --backbone maektsr --mae-ckpt {out / 'encoder.pt'})")
    return out / "encoder.pt"


def crops(dataset: PatchDataset, indices: torch.Tensor, g: torch.Generator,
          source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch (rgb (b, 3, p, p), hsi (b, 31, p, p), known (b, 1, p, p) bool, or None where every pixel is
    known). hsi is PatchDataset's target: zero wherever the run has no label."""
    rgb, hsi, known = dataset.batch(indices, g)
    return rgb, hsi, known if source == "points" else None


def settings(args: argparse.Namespace) -> tuple[dict | None, PretrainConfig, dict, str]:
    """(the checkpoint --resume continues, or None; the config; the scene split; the data folder)."""
    if args.resume:
        ckpt = load_checkpoint(Path(args.out) / "last.pt", RUN_KEYS, "pretrain run's checkpoint")
        for name in sorted(args.given - {"max_minutes", "device", "resume", "out"}):
            now, was = resumed_setting(args, ckpt, name)
            if now != was:
                refuse_contradiction(f"--{name.replace('_', '-')}", now, was)
        cfg = dataclasses.replace(PretrainConfig(**ckpt["pretrain_config"]), max_minutes=args.max_minutes)
        return ckpt, cfg, ckpt["split"], ckpt["data"]
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
    cfg = PretrainConfig(**flags | {"source": args.source or ("points" if args.label_ratio < 1 else "cubes")})
    if cfg.patch % maektsr.MAEConfig.patch:
        raise UsageError(f"--patch {cfg.patch}: S2-MAE's crops must be a multiple of its token patch, "
                         f"{maektsr.MAEConfig.patch}.")
    if not 0 <= cfg.band_lo <= cfg.band_hi <= 1 or not (0 <= cfg.rgb_only <= 1 and 0 <= cfg.spatial_ratio <= 1):
        raise UsageError(f"--band-lo {cfg.band_lo} <= --band-hi {cfg.band_hi}, --rgb-only {cfg.rgb_only} and "
                         f"--spatial-ratio {cfg.spatial_ratio} are fractions from 0 to 1.")
    if cfg.source == "points" and not 0 < cfg.label_ratio < 1:
        raise UsageError(f"--source points pre-trains on a run's labelled pixels: --label-ratio must be between 0 "
                         f"and 1 (got {cfg.label_ratio}); at 1 use --source cubes.")
    train, val, test = data.split_scenes(data.scene_names(args.data), args.test_scenes, args.val_scenes)
    if not train:
        raise UsageError(f"{args.data}: no training scenes left after the test/validation split.")
    return None, cfg, {"train": train, "val": val, "test": test}, args.data


def resumed_setting(args: argparse.Namespace, ckpt: dict, name: str) -> tuple:
    """(this command's value of setting `name`, the resumed run's), comparable: scene lists as sorted names,
    the data folder resolved."""
    if name in ("test_scenes", "val_scenes"):
        return (sorted(data.scene_name(n) for n in getattr(args, name) or []),
                sorted(ckpt["split"][name.split("_")[0]]))
    if name == "data":
        return tuple(str(Path(p).resolve()) if p else None for p in (args.data, ckpt["data"]))
    return getattr(args, name), ckpt["pretrain_config"].get(name)


# -----------------------------------------------------------------------------
# stage 2: what fit loads

def attach_encoder(body: maektsr.MAEKTSR, path: str, split: dict, srf: str, labels: dict, label_ratio: float,
                   patch: int) -> None:
    """Load a pre-trained encoder into stage 2, after the checks that keep a run honest: the encoder never
    read a scene this run tests or validates on, was pre-trained under this run's camera response, read
    whole cubes of this run's training scenes only if the run has every pixel (label ratio 1), and, if it
    read labelled pixels (points), read only pixels this run has labelled too; and it was pre-trained on
    crops of this run's --patch, the window stage 2 runs it in (maektsr.py, A13). UsageError otherwise."""
    state = load_checkpoint(path, ENCODER_KEYS, "pre-trained encoder (train.py pretrain writes OUT/encoder.pt)")
    held_out = {data.scene_name(n) for n in split["test"] + split["val"]}
    seen = sorted(held_out & {data.scene_name(n) for n in state["source_scenes"]})
    if seen:
        raise UsageError(f"--mae-ckpt {path} was pre-trained on {', '.join(seen)}, a scene this run tests or "
                         f"validates on: pre-train without it (--test-scenes / --val-scenes).")
    if state["srf"] != srf:
        raise UsageError(f"--mae-ckpt {path} was pre-trained under camera response {state['srf']}, this run "
                         f"uses {srf}: pre-train with --srf {srf}.")
    whole = sorted({data.scene_name(n) for n in split["train"]} & {data.scene_name(n) for n in state["source_scenes"]})
    if state["regime"] == "cubes" and label_ratio < 1 and whole:
        raise UsageError(f"--mae-ckpt {path} read the whole cubes of {', '.join(whole)}, of which this run (label "
                         f"ratio {label_ratio:g}) has only its labelled pixels: pre-train with --source points, or "
                         f"on another dataset's --data.")
    if state["regime"] == "points":
        for name, theirs in state["labels"].items():
            ours = labels.get(name, {}).get("coords")
            if ours is None or not set(map(tuple, theirs["coords"].tolist())) <= set(map(tuple, ours.tolist())):
                raise UsageError(f"--mae-ckpt {path} read labelled pixels of {name} that this run does not have "
                                 f"(pre-trained at label ratio {state['label_ratio']:g}, seed {state['label_seed']}): "
                                 f"pre-train with this run's --label-ratio and --seed.")
    if "crop" not in state:  # written before stage 2 ran its encoder in windows (maektsr.py, A13)
        raise UsageError(f"--mae-ckpt {path} does not record the crop size it was pre-trained on: pre-train again "
                         f"with --patch {patch}.")
    if state["crop"] != patch:
        raise UsageError(f"--mae-ckpt {path} was pre-trained on {state['crop']}-pixel crops and stage 2 runs it in "
                         f"windows of this run's --patch {patch}: pre-train with --patch {patch}.")
    try:
        maektsr.load_encoder(body, state)
    except ValueError as e:
        raise UsageError(f"--mae-ckpt {path}: {e}") from None


# -----------------------------------------------------------------------------
# the command line

def add_arguments(f: argparse.ArgumentParser) -> None:
    """pretrain's flags: fit's data and run flags, the regime, and S2-MAE's masking."""
    d = PretrainConfig()
    add_run_flags(f, d, out="runs/s2mae")
    f.add_argument("--source", default=None, choices=["points", "cubes"],
                   help="points (the default below --label-ratio 1): the run's labelled pixels only; cubes: whole "
                        "training cubes")
    f.add_argument("--warmup", type=int, default=d.warmup)
    f.add_argument("--weight-decay", type=float, default=d.weight_decay)
    f.add_argument("--masking", default=d.masking, choices=["both", "spectral", "spatial"],
                   help="band and position masking, or one of them (ablations)")
    for name in ("band_lo", "band_hi", "rgb_only", "spatial_ratio"):
        f.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))


def pretrain_args(argv: list[str], **settings) -> argparse.Namespace:
    """pretrain's settings from command-line flags, then `settings` (dests, e.g. source="cubes") on top;
    args.given as runs.parse_run_args."""
    f = argparse.ArgumentParser(prog="train.py pretrain")
    add_arguments(f)
    return parse_run_args(f, argv, PretrainConfig.epochs, **settings)
