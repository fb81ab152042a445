"""Shared test fixtures: paths to the embedded model and the held-out text."""

import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MODEL_DIR = TESTS / "assets" / "tiny-llama-L256"
# Held-out text the tiny model never saw: shared/ beside the checkout (CI puts it there).
VAL_TOKENS = REPO.parent / "shared" / "data" / "val.npy"

sys.path.insert(0, str(TESTS))  # so tests import the oracle as `oracle`


@pytest.fixture(scope="session")
def val_tokens() -> np.ndarray:
    if not VAL_TOKENS.exists():
        raise FileNotFoundError(f"held-out tokens not found at {VAL_TOKENS}")
    return np.load(VAL_TOKENS)
