"""Stand-in nvidia-ml-py: one GPU of BAI_STANDIN_GPU_BYTES (see README.md)."""
import os
import types

NVML_DEVICE_MIG_ENABLE = 1
UUID = "GPU-57a4d105-0000-4000-8000-000000000000"


class NVMLError(Exception):
    pass


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return 1


def nvmlDeviceGetHandleByIndex(i):
    return i


def nvmlDeviceGetUUID(handle):
    return UUID


def nvmlDeviceGetName(handle):
    return "Stand-in GPU"


def nvmlDeviceGetMemoryInfo(handle):
    total = int(os.environ["BAI_STANDIN_GPU_BYTES"])
    return types.SimpleNamespace(total=total, free=total, used=0)


def nvmlDeviceGetMigMode(handle):
    raise NVMLError("Not Supported")
