"""Training (SPEC section 4): RAdam, poly learning rate set once per epoch, the summed loss
over the fused, auxiliary and deep-supervision outputs, validation on the validation split
with each case's assigned subset, `model_last.pth` every epoch and `best.pth` by the mean of
the WT, TC and ET Dice. TensorBoard logs go to <savepath>/summary.

Every random draw is seeded: model initialisation by the seed, the order of the cases by
(seed, epoch), each sample's crop, augmentation and subset by (seed, epoch, index) and
torch's random state (dropout) by (seed, epoch, iteration, rank) at every iteration. A
resumed run therefore continues as the uninterrupted one would have, also from the middle of
an epoch: SIGINT or SIGTERM ends the current iteration, saves `model_last.pth` with the
iterations done and stops.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (NCCL on
GPUs, gloo on the CPU); each rank takes every world-th sample of the epoch's order and
validates every world-th case; rank 0 alone logs and writes checkpoints.
"""
import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data.datasets import EvalDataset, TrainDataset
from models import build_model

from .checkpoint import CheckpointError, is_own, load_checkpoint, save_checkpoint
from .evaluation import evaluate
from .losses import total_loss
from .schedule import poly_lr, set_lr

LAST, BEST = "model_last.pth", "best.pth"


class TrainingError(Exception):
    """A training run that cannot start or go on; the message is one line."""


@dataclass
class TrainConfig:
    datapath: str
    savepath: str
    model: str = "imfuse"
    model_config: dict = None  # constructor arguments of the model
    train_file: str = None  # default <datapath>/splits/train.txt
    val_file: str = None  # default <datapath>/splits/val15splits.csv; "" for no validation
    num_epochs: int = 1000
    batch_size: int = 1  # per process
    lr: float = 2e-4
    weight_decay: float = 3e-5
    iter_per_epoch: int = None  # default: one pass over the training cases
    seed: int = 999
    resume: str = None
    val_every: int = 1
    num_workers: int = 2
    device: str = None  # default cuda when available
    amp: bool = False  # bf16 autocast
    progress: bool = True


class EpochSampler(Sampler):
    """This rank's `num_samples` indices of an epoch: every world-th entry, from `rank`, of
    consecutive random permutations of range(n) drawn from (seed, epoch); set_epoch(e, start)
    skips the first `start` of them (a run resumed mid-epoch)."""

    def __init__(self, n, num_samples, seed, rank=0, world=1):
        self.n, self.num_samples, self.seed, self.rank, self.world = n, num_samples, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.num_samples - self.start

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_samples * self.world
        order = np.concatenate([rng.permutation(self.n) for _ in range(-(-total // self.n))])
        return iter(order[:total][self.rank::self.world][self.start:].tolist())


def iteration_seed(seed, epoch, iteration, rank):
    return int(np.random.SeedSequence([seed, epoch, iteration, rank]).generate_state(1)[0])


class StopRequest:
    """SIGINT and SIGTERM set `requested` instead of killing the process (a second SIGINT
    interrupts at once); the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = None

    def _handle(self, signum, frame):
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_held():
    """SIGINT/SIGTERM held back while DataLoader workers start (they inherit the mask), so that
    none dies of a signal before _ignore_signals; the main process gets them afterwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopRequest.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignore_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops them."""
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, StopRequest.SIGNALS)


class Run:
    """The process's place in a (possibly distributed) run."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None and self.world > 1:
            self.device = torch.device("cuda", local)
        if self.world > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def any(self, flag):
        """Whether `flag` is true on any rank."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, values):
        """Element-wise sum over the ranks of a list of floats."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def _split_file(cfg, given, name):
    return os.path.join(cfg.datapath, "splits", name) if given is None else given


def _start(cfg, device):
    """(model, optimizer, state) for a fresh run or the run of cfg.resume."""
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        if not is_own(ckpt):
            raise CheckpointError(f"{cfg.resume}: not a train_poly.py checkpoint (no model name and "
                                  "configuration); original checkpoints can be evaluated with test.py "
                                  "but not resumed")
        name, config, seed = ckpt["model"], ckpt["config"], ckpt["seed"]
    else:
        name, config, seed = cfg.model, dict(cfg.model_config or {}), cfg.seed
    torch.manual_seed(seed)
    model = build_model(name, **config).to(device)
    optimizer = torch.optim.RAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"model": name, "config": config, "seed": seed, "epoch": -1, "iteration": 0, "sums": {},
             "step": 0, "val_Dice_best": -math.inf}
    if ckpt:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optim_dict"])
        state.update({k: ckpt[k] for k in ("epoch", "iteration", "sums", "step", "val_Dice_best")})
    return model, optimizer, state


def _save(path, model, optimizer, state):
    save_checkpoint(path, {**state, "state_dict": model.state_dict(), "optim_dict": optimizer.state_dict()})


def validate(model, dataset, run=None):
    """Mean WT, TC and ET Dice over the cases, each with its assigned subset (spread over the
    ranks of `run`)."""
    rank, world = (run.rank, run.world) if run else (0, 1)
    rows = evaluate(model, dataset, distances=False, progress=False, indices=range(rank, len(dataset), world))
    sums = [sum(r[k] for r in rows) for k in ("WT", "TC", "ET")] + [len(rows)]
    if run:
        sums = run.sum(sums)
    return {k: sums[i] / sums[3] for i, k in enumerate(("WT", "TC", "ET"))}


def _scalars(writer, values, step):
    if writer:
        for k, v in values.items():
            writer.add_scalar(k, v, step)


def train(cfg, log=print):
    """Train per `cfg` (a TrainConfig); returns the state of the last checkpoint written, with
    "stopped" set to the signal number when a signal ended the run early."""
    run = Run(cfg.device)
    try:
        return _train(cfg, run, log if run.main else lambda line: None)
    finally:
        run.close()


def _train(cfg, run, log):
    model, optimizer, state = _start(cfg, run.device)
    train_set = TrainDataset(cfg.datapath, _split_file(cfg, cfg.train_file, "train.txt"),
                             patch_size=model.patch_size, seed=state["seed"])
    val_file = _split_file(cfg, cfg.val_file, "val15splits.csv")
    val_set = EvalDataset(cfg.datapath, val_file) if val_file else None
    if val_set is not None and not len(val_set):
        raise TrainingError(f"{val_file}: no validation cases (--val_file '' trains without validation)")
    iters = cfg.iter_per_epoch or -(-len(train_set) // (cfg.batch_size * run.world))
    sampler = EpochSampler(len(train_set), iters * cfg.batch_size, state["seed"], run.rank, run.world)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda",
                        worker_init_fn=_ignore_signals)
    net = model
    if run.world > 1:
        net = DistributedDataParallel(model, device_ids=[run.device] if run.device.type == "cuda" else None)
    writer = SummaryWriter(os.path.join(cfg.savepath, "summary"), purge_step=state["step"] + 1) \
        if run.main else None
    log(f"{state['model']} {state['config']}: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {len(train_set)} training cases, {iters} iterations per epoch"
        + (f" on each of {run.world} processes" if run.world > 1 else "") + f", {run.device}"
        + (", bf16 autocast" if cfg.amp else ""))
    last = os.path.join(cfg.savepath, LAST)
    try:
        with StopRequest() as stop:
            for epoch in range(state["epoch"] + 1, cfg.num_epochs):
                line = _train_epoch(cfg, run, net, optimizer, loader, writer, state, epoch, iters, stop)
                if line is None:  # stopped by a signal
                    if run.main:
                        _save(last, model, optimizer, state)
                    log(f"stopped by signal {stop.requested} in epoch {epoch + 1} after iteration "
                        f"{state['iteration']}; saved {last} (continue with --resume {last})")
                    return {**state, "stopped": stop.requested}
                state.update(epoch=epoch, iteration=0, sums={})
                if val_set is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.num_epochs):
                    line += _validate_epoch(cfg, run, model, optimizer, val_set, writer, state)
                if run.main:
                    _save(last, model, optimizer, state)
                log(line)
    finally:
        if writer:
            writer.close()
    best = state["val_Dice_best"]
    log(f"done: {state['epoch'] + 1} epochs" + (f", best validation Dice {best:.4f}" if best > -1 else "")
        + f"; checkpoints in {cfg.savepath}")
    return state


def _train_epoch(cfg, run, net, optimizer, loader, writer, state, epoch, iters, stop):
    """Train the rest of `epoch` (from state["iteration"]); the epoch's log line, or None when
    a signal stopped it (state then holds the iterations done; all of them when the signal
    came in the last one: the resumed run starts with the validation)."""
    lr = set_lr(optimizer, poly_lr(cfg.lr, epoch, cfg.num_epochs))
    first = state["iteration"]
    loader.sampler.set_epoch(epoch, first * cfg.batch_size)
    loader.dataset.set_epoch(epoch)
    net.train()
    start = time.perf_counter()
    with _signals_held():
        batches = iter(loader)  # starts the workers
    bar = tqdm(batches, initial=first, total=iters, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", unit="it",
               disable=not (cfg.progress and run.main), leave=False)
    for i, batch in enumerate(bar, start=first):
        if run.any(stop.requested):
            return None
        torch.manual_seed(iteration_seed(state["seed"], epoch, i, run.rank))
        image, label, mask = (batch[k].to(run.device, non_blocking=True) for k in ("image", "label", "mask"))
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss, parts = total_loss(net(image, mask), label)
        if not torch.isfinite(loss):
            raise TrainingError(f"epoch {epoch + 1}, iteration {i + 1}: the loss is {loss.item()} "
                                f"(cases {', '.join(batch['name'])}); lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        state["step"] += 1
        state["iteration"] = i + 1
        state["sums"] = {k: state["sums"].get(k, 0.0) + v for k, v in values.items()}
        _scalars(writer, {"train/loss": values["loss"]}, state["step"])
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    if run.any(stop.requested):  # all iterations done: validation and saving wait for the resume
        return None
    means = {k: v / iters for k, v in state["sums"].items()}
    _scalars(writer, {**{f"epoch/{k}": v for k, v in means.items()}, "epoch/lr": lr}, state["step"])
    return (f"epoch {epoch + 1}/{cfg.num_epochs}: loss {means['loss']:.4f} (lr {lr:.2e}, "
            f"{time.perf_counter() - start:.0f} s)")


def _validate_epoch(cfg, run, model, optimizer, val_set, writer, state):
    """Validate, save best.pth when the score improves; returns the text for the epoch line."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        dice = validate(model, val_set, run)
    score = float(np.mean(list(dice.values())))
    _scalars(writer, {**{f"val/{k}": v for k, v in dice.items()}, "val/mean": score}, state["step"])
    better = score > state["val_Dice_best"]
    if better:
        state["val_Dice_best"] = score
        if run.main:
            _save(os.path.join(cfg.savepath, BEST), model, optimizer, state)
    return (f"; validation Dice WT {dice['WT']:.4f} TC {dice['TC']:.4f} ET {dice['ET']:.4f} "
            f"mean {score:.4f}" + (" (best)" if better else ""))

