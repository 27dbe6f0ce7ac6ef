"""The Slicer extension's CMake configures and lists every file it ships.

CMake is run on the real CMakeLists.txt files against ``Testing/cmake_standin`` (a stand-in for
Slicer's build tree whose ``slicerMacroBuildScriptedModule``, ``slicer_add_python_unittest`` and
``ctkMacroCompilePythonScript`` parse the real argument keywords, fail on unknown keywords,
missing mandatory arguments and nonexistent files, and record every file they are given). An
unknown command (such as the non-existent ``ctkMacroCompilePythonScriptFiles``) fails configure.
Then: every .py/.ui/.png/.tsv in a module folder is listed; every .ui is well-formed XML and
every widget the module's code looks up (``self.ui.<name>`` / ``ui.<name>``) exists in it.
"""
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "cmake_standin"
MODULE_DIRS = ("GVSLExtension", "GVSLRegistration", "GVSLSegmentation")
SHIPPED = (".py", ".ui", ".png", ".tsv")
CMAKE = shutil.which("cmake")

pytestmark = pytest.mark.skipif(CMAKE is None, reason="needs cmake")


def configure(source: Path, build: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CMAKE, "-S", str(source), "-B", str(build), f"-DSlicer_DIR={STANDIN}",
                           "-DBUILD_TESTING=ON"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake-build")
    proc = configure(ROOT, build)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|", 2) for line in (build / "gvsl_manifest.txt").read_text().splitlines() if line]
    return rows


def existing_module_dirs():
    return [d for d in MODULE_DIRS if (ROOT / d / "CMakeLists.txt").exists()]


def test_top_level_lists_every_module():
    text = (ROOT / "CMakeLists.txt").read_text()
    for name in MODULE_DIRS:
        assert re.search(rf"add_subdirectory\(\s*{name}\s*\)", text), name
    assert "ctkMacroCompilePythonScriptFiles" not in text


@pytest.mark.parametrize("module_dir", existing_module_dirs())
def test_every_shipped_file_is_listed(manifest, module_dir):
    listed = {Path(path).resolve() for _macro, _kind, path in manifest if _kind != "NAME"}
    folder = ROOT / module_dir
    on_disk = {p.resolve() for p in folder.rglob("*") if p.suffix in SHIPPED and "__pycache__" not in p.parts}
    missing = sorted(str(p.relative_to(ROOT)) for p in on_disk - listed)
    assert not missing, f"files in {module_dir}/ that its CMakeLists.txt does not list: {missing}"


@pytest.mark.parametrize("module_dir", existing_module_dirs())
def test_every_scripted_module_is_built_and_tested(manifest, module_dir):
    folder = (ROOT / module_dir).resolve()
    names = [path for macro, kind, path in manifest if macro == "slicerMacroBuildScriptedModule" and kind == "NAME"]
    scripts = {Path(p).resolve() for m, k, p in manifest if m == "slicerMacroBuildScriptedModule" and k == "SCRIPTS"}
    tests = {Path(p).resolve() for m, k, p in manifest if m == "slicer_add_python_unittest"}
    modules = [p for p in folder.glob("*.py") if (folder / f"{p.stem}Lib").is_dir()]
    assert modules, f"no scripted module (X.py + XLib/) in {module_dir}"
    for module in modules:
        assert module.stem in names
        assert module.resolve() in scripts and module.resolve() in tests
        for resource in (f"Resources/UI/{module.stem}.ui", f"Resources/Icons/{module.stem}.png"):
            assert (folder / resource).exists(), f"{module_dir}/{resource}"


def test_standin_rejects_unknown_commands_and_keywords(tmp_path):
    """The stand-in is strict: the old misspelt macro and a wrong keyword both fail configure."""
    cases = {
        "unknown_command": "ctkMacroCompilePythonScriptFiles(TARGET_NAME t SCRIPTS a.py DESTINATION_DIR d INSTALL_DIR i)",
        "unknown_keyword": "slicerMacroBuildScriptedModule(NAME m SCRIPTS a.py RESOURCE b.png)",
        "missing_file": "slicerMacroBuildScriptedModule(NAME m SCRIPTS nothere.py)",
        "missing_mandatory": "ctkMacroCompilePythonScript(TARGET_NAME t SCRIPTS a.py INSTALL_DIR i)",
    }
    for name, call in cases.items():
        src = tmp_path / name
        src.mkdir()
        (src / "a.py").write_text("")
        (src / "b.png").write_bytes(b"")
        (src / "CMakeLists.txt").write_text(
            "cmake_minimum_required(VERSION 3.16)\nproject(t NONE)\nfind_package(Slicer REQUIRED)\n"
            f"include(${{Slicer_USE_FILE}})\n{call}\n")
        proc = configure(src, tmp_path / f"{name}-build")
        assert proc.returncode != 0, name
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "a.py").write_text("")
    (ok / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(t NONE)\nfind_package(Slicer REQUIRED)\n"
        "include(${Slicer_USE_FILE})\nctkMacroCompilePythonScript(TARGET_NAME t SCRIPTS a DESTINATION_DIR d "
        "INSTALL_DIR i NO_INSTALL_SUBDIR)\n")
    proc = configure(ok, tmp_path / "ok-build")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def ui_files():
    return sorted(p for d in MODULE_DIRS for p in (ROOT / d).glob("Resources/UI/*.ui"))


@pytest.mark.parametrize("ui_path", ui_files(), ids=lambda p: p.name)
def test_ui_is_well_formed_and_has_every_widget_the_code_uses(ui_path):
    tree = ET.parse(ui_path)  # raises on malformed XML
    widgets = {w.get("name") for w in tree.iter("widget")}
    module = ui_path.parents[2] / f"{ui_path.stem}.py"
    assert module.exists(), module
    code = module.read_text()
    used = set(re.findall(r"\bui\.([A-Za-z_][A-Za-z0-9_]*)", code))
    used -= {"setupUi"}
    missing = sorted(used - widgets)
    assert not missing, f"{module.name} uses widgets that {ui_path.name} lacks: {missing}"
    assert len(widgets) > 5
