"""
What every command of pixelssr shares: the one error a user can cause, the device, seeds, checkpoints,
the network a checkpoint holds, data-parallel ranks (torchrun), and the CPU allocator's setting.

  UsageError                     bad input of any kind: one sentence naming the file or flag, no traceback
  pick_device, Ranks, start_ranks, unwrap  --device auto|cpu|cuda[:N]; torchrun's processes (fit only)
  slice_shares, autocast         a rank's share of a batch's loss terms; --amp bf16
  stable_seed, seeded            seeds that are pure functions of their keys, on every machine
  save_atomic, load_checkpoint, build_model, load_weights   a run's checkpoint: written atomically, read back
                                 checked; one of an earlier network refused in one sentence (earlier_network)
  keep_freed_cpu_memory          glibc's malloc keeps freed memory for reuse (docs/performance.md)
  Budget, positive, share, add_run_flags, parse_run_args, refuse_contradiction, drop_log_after
                                 what fit and pretrain share: --max-minutes, the flags of a run, --resume
  provenance                     the commit, torch, device, threads and command line a figure came from

A checkpoint (`fit`'s RUN/last.pt, best.pt) is a dict with CHECKPOINT_KEYS: the model and training
configs, the weights (and "ema", the weight average, with --ema), Adam's state, the step and schedule,
the data folder and its split, the run's fixed label sets and its Gamma parameters (docs/design.md), and
"provenance", the commit, torch, device and command line that started the run.
"""

import argparse
import ctypes
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import backbones
import pixelssr as P


class UsageError(Exception):
    """Anything a user can get wrong (a file, a scene, a flag, a device, a checkpoint, a run that diverged):
    the message is one sentence naming the file or setting and the problem, and the commands print it
    without a traceback."""


# -----------------------------------------------------------------------------
# devices and seeds

def pick_device(name: str) -> torch.device:
    """--device: "auto" (the GPU where there is one, else the CPU), or a torch device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name} was asked for, but torch sees {torch.cuda.device_count()} CUDA devices.")
    return device


def stable_seed(*keys: int) -> int:
    """A 64-bit seed that is a pure function of the keys (run seed, epoch, step, a scene's CRC, ...), the same
    on every machine and Python version (unlike hash(), which Python salts per process)."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator seeded by stable_seed(*keys)."""
    return torch.Generator().manual_seed(stable_seed(*keys) >> 2)


def keep_freed_cpu_memory() -> None:
    """Make glibc's malloc serve every block from its heap and keep freed memory for reuse, never trimmed,
    rather than map each large block fresh from the OS and hand it back when freed: a training step or a
    whole-image eval allocates many tensors of tens to hundreds of MB, and fresh pages are faulted in and
    zeroed by the kernel every time. The process keeps its peak. Why and what it saves: docs/performance.md,
    "The CPU allocator". (CUDA has its own caching allocator; without glibc, e.g. on macOS, nothing is done.)"""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library of that kind (Windows: TypeError)
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_trim_threshold, -1)  # never give the heap's top back to the OS (glibc: -1 disables trimming)
    mallopt(m_mmap_max, 0)  # no block is mmap'd on its own: all come from the heap, and return to it


# -----------------------------------------------------------------------------
# checkpoints

def save_atomic(obj: dict, path: Path) -> None:
    """Write a checkpoint so that a run killed mid-write never leaves a broken file behind: to a temporary
    file, then renamed over the old one. A write that fails (a full disk, no permission) removes the
    temporary file, keeps the last good checkpoint, and is a UsageError naming the folder."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a short write as a RuntimeError from its zip writer
        tmp.unlink(missing_ok=True)
        fix = "free space or fix the folder's permissions, then"
        then = (f"{path.name} keeps the last good state: {fix} continue with --resume" if path.exists()
                else f"{fix} run again")
        raise UsageError(f"{path.parent}: could not write {path.name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}); {then}.") from None

CHECKPOINT_KEYS = ("model_config", "train_config", "model", "optimizer", "step", "total_steps", "best_psnr",
                   "data", "split", "labels", "gamma")


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = CHECKPOINT_KEYS,
                    what: str = "pixelssr checkpoint") -> dict:
    """A checkpoint (a fit run's, or with `keys` and `what` another command's), on the CPU; a missing,
    unreadable or foreign file is a UsageError naming it."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such checkpoint file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not where in the unpickler
        raise UsageError(f"{path}: not a readable {what} ({type(e).__name__}).") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UsageError(f"{path}: not a {what} (no {', '.join(missing)}).")
    stale = set(ckpt["model_config"]) - {f.name for f in dataclasses.fields(P.Config)} if "model_config" in keys else ()
    if stale:
        raise earlier_network(path, ckpt, f"its settings {', '.join(sorted(stale))} no longer exist")
    if "model_config" in keys and "mae_window" not in ckpt["model_config"]:  # a run from before maektsr's A13
        ckpt["model_config"]["mae_window"] = ckpt["train_config"]["patch"]  # what fit now sets
    return ckpt


def earlier_network(path: str | Path, ckpt: dict, why: str) -> UsageError:
    """What a checkpoint of a network this code no longer builds is told, and what to do: the commit that
    made it, which fit records in the checkpoint ("provenance")."""
    made = ckpt.get("provenance", {}).get("commit")
    code = f"commit {made}" if made else "a commit from before checkpoints named theirs (git log)"
    return UsageError(f"{path}: a checkpoint of an earlier pixelssr network ({why}); use it with the code that "
                      f"made it, {code}, or train again.")


def load_weights(model: torch.nn.Module, ckpt: dict, key: str, path: str | Path) -> None:
    """model.load_state_dict(ckpt[key]), or one sentence naming `path` if the weights do not fit the network."""
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError:  # torch lists every mismatched tensor; the user needs to know what the file is
        raise earlier_network(path, ckpt, "its weights do not fit the network its settings build") from None


def build_model(ckpt: dict, device: torch.device, path: str | Path = "the checkpoint") -> P.DyProMamba:
    """The network a checkpoint (read from `path`) is evaluated with: its weight average when the run kept
    one (--ema)."""
    model = backbones.network(P.Config(**ckpt["model_config"])).to(device)
    load_weights(model, ckpt, "ema" if "ema" in ckpt else "model", path)
    return model.eval()


# -----------------------------------------------------------------------------
# data parallel (torchrun) and mixed precision

@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run: rank 0 of 1 when not launched by torchrun.

    Every rank draws the same whole batch from the same generators as one process would, and runs its
    slice of it, so N processes compute the single-process step up to the order of floating-point sums.
    Only rank 0 writes (checkpoints, log, progress bar)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous slice of a batch of n samples; slice sizes differ by at most one."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks (all-reduce); x itself in one process."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def agree(self, values: list[int]) -> list[int]:
        """Rank 0's values on every rank: decisions taken from the clock (the time budget) must not differ."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, 0)
        return t.tolist()

def start_ranks(device_name: str) -> tuple[Ranks, torch.device]:
    """Join the process group when torchrun launched several processes (its WORLD_SIZE, RANK and LOCAL_RANK
    variables): NCCL on GPUs, one per process (cuda:LOCAL_RANK), gloo on CPUs. Else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # DDP warns that depthwise convs' gradients have other strides than their buckets: they differ only
    # along a dimension of size 1, which is the same memory layout.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return Ranks(dist.get_rank(), dist.get_world_size()), device

def unwrap(model: torch.nn.Module) -> P.DyProMamba:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def slice_shares(mask: torch.Tensor, part: slice) -> dict[str, float]:
    """Weights that turn the loss terms computed on batch[part] into that slice's share of the whole
    batch's terms, so that the shares of all slices add up to the whole batch's terms (and gradients).

    L_rep, L_SSIM, L_P2I and the unsupervised mode's smoothness prior are means over the batch's samples
    (and pixels, bands): a slice of b of B samples holds b/B of them. L_pHSI is a mean over the batch's labelled pixels, wherever they fall: a
    slice holding n of its N labels holds n/N (its mean is over its own n; a slice with none has 0).
    A per-slice mean averaged over slices would weight each slice's labels by 1/n instead.
    mask: the whole batch's (B, 1, h, w) labelled pixels."""
    n_all, n_part = int(mask.sum()), int(mask[part].sum())
    b_share = (part.stop - part.start) / mask.shape[0]
    return {"phsi": n_part / n_all if n_all else 1.0, "rep": b_share, "ssim": b_share, "p2i": b_share,
            "smooth": b_share}

def autocast(amp: str, device: torch.device):
    """The context of the network's forward: bfloat16 autocast for amp = "bf16", float32 otherwise.

    Under bf16 the convolutions, linear layers and attention products run in bfloat16 (8 significant
    bits); these stay in float32 because 8 bits are too few for them:
      - the selective scan (ssm.selective_scan): its state sums up to h.w steps, and exp(delta.A) of a
        slow channel, 1 - 1e-3, rounds to 1 in bfloat16 (the channel would never forget);
      - the FRFT (frft.frft, frft2): dense N-point unitary sums whose inverse must undo them, and whose
        order's gradient is a near-cancelling sum of size ~N.|x|;
      - the losses (train.slice_loss): SSIM's variances are differences of nearly equal means, and L_rep and
        L_P2I means of small differences. The weights, Adam and checkpoints are float32 throughout."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def provenance(device: torch.device | str) -> dict:
    """Where a figure comes from, for metrics.json and bench.py: the code's commit ("+ uncommitted changes"
    where the checkout differs from it), torch's version, the device, CPU threads, the command line."""
    here = str(Path(__file__).parent)
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"commit": commit, "torch": str(torch.__version__), "device": str(device), "threads": torch.get_num_threads(),
            "command": " ".join(["python", *sys.argv])}


# -----------------------------------------------------------------------------
# what fit and pretrain share: the time budget and the flags of a run

class Budget:
    """Sizes a --max-minutes run's schedule to its budget: after the first steps (which are slow: the
    allocator and caches warm up) the steps that still fit are re-estimated from the mean step time so
    far, every step, so the learning rate reaches zero as the time runs out."""

    def __init__(self, minutes: float, sized: bool, skip: int = 3):
        self.seconds, self.sized, self.skip = minutes * 60, sized, skip
        self.t0, self.t_skip = time.time(), None

    def total_steps(self, step: int, steps_done: int, total: int) -> int:
        """steps_done counts the steps of this session; returns the new schedule length."""
        if not self.sized or steps_done < self.skip:
            return total
        now = time.time()
        if self.t_skip is None:  # first estimate from the first steps, later ones from the steady state
            self.t_skip, rate = now, (now - self.t0) / steps_done
        else:
            rate = (now - self.t_skip) / max(1, steps_done - self.skip)
        return step + max(0, int((self.seconds - (now - self.t0)) / rate))  # step: no time left, the run ends

    def out_of_time(self) -> bool:
        return self.seconds > 0 and time.time() - self.t0 > self.seconds


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into one line and exit code 2)."""
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def share(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1")
    return value


def refuse_contradiction(flag: str, now, was) -> None:
    """The UsageError of a flag given with --resume that contradicts the run being resumed."""
    raise UsageError(f"{flag} {now} contradicts the run being resumed ({was}): --resume continues a run with its "
                     f"own settings; only --max-minutes and --device may change.")


def drop_log_after(log: Path, step: int) -> None:
    """Keep the lines of log.jsonl up to `step`: a resumed run redoes the steps after its checkpoint."""
    if log.exists():
        lines = log.read_text().splitlines(keepends=True)
        log.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def parse_run_args(f: argparse.ArgumentParser, argv: list[str], epochs: int, **settings) -> argparse.Namespace:
    """A run's settings from command-line flags, then `settings` (dests, e.g. out="RUN") on top. args.given:
    the dests the flags or the settings gave, whatever their value (so that a given value is told from a
    default one); args.epochs_given, and args.epochs with `epochs` as its default."""
    unset = object()
    args = argparse.Namespace(**{k: unset for k in vars(f.parse_args([]))})
    f.parse_args(argv, args)  # argparse fills in a default only where the namespace has no value
    given = {k for k, v in vars(args).items() if v is not unset} | set(settings)
    args = f.parse_args(argv)
    for k, v in settings.items():
        setattr(args, k, v)
    args.given = given
    args.epochs_given = args.epochs is not None
    args.epochs = args.epochs if args.epochs is not None else epochs
    return args


def add_run_flags(f: argparse.ArgumentParser, d, out: str) -> None:
    """The flags of a training run that fit and pretrain share: its data and split, labels, length, patches,
    seed, camera response and device; `d` holds the defaults (a TrainConfig or a PretrainConfig)."""
    f.add_argument("--data", default=None, help="folder of CAVE scenes (PNG folders, .mat or .npy)")
    f.add_argument("--out", default=out, help="run folder: last.pt, log.jsonl and what the command writes")
    f.add_argument("--label-ratio", type=float, default=d.label_ratio,
                   help="omega, the fraction of pixels labelled (fit: 0 = unsupervised)")
    f.add_argument("--epochs", type=positive, default=None, help=f"epochs (default {d.epochs})")
    f.add_argument("--max-minutes", type=float, default=d.max_minutes, help="time budget (CPU users)")
    f.add_argument("--test-scenes", nargs="*", default=None, help="scenes held out for testing")
    f.add_argument("--val-scenes", nargs="*", default=None, help="scenes held out of training (fit: to pick best.pt)")
    f.add_argument("--resume", action="store_true", help="continue RUN/last.pt exactly (its data and settings)")
    for name in ("batch_size", "patch", "stride"):
        f.add_argument("--" + name.replace("_", "-"), type=positive, default=getattr(d, name))
    for name in ("lr", "seed"):
        f.add_argument("--" + name, type=type(getattr(d, name)), default=getattr(d, name))
    f.add_argument("--srf", default=d.srf, help="spectral response: cie1964, cie1931, nikon_d700, canon_5dmarkii")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
