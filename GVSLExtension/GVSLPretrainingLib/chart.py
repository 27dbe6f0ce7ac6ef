"""The live loss chart of pre-training: one table node + one plot series node per loss term
+ one plot chart node (MRML only, no Qt). The panel shows the chart in a plot view."""
from __future__ import annotations

from typing import Dict, Optional

import slicer
import vtk

LOSS_TERMS = ("loss", "ncc", "smooth", "mse")  # the records of `gvsl pretrain --progress json`
COLORS = {"loss": (0.1, 0.1, 0.1), "ncc": (0.85, 0.33, 0.1), "smooth": (0.0, 0.45, 0.74), "mse": (0.47, 0.67, 0.19)}


class LossChart:
    """Rows (step, loss, ncc, smooth, mse) appended from step records; nodes named after ``name``."""

    def __init__(self, scene, name: str = "GVSL pre-training loss"):
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for column in ("step",) + LOSS_TERMS:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("loss")
        self.series: Dict[str, object] = {}
        for term in LOSS_TERMS:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {term}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(term)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetColor(*COLORS[term])
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series[term] = series

    def nodes(self) -> list:
        return [self.table, self.chart, *self.series.values()]

    def alive(self) -> bool:
        """False once the table was deleted or the scene closed."""
        return self.table.GetScene() is self.scene and self.scene.IsNodePresent(self.table) != 0

    def append(self, record: dict) -> Optional[int]:
        """Add one step record (``{"event": "step", "step": n, "loss": ...}``); returns the row."""
        if record.get("event") != "step" or not self.alive():
            return None
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        for col, key in enumerate(("step",) + LOSS_TERMS):
            value = record.get(key)
            table.SetValue(row, col, vtk.vtkVariant(float("nan") if value is None else float(value)))
        table.Modified()
        self.table.Modified()
        return row

    def values(self, term: str) -> list:
        table = self.table.GetTable()
        column = ("step",) + LOSS_TERMS
        return [table.GetValue(r, column.index(term)).ToDouble() for r in range(table.GetNumberOfRows())]
