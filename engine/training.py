"""Training (SPEC section 4 for IM-Fuse; any model of the contract, models/base.py): the
model's recipe (optimiser, learning-rate schedule, epochs, batch size, modality-dropout law,
augmentations, crop placement) with the flags given on the command line replacing its values,
the model's own loss, validation on the validation split with each case's assigned subset,
`model_last.pth` every epoch and `best.pth` by the mean of the WT, TC and ET Dice.
TensorBoard logs go to <savepath>/summary.

Every random draw is seeded: model initialisation by the seed, the order of the cases by
(seed, epoch), each sample's crop, augmentation and subset by (seed, epoch, index) and
torch's random state (dropout) by (seed, epoch, iteration, rank) at every iteration. A
resumed run takes model, configuration, recipe, optimiser and scheduler state from the
checkpoint and therefore continues as the uninterrupted one would have, also from the middle
of an epoch: SIGINT or SIGTERM ends the current iteration, saves `model_last.pth` with the
iterations done and stops. A flag that contradicts the checkpoint is refused, except
--num_epochs (a run may be lengthened or shortened; the schedule follows the new length).

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (NCCL on
GPUs, gloo on the CPU); each rank takes every world-th sample of the epoch's order and
validates every world-th case; rank 0 alone logs and writes checkpoints.
"""
import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from data.datasets import EvalDataset, TrainDataset
from data.sampling import EpochSampler
from models import ReferenceCheckpointError, from_reference
from utils.amp import guard_cpu_bf16_convs
from utils.brats import SEGMENTATION_KINDS
from utils.errors import first_line
from utils.progress import progress_bar
from utils.recipe import Recipe, format_value
from utils.schedule import LRSchedule, make_optimizer

from .checkpoint import CheckpointError, checkpoint_model, is_own, load_checkpoint, save_checkpoint
from .evaluation import evaluate
from .inference import select_device
from .models import DEFAULT_MODEL, ModelError, build_model, canonical_spec, class_name, constructor_defaults, model_class

LAST, BEST = "model_last.pth", "best.pth"
# what a resumed run reads besides the model: key -> type
RESUME_CHANGES = ("num_epochs", "val_every")  # recipe fields a resumed run may change
RESUMED = {"optim_dict": dict, "seed": int, "epoch": int, "iteration": int, "sums": dict, "step": int,
           "val_Dice_best": (int, float)}
DEFAULT_SEED = 999


class TrainingError(Exception):
    """A training run that cannot start or go on; the message is one line."""


@dataclass
class TrainConfig:
    """A training run as the command line gives it. model, model_config, recipe and seed hold
    only what the user gave (None / empty: the model's or the checkpoint's)."""
    datapath: str
    savepath: str
    model: str = None  # registry name or module:ClassName (default imfuse)
    model_config: dict = field(default_factory=dict)  # constructor arguments
    recipe: dict = field(default_factory=dict)  # recipe fields replacing the model's
    seed: int = None  # default 999
    train_file: str = None  # default <datapath>/splits/train.txt
    val_file: str = None  # default <datapath>/splits/val15splits.csv; "" for no validation
    resume: str = None
    pretrained: str = None  # a train_poly.py checkpoint whose fitting weights start a fresh run
    num_workers: int = 2
    device: str = None  # default cuda when available
    amp: bool = False  # bf16 autocast
    progress: bool = True


@dataclass
class RunState:
    """What a checkpoint records besides the weights and the optimiser and scheduler states."""
    model: str
    config: dict
    recipe: Recipe
    seed: int
    epoch: int = -1  # the last finished epoch
    iteration: int = 0  # iterations done in the next epoch (a run stopped mid-epoch)
    sums: dict = field(default_factory=dict)  # their loss sums
    step: int = 0  # TensorBoard step: iterations since the start
    val_Dice_best: float = -math.inf
    pretrained: str = None  # the checkpoint the run started from (--pretrained)

    def checkpoint(self, model, optimizer, schedule):
        return {"model": self.model, "config": self.config, "recipe": self.recipe.as_dict(),
                "seed": self.seed, "epoch": self.epoch, "iteration": self.iteration, "sums": self.sums,
                "step": self.step, "val_Dice_best": self.val_Dice_best, "pretrained": self.pretrained,
                "state_dict": model.state_dict(), "optim_dict": optimizer.state_dict(),
                "schedule": schedule.state_dict()}


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
        self.device = select_device(device)
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


def _identity(cfg, ckpt):
    """(model spec, configuration, seed) of the run: the checkpoint's when resuming (flags
    that contradict it refused), else the flags'."""
    if ckpt is None:  # the checkpoint will record every constructor argument, defaults included
        spec = canonical_spec(cfg.model or DEFAULT_MODEL)
        config = {**constructor_defaults(model_class(spec)), **cfg.model_config}
        return spec, config, DEFAULT_SEED if cfg.seed is None else cfg.seed
    path = cfg.resume
    if not is_own(ckpt):
        raise CheckpointError(f"{path}: not a train_poly.py checkpoint (no model name and "
                              "configuration); original checkpoints can be evaluated with test.py "
                              "but not resumed")
    lacking = [k for k, kind in RESUMED.items() if not isinstance(ckpt.get(k), kind)]
    if lacking:
        raise CheckpointError(f"{path}: not a complete train_poly.py checkpoint ({', '.join(lacking)} missing or "
                              "of the wrong type); it can be evaluated with test.py but not resumed")
    spec = canonical_spec(checkpoint_model(path, ckpt, cfg.model))
    effective = {**constructor_defaults(model_class(spec)), **ckpt["config"]}
    for key, value in cfg.model_config.items():
        if effective.get(key) != value:
            raise TrainingError(f"{path}: the run's model has {key}={effective.get(key)!r}; a resumed "
                                f"run keeps its model (drop the flag that sets {key}={value!r})")
    if cfg.seed is not None and cfg.seed != ckpt["seed"]:
        raise TrainingError(f"{path}: the run's seed is {ckpt['seed']}; --seed {cfg.seed} would change it")
    return spec, ckpt["config"], ckpt["seed"]


def _recipe(cfg, ckpt, model):
    """(effective recipe, where it came from, in words): the model's with the flags' values,
    or when resuming the checkpoint's (a flag that contradicts it refused, --num_epochs and
    --val_every excepted; a checkpoint written before val_every was recorded takes the
    model's)."""
    given = ", ".join(f"--{k}" for k in cfg.recipe)
    if ckpt is None or "recipe" not in ckpt:  # a fresh run, or a checkpoint written before recipes
        source = f"{cfg.resume}: no recorded recipe; " if ckpt is not None else ""
        source += f"{model.__class__.__name__}'s recipe" + (f" with {given} from the command line" if given else "")
        return model.recipe.replace(**cfg.recipe).check(), source
    recipe = Recipe.from_dict({"val_every": model.recipe.val_every, **ckpt["recipe"]})
    for key, value in cfg.recipe.items():
        if key not in RESUME_CHANGES and getattr(recipe, key) != value:
            raise TrainingError(f"{cfg.resume}: the run's recipe has {key}={getattr(recipe, key)!r}; a "
                                f"resumed run keeps its recipe (only --num_epochs and --val_every may change)")
    source = f"the recipe of {cfg.resume}"
    for key in RESUME_CHANGES:
        if key in cfg.recipe and cfg.recipe[key] != getattr(recipe, key):
            source += f", {key} {format_value(getattr(recipe, key))} -> {format_value(cfg.recipe[key])} by --{key}"
            recipe = recipe.replace(**{key: cfg.recipe[key]})
    return recipe.check(), source


def load_pretrained(model, spec, config, path):
    """Copy into `model` (of spec, built with config) every tensor of the checkpoint at `path`
    whose name and shape it has: a train_poly.py checkpoint of the same class, or an original
    checkpoint of the stage before (for a model with `pretraining_config`, read with
    from_reference); returns what was taken, in words."""
    ckpt = load_checkpoint(path)
    stage_before = getattr(model, "pretraining_config", None)
    if not is_own(ckpt):
        if stage_before is None:
            raise CheckpointError(f"{path}: --pretrained takes a train_poly.py checkpoint (no model name and "
                                  "configuration here)")
        try:
            source = from_reference(ckpt, spec, **{**config, **stage_before})
        except (ReferenceCheckpointError, ModelError) as err:
            raise CheckpointError(f"{path}: not a train_poly.py checkpoint, nor an original one of the stage "
                                  f"before ({first_line(err)})")
    elif class_name(ckpt["model"]) != class_name(spec):
        raise CheckpointError(f"{path}: holds a {ckpt['model']} model; --pretrained needs one of {spec}")
    else:
        try:  # the checkpoint's weights must be those of the model it names
            source = build_model(spec, **ckpt["config"])
            source.load_state_dict(ckpt["state_dict"])
        except (ModelError, RuntimeError) as err:
            raise CheckpointError(f"{path}: does not fit its own model {ckpt['model']} ({first_line(err)})")
    own = model.state_dict()
    taken = {k: v for k, v in source.state_dict().items() if k in own and v.shape == own[k].shape}
    lacking = [k for k in getattr(model, "pretrained_keys", ()) if k not in taken]
    if not taken or lacking:
        raise CheckpointError(f"{path}: " + (f"has no {', '.join(lacking)} of the model's shape" if lacking else
                                             "no tensor of it fits the model") + " (check the model's sizes)")
    model.load_state_dict(taken, strict=False)
    kept = [k for k in own if k not in taken]
    return (f"weights from {path}: {len(taken)} of {len(own)} tensors; initial: "
            + (", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "") if kept else "none"))


def optimizer_parameters(model, recipe):
    """The model's parameter groups (its `optimizer_groups(recipe)` where it has one), else its
    parameters."""
    return model.optimizer_groups(recipe) if hasattr(model, "optimizer_groups") else model.parameters()


def _start(cfg, device, log):
    """(model, optimizer, RunState, where the recipe came from, the scheduler's saved state)
    for a fresh run (from cfg.pretrained's weights where given) or the run of cfg.resume."""
    if cfg.resume and cfg.pretrained:
        raise TrainingError("--pretrained starts a fresh run from a checkpoint's weights; --resume continues "
                            "a run (give one of them)")
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    spec, config, seed = _identity(cfg, ckpt)
    torch.manual_seed(seed)
    model = build_model(spec, **config).to(device)
    if cfg.amp and device.type == "cpu":
        guard_cpu_bf16_convs(model)
    recipe, source = _recipe(cfg, ckpt, model)
    state = RunState(spec, config, recipe, seed, pretrained=cfg.pretrained)
    if cfg.pretrained:
        log(load_pretrained(model, spec, config, cfg.pretrained))
    elif ckpt is None and getattr(model, "pretrained_keys", ()):
        raise TrainingError(f"model {spec} {config}: starts from a checkpoint of the stage before, for "
                            f"{', '.join(model.pretrained_keys)}: give --pretrained CKPT")
    optimizer = make_optimizer(recipe, optimizer_parameters(model, recipe))
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optim_dict"])
        except (RuntimeError, ValueError) as err:  # e.g. the class changed since the checkpoint
            raise CheckpointError(f"{cfg.resume}: does not fit model {spec} "
                                  f"({first_line(err)})")
        for group in optimizer.param_groups:  # checkpoints written before recipes lack it
            group.setdefault("initial_lr", recipe.lr)
        for key in ("epoch", "iteration", "sums", "step", "val_Dice_best"):
            setattr(state, key, ckpt[key])
        state.pretrained = ckpt.get("pretrained")
    return model, optimizer, state, source, (ckpt or {}).get("schedule", {})


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
    """Train per `cfg` (a TrainConfig); returns the RunState of the last checkpoint written
    and the signal number that ended the run early (or None)."""
    run = Run(cfg.device)
    try:
        return _train(cfg, run, log if run.main else lambda line: None)
    except ModelError as err:
        raise TrainingError(str(err))
    finally:
        run.close()


def _train(cfg, run, log):
    model, optimizer, state, source, schedule_state = _start(cfg, run.device, log)
    recipe = state.recipe
    train_set = TrainDataset(cfg.datapath, _split_file(cfg, cfg.train_file, "train.txt"), model.window,
                             recipe.augmentations, recipe.subset_weights, recipe.foreground_oversampling,
                             seed=state.seed, warmup_epochs=recipe.warmup_epochs,
                             positions=getattr(model, "uses_position", False))
    val_file = _split_file(cfg, cfg.val_file, "val15splits.csv")
    segments = model.output_kind in SEGMENTATION_KINDS
    if not segments:
        log(f"no validation: the model's output is {model.output_kind!r}, not a segmentation")
    try:
        val_set = EvalDataset(cfg.datapath, val_file) if val_file and segments else None
    except ValueError as err:  # e.g. an empty split of a small cohort
        raise TrainingError(f"{err} (--val_file '' trains without validation)")
    if val_set is None and recipe.schedule == "plateau":
        raise TrainingError("the plateau schedule follows the validation score: give validation "
                            "cases (--val_file) and a model that segments, or another --schedule")
    iters = recipe.iter_per_epoch or -(-len(train_set) // (recipe.batch_size * run.world))
    schedule = LRSchedule(optimizer, recipe, iters)
    schedule.load_state_dict(schedule_state)
    sampler = EpochSampler(len(train_set), iters * recipe.batch_size, state.seed, run.rank, run.world)
    loader = DataLoader(train_set, batch_size=recipe.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda",
                        worker_init_fn=_ignore_signals)
    net = model
    if run.world > 1:
        net = DistributedDataParallel(model, device_ids=[run.device] if run.device.type == "cuda" else None,
                                      find_unused_parameters=getattr(model, "unused_parameters", False))
    writer = SummaryWriter(os.path.join(cfg.savepath, "summary"), purge_step=state.step + 1) \
        if run.main else None
    log(f"recipe ({source}): {recipe.describe()}")
    log(f"{state.model} {state.config}: {sum(p.numel() for p in model.parameters()):,} parameters, window "
        f"{'x'.join(map(str, model.window))}, {len(train_set)} training cases, {iters} iterations per epoch"
        + (f" on each of {run.world} processes" if run.world > 1 else "") + f", {run.device}"
        + (", bf16 autocast" if cfg.amp else ""))
    last = os.path.join(cfg.savepath, LAST)

    def save(path):
        if run.main:
            save_checkpoint(path, state.checkpoint(model, optimizer, schedule))

    try:
        with StopRequest() as stop:
            for epoch in range(state.epoch + 1, recipe.num_epochs):
                start, lr = time.perf_counter(), schedule.start_epoch(epoch)
                if not _train_epoch(cfg, run, net, model, optimizer, schedule, loader, writer, state, epoch,
                                    iters, stop):
                    save(last)
                    log(f"stopped by signal {stop.requested} in epoch {epoch + 1} after iteration "
                        f"{state.iteration}; saved {last} (continue with --resume {last})")
                    return state, stop.requested
                means = {k: v / iters for k, v in state.sums.items()}
                _scalars(writer, {**{f"epoch/{k}": v for k, v in means.items()}, "epoch/lr": lr}, state.step)
                parts = "".join(f"{k} {v:.4f}, " for k, v in means.items() if k != "loss")
                line = (f"epoch {epoch + 1}/{recipe.num_epochs}: loss {means['loss']:.4f} ({parts}"
                        f"lr {lr:.2e}, {time.perf_counter() - start:.0f} s)")
                state.epoch, state.iteration, state.sums = epoch, 0, {}
                if val_set is not None and recipe.validates_after(epoch + 1):
                    line += _validate_epoch(cfg, run, model, schedule, val_set, writer, state, save)
                save(last)
                log(line)
    finally:
        if writer:
            writer.close()
    best = state.val_Dice_best
    log(f"done: {state.epoch + 1} epochs" + (f", best validation Dice {best:.4f}" if best > -1 else "")
        + f"; checkpoints in {cfg.savepath}")
    return state, None


def _train_epoch(cfg, run, net, model, optimizer, schedule, loader, writer, state, epoch, iters, stop):
    """Train the rest of `epoch` (from state.iteration); False when a signal stopped it
    (state then holds the iterations done; all of them when the signal came in the last one:
    the resumed run starts with the validation)."""
    first = state.iteration
    loader.sampler.set_epoch(epoch, first * loader.batch_size)
    loader.dataset.set_epoch(epoch)
    net.train()
    with _signals_held():
        batches = iter(loader)  # starts the workers
    bar = progress_bar(batches, enabled=cfg.progress and run.main, initial=first, total=iters, unit="it",
                       desc=f"epoch {epoch + 1}/{state.recipe.num_epochs}", leave=False)
    for i, batch in enumerate(bar, start=first):
        if run.any(stop.requested):
            return False
        schedule.start_iteration(epoch, i)
        torch.manual_seed(iteration_seed(state.seed, epoch, i, run.rank))
        names = batch["name"]
        batch = {k: batch[k].to(run.device, non_blocking=True) for k in ("image", "label", "mask", "grid", "available")
                 if k in batch}
        inputs = [batch[k] for k in ("image", "mask", "grid") if k in batch]
        extra = {"available": batch["available"]} if getattr(model, "uses_available", False) else {}
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss, parts = _checked(model.loss(net(*inputs, **extra), batch), state.model)
        if not torch.isfinite(loss):
            raise TrainingError(f"epoch {epoch + 1}, iteration {i + 1}: the loss is {loss.item()} "
                                f"(cases {', '.join(names)}); lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _finite_gradients(model, state.recipe.grad_clip, f"epoch {epoch + 1}, iteration {i + 1}", names)
        optimizer.step()
        values = {"loss": loss.item(), **{k: torch.as_tensor(v).item() for k, v in parts.items()}}
        state.step += 1
        state.iteration = i + 1
        state.sums = {k: state.sums.get(k, 0.0) + v for k, v in values.items()}
        _scalars(writer, {"train/loss": values["loss"]}, state.step)
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    return not run.any(stop.requested)  # all iterations done: validation and saving wait for the resume


def _finite_gradients(model, grad_clip, where, names):
    """Refuse a step whose gradients are not finite (naming a parameter); clip them to
    grad_clip's total norm where the recipe asks."""
    named = [(k, p) for k, p in model.named_parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for _, p in named])
    if not torch.isfinite(norm):
        bad = next(k for k, p in named if not torch.isfinite(p.grad).all())
        raise TrainingError(f"{where}: the gradient of {bad} is not finite (cases {', '.join(names)}); "
                            "lower --lr or check the data")
    if grad_clip:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named], grad_clip, norm)


def _checked(result, spec):
    """The (total, parts) a loss returned, or a TrainingError saying how it breaks the contract."""
    total, parts = result if isinstance(result, tuple) and len(result) == 2 else (None, None)
    if not (torch.is_tensor(total) and total.dim() == 0 and total.requires_grad and isinstance(parts, dict)):
        raise TrainingError(f"model {spec}: loss(outputs, batch) must return (a scalar tensor with a "
                            f"gradient, a dict of named parts), got {type(result).__name__} "
                            "(README, 'Adding a model')")
    return total, parts


def _validate_epoch(cfg, run, model, schedule, val_set, writer, state, save):
    """Validate, step the schedule, save best.pth when the score improves; returns the text
    for the epoch line."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        dice = validate(model, val_set, run)
    score = float(np.mean(list(dice.values())))
    _scalars(writer, {**{f"val/{k}": v for k, v in dice.items()}, "val/mean": score}, state.step)
    schedule.validated(score)
    better = score > state.val_Dice_best
    if better:
        state.val_Dice_best = score
        save(os.path.join(cfg.savepath, BEST))
    return (f"; validation Dice WT {dice['WT']:.4f} TC {dice['TC']:.4f} ET {dice['ET']:.4f} "
            f"mean {score:.4f}" + (" (best)" if better else ""))
