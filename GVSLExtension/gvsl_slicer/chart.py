"""The live chart of a background job's progress records: one table node + one plot series node
per term + one plot chart node (MRML only, no Qt); the panels show it in a plot view. Used by
pre-training (loss terms) and fine-tuning (loss, Dice, validation Dice)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import slicer
import vtk


class TermsChart:
    """Rows of ``terms`` appended from step (and validation) records of a job; ``val_<x>`` columns
    take ``<x>`` from validation records, the others from step records (NaN elsewhere)."""

    COLORS = ((0.1, 0.1, 0.1), (0.85, 0.33, 0.1), (0.0, 0.45, 0.74), (0.47, 0.67, 0.19), (0.49, 0.18, 0.56))

    def __init__(self, scene, name: str, terms: Sequence[str] = ("loss", "dice", "ce", "val_dice_mean"),
                 y_title: str = "loss / Dice"):
        self.scene, self.terms = scene, tuple(terms)
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for column in ("step",) + self.terms:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle(y_title)
        self.series: Dict[str, object] = {}
        for term, color in zip(self.terms, self.COLORS):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {term}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(term)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if not term.startswith("val_")
                                  else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*color)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series[term] = series

    def nodes(self) -> list:
        return [self.table, self.chart, *self.series.values()]

    def alive(self) -> bool:
        """False once the table was deleted or the scene closed."""
        return self.table.GetScene() is self.scene and self.scene.IsNodePresent(self.table) != 0

    def append(self, record: dict) -> Optional[int]:
        """A step record fills the loss columns; a validation record the ``val_*`` ones (NaN elsewhere)."""
        event = record.get("event")
        if event not in ("step", "validation") or not self.alive():
            return None
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        for col, key in enumerate(("step",) + self.terms):
            if key == "step":
                value = record.get("step")
            elif key.startswith("val_"):
                value = record.get(key[4:]) if event == "validation" else None
            else:
                value = record.get(key) if event == "step" else None
            table.SetValue(row, col, vtk.vtkVariant(float("nan") if value is None else float(value)))
        table.Modified()
        self.table.Modified()
        return row

    def values(self, term: str) -> list:
        table = self.table.GetTable()
        col = (("step",) + self.terms).index(term)
        return [table.GetValue(r, col).ToDouble() for r in range(table.GetNumberOfRows())]
