"""MRML-side logic of the GVSL Registration module (imports slicer MRML, vtk, gvsl, gvsl_mrml;
never Qt), importable headless with the slicer-core wheel.

    register_volumes(fixed, moving, model_path, device, ...) -> RegistrationOutputs
    validate_inputs(fixed, moving, model_path) -> reason the Apply button is disabled, or None
    show_overlay / choose_overlay / set_dvf_display: what the panel shows
"""
from GVSLRegistrationLib.logic import (ATTRIBUTE_METRICS, OUTPUT_SUFFIX, REFERENCE_FIXED, REFERENCE_MOVING,
                                       RegistrationInputError, RegistrationOutputs, format_metrics,
                                       register_volumes, validate_inputs)
from GVSLRegistrationLib.display import (DVF_MODES, OVERLAY_STAGES, choose_overlay, set_dvf_display,
                                         show_overlay)

__all__ = ["ATTRIBUTE_METRICS", "OUTPUT_SUFFIX", "REFERENCE_FIXED", "REFERENCE_MOVING",
           "RegistrationInputError", "RegistrationOutputs", "format_metrics", "register_volumes",
           "validate_inputs", "DVF_MODES", "OVERLAY_STAGES", "choose_overlay", "set_dvf_display",
           "show_overlay"]
