"""gvsl_slicer: the Slicer-side toolkit shared by every GVSL panel (one place, no copies).

    jobs.Job / jobs.JobError       background ``gvsl`` commands: JSON progress, Cancel, kill (no Qt)
    qtjob.JobPoller                polls a Job from a QTimer in a widget (the only Qt part)
    dependencies                   torch (PyTorch extension) + MONAI & co. on first use, one confirmation
    devices.list_devices()         "auto", "cpu", "cuda:N (GPU name)", "mps" for the device combo boxes
    models                         the per-user models folder and the "current GVSL model" setting

Nothing here imports torch, MONAI or Qt at import time, and nothing installs anything at import.
"""
