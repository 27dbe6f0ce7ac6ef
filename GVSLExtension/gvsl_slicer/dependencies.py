"""First-use installs of what GVSL needs in Slicer's Python: checked when a panel needs them,
never at module load; ONE confirmation listing every package; testing mode never installs.

* torch: through the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``, which
  asks light-the-torch for the build matching the NVIDIA driver). The installed version is
  checked against :data:`TORCH_REQUIREMENT` (an older torch is upgraded, then Slicer must be
  restarted), and a CPU-only build on a machine with an NVIDIA driver is reported.
* the rest (:data:`PIP_REQUIREMENTS`: MONAI, matplotlib): ``slicer.packaging.pip_ensure`` on
  Slicer >= 5.12, ``slicer.util.pip_install`` before; both with a constraints file that pins
  Slicer's own numpy, SimpleITK and vtk to their installed versions, so they are never replaced.

The decisions are plain functions of versions (tested without Slicer); :func:`ensure` is the
only part that talks to Slicer, and it takes the Slicer pieces as arguments when testing.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, List, Optional

TORCH_REQUIREMENT = ">=2.4"
PIP_REQUIREMENTS = ("monai>=1.4", "matplotlib>=3.7")
PROTECTED = ("numpy", "SimpleITK", "vtk")  # Slicer's own packages: pinned, never replaced


class DependencyError(RuntimeError):
    """A dependency is missing or unusable; the message says what to do."""


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution (from its metadata; nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple:
    nums = re.match(r"\s*(\d+(?:\.\d+)*)", version or "")
    return tuple(int(p) for p in nums.group(1).split(".")) if nums else ()


def satisfies(version: Optional[str], specifier: str) -> bool:
    """``version`` (e.g. "2.3.1+cu121") meets ``specifier`` (e.g. ">=2.4", ">=1.4,<2")."""
    if version is None:
        return False
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
        return Version(version) in SpecifierSet(specifier, prereleases=True)
    except ImportError:  # pragma: no cover - packaging ships with pip and with Slicer
        pass
    ops = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
           "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    for part in filter(None, (p.strip() for p in specifier.split(","))):
        op = re.match(r"(>=|<=|==|!=|>|<)", part).group(1)
        want = _release(part[len(op):])
        have = _release(version)[:len(want)] if op in ("==", "!=") else _release(version)
        if not ops[op](have, want):
            return False
    return True


def split_requirement(requirement: str) -> tuple:
    """"monai>=1.4" -> ("monai", ">=1.4")."""
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", requirement)
    return m.group(1), m.group(2).strip()


def nvidia_driver_present() -> bool:
    """An NVIDIA driver is installed (nvidia-smi on PATH, or the Linux driver's /proc entry)."""
    return bool(shutil.which("nvidia-smi")) or os.path.exists("/proc/driver/nvidia/version")


def torch_problem(version: Optional[str], requirement: str = TORCH_REQUIREMENT) -> Optional[str]:
    """Why the installed torch cannot be used (None when it can)."""
    if version is None:
        return "PyTorch is not installed"
    if not satisfies(version, requirement):
        return f"PyTorch {version} is installed but GVSL needs torch{requirement}"
    return None


def cuda_build_warning(cuda_build: Optional[str], driver_present: bool, platform_is_mac: bool = False) -> Optional[str]:
    """A warning when an NVIDIA GPU is there but torch cannot use it (``torch.version.cuda`` None)."""
    if cuda_build is None and driver_present and not platform_is_mac:
        return ("this PyTorch is a CPU-only build although an NVIDIA driver is installed, so GVSL runs on the "
                "CPU. To use the GPU: PyTorch Utils module > Uninstall PyTorch, restart Slicer, then Install "
                "PyTorch (it picks the CUDA build for your driver).")
    return None


def constraints_text(protected=PROTECTED) -> str:
    """pip constraints pinning Slicer's own packages to their installed versions."""
    lines = [f"{name}=={installed_version(name)}" for name in protected if installed_version(name)]
    return "\n".join(lines) + "\n"


@dataclass
class InstallPlan:
    """What :func:`ensure` would install. ``torch``: the reason torch must be (re)installed;
    ``torch_version``: the torch installed now (None when there is none)."""
    torch: Optional[str] = None
    pip: List[str] = field(default_factory=list)
    torch_version: Optional[str] = None

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.pip

    def message(self) -> str:
        """The one confirmation text, listing every package."""
        lines = ["GVSL needs these Python packages, which will be downloaded and installed now "
                 "(a few minutes; PyTorch with CUDA is about 2-3 GB):", ""]
        if self.torch:
            lines.append(f"  - torch{TORCH_REQUIREMENT} via the PyTorch extension ({self.torch}; the build "
                         "matching your NVIDIA driver, or the CPU build)")
        lines += [f"  - {req}" for req in self.pip]
        lines += ["", f"Slicer's own {', '.join(PROTECTED)} are kept as they are."]
        if self.torch and self.torch_version:
            lines.append("Slicer must be restarted after PyTorch is upgraded.")
        return "\n".join(lines)


def make_plan(pip_requirements=PIP_REQUIREMENTS, torch_requirement: str = TORCH_REQUIREMENT) -> InstallPlan:
    version = installed_version("torch")
    plan = InstallPlan(torch=torch_problem(version, torch_requirement), torch_version=version)
    for req in pip_requirements:
        name, spec = split_requirement(req)
        if not satisfies(installed_version(name), spec or ">=0"):
            plan.pip.append(req)
    return plan


def ensure(confirm: Optional[Callable[[str], bool]] = None, *, testing: Optional[bool] = None,
           slicer_module=None, torch_logic=None, plan: Optional[InstallPlan] = None) -> List[str]:
    """Make torch, MONAI and matplotlib usable; returns warnings (e.g. a CPU-only torch on a GPU box).

    confirm(text) -> bool: the one confirmation (default ``slicer.util.confirmOkCancelDisplay``).
    testing: Slicer's testing mode (default ``slicer.app.testingEnabled()``): never installs,
        raises :class:`DependencyError` naming what is missing.
    Raises :class:`DependencyError` when the user declines or a restart is needed.
    """
    plan = plan or make_plan()
    if not plan.empty:
        if slicer_module is None:
            import slicer as slicer_module
        if testing is None:
            testing = bool(slicer_module.app.testingEnabled())
        missing = ([f"torch{TORCH_REQUIREMENT} ({plan.torch})"] if plan.torch else []) + plan.pip
        if testing:
            raise DependencyError("testing mode never installs packages; missing: " + ", ".join(missing))
        confirm = confirm or slicer_module.util.confirmOkCancelDisplay
        if not confirm(plan.message()):
            raise DependencyError("GVSL cannot run without " + ", ".join(missing) + " (installation declined).")
        upgraded_torch = plan.torch is not None and plan.torch_version is not None
        if plan.torch:
            if torch_logic is None:
                try:
                    import PyTorchUtils
                except ModuleNotFoundError:
                    raise DependencyError("GVSL needs the PyTorch extension: install 'PyTorch' from the Extensions "
                                          "Manager, restart Slicer, and try again.") from None
                torch_logic = PyTorchUtils.PyTorchUtilsLogic()
            if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise DependencyError("PyTorch was not installed; use the PyTorch Utils module to install it.")
        if plan.pip:
            _pip_install(slicer_module, plan.pip)
        if upgraded_torch:
            raise DependencyError("PyTorch was upgraded: restart Slicer, then run GVSL again.")
        problem = torch_problem(installed_version("torch"))
        if problem:
            raise DependencyError(f"{problem} after the installation; use the PyTorch Utils module to fix it.")
    import sys
    import torch  # first use: checked after the installs, never at module load
    warning = cuda_build_warning(torch.version.cuda, nvidia_driver_present(), sys.platform == "darwin")
    return [warning] if warning else []


def _pip_install(slicer_module, requirements: List[str]) -> None:
    """pip_ensure (Slicer >= 5.12) or util.pip_install, with Slicer's own packages pinned."""
    folder = tempfile.mkdtemp(prefix="gvsl-pip-")
    constraints = os.path.join(folder, "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as f:
        f.write(constraints_text())
    try:
        packaging = getattr(slicer_module, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(list(requirements), constraints=constraints, prompt_install=False,
                                 requester="GVSL", skip_in_testing=True)
        else:
            slicer_module.util.pip_install(list(requirements) + ["-c", constraints])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
