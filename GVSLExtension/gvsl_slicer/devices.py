"""The device choices of the GVSL panels, with GPU names (imports torch only when called)."""
from __future__ import annotations

import importlib.util
from typing import List, Tuple


def list_devices() -> List[Tuple[str, str]]:
    """[(value for --device, label)]: "auto", then every CUDA GPU ("cuda:0", "cuda:0 - NVIDIA
    RTX A6000, 48 GB"), Apple "mps" when available, then "cpu". Without torch: auto and cpu."""
    devices = [("auto", "auto (GPU if available, else CPU)")]
    if importlib.util.find_spec("torch") is None:
        return devices + [("cpu", "cpu")]
    import torch
    try:
        if torch.cuda.is_available():
            names = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                names.append(f"{props.name}, {props.total_memory / 2 ** 30:.0f} GB")
                devices.append((f"cuda:{i}", f"cuda:{i} - {names[-1]}"))
            devices[0] = ("auto", f"auto ({names[0]})" if names else devices[0][1])
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            devices.append(("mps", "mps (Apple GPU)"))
            if len(devices) == 2:
                devices[0] = ("auto", "auto (Apple GPU)")
    except Exception as exc:  # a broken driver must not break the panel  # noqa: BLE001
        devices.append(("cpu", f"cpu (GPU check failed: {exc})"))
        return devices
    if len(devices) == 1:
        devices[0] = ("auto", "auto (no GPU found: CPU)")
    return devices + [("cpu", "cpu")]
