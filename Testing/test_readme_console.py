"""The README's Python-console examples run as written on slicer-core and make the nodes they claim.

The blocks after ``<!-- console-example -->`` in README.md are executed in order, in one
namespace, in a headless scene holding three phantom CT volumes named "CT 1", "CT 2", "CT 3"
(what a user would have loaded), with the models folder and the temporary folder redirected
into the test's own folder.
"""
import contextlib
import io
import re
import tempfile
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")

import gvsl_mrml  # noqa: E402
from gvsl_mrml import testing as mrml_testing  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def console_examples():
    text = README.read_text(encoding="utf-8")
    return re.findall(r"<!-- console-example -->\n```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_console_examples():
    blocks = console_examples()
    assert len(blocks) == 3
    assert "GVSLPretrainingLib.pretrain(" in blocks[0] and "start_pretraining(" in blocks[1]
    assert "register_volumes(" in blocks[2] and "start_registration(" in blocks[2]


@pytest.mark.slow
def test_readme_console_examples_run(tmp_path, monkeypatch):
    from gvsl.phantoms import make_heart_phantom
    scene = mrml_testing.headless_scene()
    for i in range(3):
        gvsl_mrml.sitk_to_volume_node(make_heart_phantom(size=32, seed=i)[0], scene, f"CT {i + 1}")
    monkeypatch.setenv("GVSL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in console_examples():
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the documented examples
    out = printed.getvalue()
    assert "Done: 4 steps; the model" in out and "is now the current GVSL model" in out
    assert namespace["output"] == str(tmp_path / "gvsl-quick-trial")
    assert (tmp_path / "gvsl-quick-trial" / "gvsl_final.pt").exists()
    chart = namespace["chart"]
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 4
    assert namespace["run"].summary["step"] == 6  # the non-blocking resume continued to 6
    for name in ("CT 2 warped (GVSL)", "CT 2 affine (GVSL)", "CT 2 deformable (GVSL)", "CT 3 warped (GVSL)"):
        assert scene.GetFirstNodeByName(name) is not None, name
    assert "done CT 3 warped (GVSL)" in out
    assert namespace["model"].startswith(str(tmp_path / "models"))
