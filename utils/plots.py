"""The comparison's figures (matplotlib, no display needed): mean Dice against parameters, one
labelled point per model (the paper's figure), and a heat map of Dice per subset and model."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from .io import atomic_path  # noqa: E402


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def dice_vs_parameters(path, labels, parameters, dice, title="Mean Dice over the modality subsets"):
    """Scatter of mean Dice (%) against parameters in use (millions, log scale), labelled."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    millions = [p / 1e6 for p in parameters]
    ax.scatter(millions, dice, s=40, color="tab:blue")
    for label, x, y in zip(labels, millions, dice):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("parameters in use (millions)")
    ax.set_ylabel("mean Dice of WT, TC, ET (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)


def subset_heatmaps(path, regions, subsets, labels, values):
    """One heat map per region: values[region][i][j] = Dice (%) of subset i for model j."""
    fig, axes = plt.subplots(1, len(regions), figsize=(2.2 + 1.1 * len(labels) * len(regions), 0.45 * len(subsets) + 2),
                             squeeze=False)
    for ax, region in zip(axes[0], regions):
        grid = values[region]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(subsets)), subsets if ax is axes[0][0] else [""] * len(subsets))
        ax.set_title(f"{region} Dice (%)")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    _save(fig, path)
