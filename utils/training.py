"""Training (SPEC section 4): RAdam, poly learning rate set once per epoch, the summed loss
over the fused, auxiliary and deep-supervision outputs, validation on the validation split
with each case's assigned subset, `model_last.pth` every epoch and `best.pth` by the mean of
the WT, TC and ET Dice. TensorBoard logs go to <savepath>/summary.

Every random draw is seeded: model initialisation by the seed, the order of the cases by
(seed, epoch), each sample's crop, augmentation and subset by (seed, epoch, index) and
dropout by torch's random state, which the checkpoint carries; a resumed run continues as
the uninterrupted one would have.
"""
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data.datasets import EvalDataset, TrainDataset
from models import build_model

from .checkpoint import CheckpointError, is_own, load_checkpoint, rng_state, save_checkpoint, set_rng_state
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
    batch_size: int = 1
    lr: float = 2e-4
    weight_decay: float = 3e-5
    iter_per_epoch: int = None  # default: one pass over the training cases
    seed: int = 999
    resume: str = None
    val_every: int = 1
    num_workers: int = 2
    device: str = None  # default cuda when available
    progress: bool = True


class EpochSampler(Sampler):
    """`num_samples` indices per epoch: consecutive random permutations of range(n), drawn
    from (seed, epoch)."""

    def __init__(self, n, num_samples, seed):
        self.n, self.num_samples, self.seed, self.epoch = n, num_samples, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.concatenate([rng.permutation(self.n) for _ in range(-(-self.num_samples // self.n))])
        return iter(order[:self.num_samples].tolist())


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
    state = {"model": name, "config": config, "seed": seed, "epoch": -1, "step": 0,
             "val_Dice_best": -math.inf}
    if ckpt:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optim_dict"])
        set_rng_state(ckpt["rng"])
        state.update({k: ckpt[k] for k in ("epoch", "step", "val_Dice_best")})
    return model, optimizer, state


def _save(path, model, optimizer, state):
    save_checkpoint(path, {**state, "state_dict": model.state_dict(),
                           "optim_dict": optimizer.state_dict(), "rng": rng_state()})


def validate(model, dataset):
    """Mean WT, TC and ET Dice over the cases, each with its assigned subset."""
    rows = evaluate(model, dataset, distances=False, progress=False)
    return {k: float(np.mean([r[k] for r in rows])) for k in ("WT", "TC", "ET")}


def train(cfg, log=print):
    """Train per `cfg` (a TrainConfig); returns the state of the last checkpoint written."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, optimizer, state = _start(cfg, device)
    train_set = TrainDataset(cfg.datapath, _split_file(cfg, cfg.train_file, "train.txt"),
                             patch_size=model.patch_size, seed=state["seed"])
    val_file = _split_file(cfg, cfg.val_file, "val15splits.csv")
    val_set = EvalDataset(cfg.datapath, val_file) if val_file else None
    iters = cfg.iter_per_epoch or -(-len(train_set) // cfg.batch_size)
    sampler = EpochSampler(len(train_set), iters * cfg.batch_size, state["seed"])
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    writer = SummaryWriter(os.path.join(cfg.savepath, "summary"), purge_step=state["step"] + 1)
    log(f"{state['model']} {state['config']}: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {len(train_set)} training cases, {iters} iterations per epoch, {device}")
    try:
        for epoch in range(state["epoch"] + 1, cfg.num_epochs):
            state["epoch"] = epoch
            line = _train_epoch(cfg, model, optimizer, loader, writer, state, device, iters)
            if val_set is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.num_epochs):
                line += _validate_epoch(cfg, model, optimizer, val_set, writer, state)
            _save(os.path.join(cfg.savepath, LAST), model, optimizer, state)
            log(line)
    finally:
        writer.close()
    return state


def _train_epoch(cfg, model, optimizer, loader, writer, state, device, iters):
    epoch = state["epoch"]
    lr = set_lr(optimizer, poly_lr(cfg.lr, epoch, cfg.num_epochs))
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    model.train()
    sums, start = {}, time.perf_counter()
    bar = tqdm(loader, total=iters, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", unit="it",
               disable=not cfg.progress, leave=False)
    for i, batch in enumerate(bar):
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        loss, parts = total_loss(model(image, mask), label)
        if not torch.isfinite(loss):
            raise TrainingError(f"epoch {epoch + 1}, iteration {i + 1}: the loss is {loss.item()} "
                                f"(cases {', '.join(batch['name'])}); lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] += 1
        values = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        writer.add_scalar("train/loss", values["loss"], state["step"])
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    means = {k: v / iters for k, v in sums.items()}
    for k, v in means.items():
        writer.add_scalar(f"epoch/{k}", v, state["step"])
    writer.add_scalar("epoch/lr", lr, state["step"])
    return (f"epoch {epoch + 1}/{cfg.num_epochs}: loss {means['loss']:.4f} (lr {lr:.2e}, "
            f"{time.perf_counter() - start:.0f} s)")


def _validate_epoch(cfg, model, optimizer, val_set, writer, state):
    """Validate, save best.pth when the score improves; returns the text for the epoch line."""
    dice = validate(model, val_set)
    score = float(np.mean(list(dice.values())))
    for k, v in dice.items():
        writer.add_scalar(f"val/{k}", v, state["step"])
    writer.add_scalar("val/mean", score, state["step"])
    better = score > state["val_Dice_best"]
    if better:
        state["val_Dice_best"] = score
        _save(os.path.join(cfg.savepath, BEST), model, optimizer, state)
    return (f"; validation Dice WT {dice['WT']:.4f} TC {dice['TC']:.4f} ET {dice['ET']:.4f} "
            f"mean {score:.4f}" + (" (best)" if better else ""))
