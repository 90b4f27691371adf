"""Train IM-Fuse (or a competitor) on preprocessed BraTS data with the poly learning rate.

    python train_poly.py --datapath BRATS2023_Training_npy --savepath runs/imfuse \\
        --interleaved_tokenization --mamba_skip [--num_epochs 1000 --batch_size 1 ...]

Writes <savepath>/model_last.pth every epoch, <savepath>/best.pth at each best validation
score (mean WT/TC/ET Dice) and TensorBoard logs in <savepath>/summary. --resume
<savepath>/model_last.pth continues a run where it stopped. SIGINT or SIGTERM ends the current
iteration, saves model_last.pth and exits with status 128 + the signal number. Under
`torchrun --nproc_per_node N train_poly.py ...` it trains with DistributedDataParallel.
"""
import argparse
import inspect
import sys

from data.preprocessing import CaseError
from models import model_class
from utils.checkpoint import CheckpointError
from utils.training import TrainConfig, TrainingError, train

# BraTS editions whose labels are 0-3 after preprocessing
DATANAMES = ("BRATS2023", "BRATS2021", "BRATS2020", "BRATS2018")
VARIANT_FLAGS = {"interleaved_tokenization": "interleaved", "mamba_skip": "mamba_skip",
                 "first_skip": "first_skip"}
SIZE_FLAGS = ("width", "dim", "heads", "mlp_dim", "dropout")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datapath", required=True, help="preprocessed data (vol/, seg/, meta/, splits/)")
    p.add_argument("--savepath", required=True, help="folder for checkpoints and logs")
    p.add_argument("--dataname", default="BRATS2023", choices=DATANAMES)
    p.add_argument("--model", default="imfuse", help="registered model name (imfuse, mmformer)")
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--interleaved_tokenization", action="store_true", help="I-MFB instead of MFB")
    p.add_argument("--mamba_skip", action="store_true", help="Mamba fusion of the skip connections")
    p.add_argument("--first_skip", action="store_true", help="a level-1 skip connection too")
    sizes = p.add_argument_group("model size (default: the paper's)")
    for flag, kind in zip(SIZE_FLAGS, (int, int, int, int, float)):
        sizes.add_argument(f"--{flag}", type=kind)
    p.add_argument("--train_file", help="training case list (default <datapath>/splits/train.txt)")
    p.add_argument("--val_file", help="validation cases with their subsets "
                                      "(default <datapath>/splits/val15splits.csv; '' for none)")
    p.add_argument("--num_epochs", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight_decay", type=float, default=3e-5)
    p.add_argument("--iter_per_epoch", type=int, help="iterations per epoch (default: one pass over "
                                                      "the training cases)")
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--resume", help="a model_last.pth / best.pth of train_poly.py to continue")
    p.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and the last)")
    p.add_argument("--num_workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available; under "
                                    "torchrun each process takes the GPU of its local rank)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (for CUDA; the Mamba scan stays float32)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def model_config(p, args):
    """The model's constructor arguments from the flags; flags the model lacks are an error."""
    try:
        accepted = inspect.signature(model_class(args.model)).parameters
    except ValueError as err:
        p.error(str(err))
    config = {"num_classes": 4, "patch_size": args.patch_size}
    for flag, name in VARIANT_FLAGS.items():
        if getattr(args, flag):
            if name not in accepted:
                p.error(f"--{flag} does not apply to model {args.model!r}")
            config[name] = True
    config.update({k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None})
    return config


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    for flag in ("num_epochs", "batch_size", "val_every", "patch_size", "iter_per_epoch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be positive")
    cfg = TrainConfig(datapath=args.datapath, savepath=args.savepath, model=args.model,
                      model_config=model_config(p, args), train_file=args.train_file,
                      val_file=args.val_file, num_epochs=args.num_epochs, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, iter_per_epoch=args.iter_per_epoch,
                      seed=args.seed, resume=args.resume, val_every=args.val_every,
                      num_workers=args.num_workers, device=args.device, amp=args.amp,
                      progress=not args.no_progress)
    try:
        state = train(cfg)
    except (CaseError, CheckpointError, TrainingError, OSError, ValueError) as err:
        print(f"train_poly.py: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_poly.py: aborted by a second Ctrl-C; model_last.pth holds the last finished epoch",
              file=sys.stderr)
        return 130
    if state.get("stopped"):
        return 128 + state["stopped"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
