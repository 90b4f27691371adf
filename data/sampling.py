"""The order in which training cases are drawn: seeded per epoch and split over the ranks of a
distributed run, resumable in the middle of an epoch."""
import numpy as np
from torch.utils.data import Sampler


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
