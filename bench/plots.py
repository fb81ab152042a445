"""PNG plots of benchmark results (matplotlib, no display needed)."""

from pathlib import Path


def plot_segments(path: Path, table: dict[str, dict[str, float]], trained_length: int,
                  title: str) -> Path:
    """Perplexity per position segment, one curve per backend, log-log, L marked.

    table: backend -> {"a-b": perplexity}; each segment is drawn at its geometric middle
    (its start + 1, for the segment that starts at 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for backend, segments in table.items():
        middles = []
        for segment in segments:
            a, b = (int(x) for x in segment.split("-"))
            middles.append((max(a, 1) * b) ** 0.5)
        ax.plot(middles, list(segments.values()), marker="o", label=backend)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(trained_length, color="grey", linestyle="--", linewidth=1)
    ax.text(trained_length, ax.get_ylim()[1], f" L = {trained_length}", va="top",
            color="grey")
    ax.set_xlabel("position (segment middle, tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey(path: Path, table: dict[str, dict[str, dict[str, float]]],
                 depths: list[str], title: str) -> Path:
    """Fraction of keys retrieved, one panel per backend: lengths down, depths across.

    table: backend -> length -> depth label ("25%") -> fraction; a cell not measured is
    left blank (grey), not drawn as 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({int(n) for side in table.values() for n in side})
    fig, axes = plt.subplots(1, len(table), figsize=(3.6 * len(table), 0.6 * len(lengths) + 1.6),
                             squeeze=False)
    for ax, (backend, rows) in zip(axes[0], table.items()):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                grid[i, j] = rows.get(str(n), {}).get(d, np.nan)
        ax.set_facecolor("0.85")
        ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center")
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_xlabel("key depth")
        ax.set_ylabel("prompt tokens")
        ax.set_title(backend)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
