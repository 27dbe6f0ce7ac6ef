"""Every widget a module's .ui binds to its parameter node (``SlicerParameterName``) names a field
of that module's ``@parameterNodeWrapper`` class, with a widget Slicer's GUI connectors accept
for the field's type (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py), so settings
such as the refinement steps are saved with the scene. Parsed without Slicer or Qt."""
import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# field type (as written in the annotation) -> widget classes Slicer connects to it
WIDGETS_FOR = {"int": {"QSpinBox", "QSlider"}, "float": {"ctkSliderWidget", "QDoubleSpinBox", "qMRMLSliderWidget"}}


def wrapper_fields(module_py: Path) -> dict:
    """{field name: base type name} of the @parameterNodeWrapper class in ``module_py``."""
    tree = ast.parse(module_py.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", getattr(d, "attr", None)) == "parameterNodeWrapper" for d in node.decorator_list):
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    ann = item.annotation
                    if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
                        ann = ann.slice.elts[0]
                    fields[item.target.id] = ast.unparse(ann)
            return fields
    return {}


def bound_widgets(ui: Path) -> dict:
    """{SlicerParameterName: widget class} of a Qt Designer file."""
    out = {}
    for widget in ET.parse(ui).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[prop.find("string").text] = widget.get("class")
    return out


MODULES = [(ROOT / m / f"{m}.py", ROOT / m / "Resources" / "UI" / f"{m}.ui")
           for m in ("GVSLRegistration", "GVSLSegmentation")]


@pytest.mark.parametrize("module_py,ui", MODULES, ids=[m.stem for m, _ in MODULES])
def test_every_bound_widget_is_a_parameter_of_the_right_type(module_py, ui):
    fields, bound = wrapper_fields(module_py), bound_widgets(ui)
    missing = sorted(set(bound) - set(fields))
    assert not missing, f"{ui.name} binds {missing}, which {module_py.name}'s parameter node does not declare"
    for name, cls in bound.items():
        allowed = WIDGETS_FOR.get(fields[name])
        if allowed:
            assert cls in allowed, f"{name} ({fields[name]}) is bound to a {cls}; Slicer connects {sorted(allowed)}"


def test_registration_refinement_steps_are_saved_with_the_scene():
    fields = wrapper_fields(ROOT / "GVSLRegistration" / "GVSLRegistration.py")
    assert fields.get("refineSteps") == "int"
    assert bound_widgets(ROOT / "GVSLRegistration" / "Resources" / "UI" / "GVSLRegistration.ui")["refineSteps"] == "QSpinBox"
    source = (ROOT / "GVSLRegistration" / "GVSLRegistration.py").read_text(encoding="utf-8")
    assert "refine=int(p.refineSteps)" in source  # Apply reads the parameter node, not the widget
