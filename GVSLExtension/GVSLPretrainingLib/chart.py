"""The live loss chart of pre-training: :class:`gvsl_slicer.chart.TermsChart` with the four loss
terms of ``gvsl pretrain --progress json`` (MRML only, no Qt)."""
from __future__ import annotations

from gvsl_slicer.chart import TermsChart

LOSS_TERMS = ("loss", "ncc", "smooth", "mse")  # the records of `gvsl pretrain --progress json`


class LossChart(TermsChart):
    """Rows (step, loss, ncc, smooth, mse) appended from step records; nodes named after ``name``."""

    def __init__(self, scene, name: str = "GVSL pre-training loss"):
        super().__init__(scene, name, LOSS_TERMS, y_title="loss")
