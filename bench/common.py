"""Shared by the benchmarks: machine and version facts, and where results go."""

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "tests" / "assets" / "tiny-llama-L256"
RESULTS = REPO / "bench" / "results"
# Held-out text the tiny model never saw (shared/ beside the checkout).
VAL_TOKENS = REPO.parent / "shared" / "data" / "val.npy"


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def val_tokens() -> np.ndarray:
    return np.load(VAL_TOKENS)


def machine() -> dict:
    import torch

    try:
        import vllm
        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm_version,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                 capture_output=True, text=True).stdout.strip(),
    }


# (results_dir, name) -> the file this process saves that result to: a bench that saves after
# every point rewrites its own file, a second run gets a new one.
_SAVED_THIS_RUN: dict[tuple[Path, str], Path] = {}


def save(name: str, result: dict, results_dir: Path = RESULTS, replace: bool = False) -> Path:
    """Write a result as results_dir/<day>_cpu_<name>.json; a second run the same day writes
    <name>_run2 and so on (its first run's numbers stay), unless `replace` (a result derived
    from others, recomputed in full)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path = _SAVED_THIS_RUN.get((results_dir, name))
    if path is None and replace:
        path = results_dir / f"{day}_cpu_{name}.json"
    if path is None:
        path = results_dir / f"{day}_cpu_{name}.json"
        run = 2
        while path.exists():
            path = results_dir / f"{day}_cpu_{name}_run{run}.json"
            run += 1
        _SAVED_THIS_RUN[(results_dir, name)] = path
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2))
    return path


def shutdown(llm) -> None:
    """Stop an LLM's engine processes so the next engine gets the memory."""
    llm.llm_engine.engine_core.shutdown()
