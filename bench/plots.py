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
