"""MRML-side logic of the GVSL Segmentation module (slicer MRML, vtk, gvsl, gvsl_mrml; never Qt),
importable headless with the slicer-core wheel.

    segment_volume(volume_node, model_path, device="auto") -> segmentation node
    finetune_from_nodes([(volume, segmentation), ...], task, output_dir, **options) -> summary (+ model_path)
    start_finetune(...) -> FinetuneRun (background ``gvsl finetune``, for the panel)
    validate_inputs(volume_node, model_path) -> why Apply is disabled, or None
    SegmentationRun / TermsChart: background ``gvsl segment`` and the live loss/Dice chart (panel)
"""
from GVSLSegmentationLib.logic import (ATTRIBUTE_MODEL, TAG_LABEL_VALUE, SegmentationInputError,
                                       labels_to_segmentation, load_segmentation_model, segment_volume,
                                       segmentation_label_values, show_3d, validate_inputs)
from GVSLSegmentationLib.training import (FinetuneRun, export_pairs, finetune_from_nodes, model_path_of,
                                          start_finetune)

__all__ = ["ATTRIBUTE_MODEL", "TAG_LABEL_VALUE", "SegmentationInputError", "labels_to_segmentation",
           "load_segmentation_model", "segment_volume", "segmentation_label_values", "show_3d",
           "validate_inputs", "FinetuneRun", "export_pairs", "finetune_from_nodes", "model_path_of",
           "start_finetune"]

from GVSLSegmentationLib.background import SegmentationRun, TermsChart  # noqa: E402

__all__ += ["SegmentationRun", "TermsChart"]
