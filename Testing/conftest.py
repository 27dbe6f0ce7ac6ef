"""Shared test setup: import paths for the core and the Slicer-side packages, small helpers."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for sub in ("GVSLExtension", "GVSLRegistration", "GVSLSegmentation"):
    path = ROOT / sub
    if path.is_dir() and str(path) not in sys.path:
        sys.path.insert(0, str(path))

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch
    torch.manual_seed(0)
    np.random.seed(0)
    yield
