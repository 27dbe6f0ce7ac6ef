"""MRML-side logic of the GVSL Pretraining module (slicer MRML, vtk, gvsl, gvsl_mrml, gvsl_slicer;
never Qt), importable headless with the slicer-core wheel.

    pretrain(volume_nodes, output_dir, **options) -> PretrainingRun        blocking (console)
    start_pretraining(volume_nodes, output_dir, **options) -> PretrainingRun   non-blocking (panel)
    PretrainOptions: preset, steps, batch_size, crop, device, spacing_mm, lr, save_every, seed,
                     init, augment, model_channels
    can_resume(output_dir), volumes_problem(nodes), export_volumes(nodes, folder), LossChart
"""
from GVSLPretrainingLib.chart import LOSS_TERMS, LossChart
from GVSLPretrainingLib.export import PretrainingInputError, export_volumes, volumes_problem
from GVSLPretrainingLib.run import (FINAL, LAST, PretrainingRun, PretrainOptions, can_resume, inputs_folder,
                                    pretrain, start_pretraining)

__all__ = ["LOSS_TERMS", "LossChart", "PretrainingInputError", "export_volumes", "volumes_problem",
           "FINAL", "LAST", "PretrainingRun", "PretrainOptions", "can_resume", "inputs_folder", "pretrain",
           "start_pretraining"]
