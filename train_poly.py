"""Train IM-Fuse, a competitor or your own model on preprocessed BraTS data, by the model's recipe.

    python train_poly.py --datapath BRATS2023_Training_npy --savepath runs/imfuse \\
        --interleaved_tokenization --mamba_skip [--num_epochs 1000 --batch_size 1 ...]
    python train_poly.py --datapath ... --savepath runs/mine --model my_model.py:MyNet

The model's recipe (optimiser, schedule, epochs, batch size, modality dropout, augmentation)
applies unless a flag replaces a value; the first log line prints the effective recipe.
Writes <savepath>/model_last.pth every epoch, <savepath>/best.pth at each best validation
score (mean WT/TC/ET Dice) and TensorBoard logs in <savepath>/summary. --resume
<savepath>/model_last.pth continues a run where it stopped, with its recorded recipe;
--pretrained CKPT starts a fresh run from the weights of another run (M3AE's two stages:
--stage pretrain, then --stage finetune --pretrained <pretraining run>/model_last.pth). SIGINT
or SIGTERM ends the current iteration, saves model_last.pth and exits with status 128 + the
signal number. Under `torchrun --nproc_per_node N train_poly.py ...` it trains with
DistributedDataParallel.
"""
import sys

from data.preprocessing import CaseError
from engine.checkpoint import CheckpointError
from engine.cli import add_model_flags, add_recipe_flags, model_config, non_negative_int, recipe_flags
from engine.training import DEFAULT_SEED, TrainConfig, TrainingError, train
from utils.parser import ArgumentParser

# BraTS editions whose labels are 0-3 after preprocessing
DATANAMES = ("BRATS2023", "BRATS2021", "BRATS2020", "BRATS2018")


def parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datapath", required=True, help="preprocessed data (vol/, seg/, meta/, splits/)")
    p.add_argument("--savepath", required=True, help="folder for checkpoints and logs")
    p.add_argument("--dataname", default="BRATS2023", choices=DATANAMES,
                   help="the original's flag; every edition is read alike after preprocessing")
    add_model_flags(p)
    add_recipe_flags(p)
    p.add_argument("--train_file", help="training case list (default <datapath>/splits/train.txt)")
    p.add_argument("--val_file", help="validation cases with their subsets "
                                      "(default <datapath>/splits/val15splits.csv; '' for none)")
    p.add_argument("--seed", type=int, help=f"default {DEFAULT_SEED}")
    p.add_argument("--resume", help="a model_last.pth / best.pth of train_poly.py to continue")
    p.add_argument("--pretrained", help="start a fresh run from the weights of a train_poly.py checkpoint of the "
                                        "same model that fit (name and shape), e.g. M3AE's pre-training run")
    p.add_argument("--num_workers", type=non_negative_int, default=2, help="data-loading processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available; under "
                                    "torchrun each process takes the GPU of its local rank)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (for CUDA; the Mamba scan stays float32)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    p.check_writable("--savepath", args.savepath)
    if args.patch_size is not None and args.patch_size < 1:
        p.error("--patch_size must be positive")
    # a resumed run without --model checks its flags against its checkpoint's model
    config = model_config(p, args, check=bool(args.model or not args.resume))
    cfg = TrainConfig(datapath=args.datapath, savepath=args.savepath, model=args.model, model_config=config,
                      recipe=recipe_flags(args), seed=args.seed, train_file=args.train_file,
                      val_file=args.val_file, resume=args.resume, pretrained=args.pretrained,
                      num_workers=args.num_workers, device=args.device, amp=args.amp,
                      progress=not args.no_progress)
    try:
        _, stopped = train(cfg)
    except (CaseError, CheckpointError, TrainingError, OSError, ValueError) as err:
        print(f"train_poly.py: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_poly.py: aborted by a second Ctrl-C; model_last.pth holds the last finished epoch",
              file=sys.stderr)
        return 130
    return 128 + stopped if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
