"""MRML-side logic of the GVSL Registration module (imports slicer MRML, vtk, gvsl, gvsl_mrml,
gvsl_slicer; never Qt), importable headless with the slicer-core wheel.

    register_volumes(fixed, moving, model_path, device, ...) -> RegistrationOutputs   (in process, blocking)
    start_registration(fixed, moving, model_path, device, ...) -> RegistrationJob      (background, the panel)
    validate_inputs(fixed, moving, model_path) -> reason the Apply button is disabled, or None
    gvsl_transform_of(node) / remove_gvsl_transform(node): GVSL's own transform above a volume
    RegistrationSession(scene): owns the last outputs; survives node deletion and scene close
    show_overlay / choose_overlay / set_dvf_display: what the panel shows
"""
from GVSLRegistrationLib.logic import (ATTRIBUTE_METRICS, OUTPUT_SUFFIX, REFERENCE_FIXED, REFERENCE_MOVING,
                                       PreparedInputs, RegistrationInputError, RegistrationOutputs, format_metrics,
                                       gvsl_transform_of, prepare_inputs, register_volumes, remove_gvsl_transform,
                                       results_to_nodes, validate_inputs)
from GVSLRegistrationLib.display import (DVF_MODES, OVERLAY_STAGES, choose_overlay, set_dvf_display,
                                         show_overlay)
from GVSLRegistrationLib.background import RegistrationJob, read_register_outputs, start_registration
from GVSLRegistrationLib.session import RegistrationSession

__all__ = ["ATTRIBUTE_METRICS", "OUTPUT_SUFFIX", "REFERENCE_FIXED", "REFERENCE_MOVING", "PreparedInputs",
           "RegistrationInputError", "RegistrationOutputs", "format_metrics", "gvsl_transform_of",
           "prepare_inputs", "register_volumes", "remove_gvsl_transform", "results_to_nodes", "validate_inputs",
           "DVF_MODES", "OVERLAY_STAGES", "choose_overlay", "set_dvf_display", "show_overlay",
           "RegistrationJob", "read_register_outputs", "start_registration", "RegistrationSession"]
