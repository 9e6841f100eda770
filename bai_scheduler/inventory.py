"""The real GPUs of this machine, read with NVML (nvidia-ml-py): the inventory, and live use.

Nodes declared in config (sizes, GPU backend, simulated or declared GPUs) are parsed by the
pure ``core.nodes``, which calls ``nvml_devices`` for a node with gpus="auto"; both end as the
same ``Device`` values.
"""
from __future__ import annotations

import logging
import re
import time

from .core.model import Device
from .core.nodes import NoGpuError  # raised here, caught by core.nodes.nodes_from_config
from .core.units import FgpuUnits

log = logging.getLogger("bai_scheduler")


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _mig_sm_count(nv, handle) -> int:
    # nvmlDeviceGetAttributes(_v2) answers for MIG device handles only.
    get = getattr(nv, "nvmlDeviceGetAttributes", None) or getattr(nv, "nvmlDeviceGetAttributes_v2", None)
    if get is None:
        return 0
    try:
        return int(get(handle).multiprocessorCount)
    except Exception:  # not supported by this driver
        return 0


CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16


def cuda_sm_counts(lib=None) -> dict[str, int]:
    """SM count of every whole GPU by UUID ("GPU-…"), from the CUDA driver API.

    NVML has no SM count for a whole GPU (``nvmlDeviceGetAttributes`` supports MIG handles
    only); ``cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)`` has it.  Empty when the driver's
    libcuda cannot be loaded or initialised.
    """
    import ctypes

    if lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return {}
    out: dict[str, int] = {}
    try:
        if lib.cuInit(0) != 0:
            return {}
        count = ctypes.c_int()
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return {}
        get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
        for i in range(count.value):
            dev, sms, raw = ctypes.c_int(), ctypes.c_int(), (ctypes.c_ubyte * 16)()
            if (lib.cuDeviceGet(ctypes.byref(dev), i) != 0
                    or lib.cuDeviceGetAttribute(ctypes.byref(sms), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) != 0
                    or get_uuid(raw, dev) != 0):
                continue
            h = bytes(raw).hex()
            out[f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"] = sms.value
    except (AttributeError, OSError):  # an old driver without these entry points
        return out
    return out


def _mig_profile(nv, handle, name: str) -> str | None:
    # NVML names MIG devices like "NVIDIA A100-SXM4-40GB MIG 1g.5gb".
    m = re.search(r"MIG\s+(\S+)\s*$", name)
    if m:
        return m.group(1)
    get = getattr(nv, "nvmlDeviceGetAttributes", None)
    if get is None:
        return None
    try:
        attrs = get(handle)
        gib = round(int(attrs.memorySizeMB) / 1024)
        return f"{int(attrs.gpuInstanceSliceCount)}g.{gib}gb"
    except Exception:
        return None


def nvml_devices(units: FgpuUnits) -> tuple[Device, ...]:
    """The real GPUs of this machine, read with nvidia-ml-py (``pynvml``).

    A GPU with MIG mode on contributes one ``Device`` per MIG instance (with ``mig_parent``
    set to the physical GPU's UUID, ``mig_profile`` like "1g.5gb" and ``index`` the parent's
    index); each instance is scheduled as one whole GPU's worth of quanta.  SM counts come
    from NVML for MIG instances and from ``cuda_sm_counts()`` (the CUDA driver) for whole GPUs.
    Raises ``NoGpuError`` when NVML cannot start or sees no GPU.
    """
    try:
        import pynvml as nv
    except ImportError as e:
        raise NoGpuError(f"nvidia-ml-py (pynvml) is not installed: {e}") from None
    try:
        nv.nvmlInit()
    except Exception as e:
        raise NoGpuError(f"NVML could not start (no NVIDIA driver or GPU?): {e}") from None
    try:
        count = nv.nvmlDeviceGetCount()
        if count < 1:
            raise NoGpuError("NVML reports no GPU on this machine")
        devices: list[Device] = []
        whole_sms: dict[str, int] | None = None
        mig_enable = getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1)
        for i in range(count):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
            name = _text(nv.nvmlDeviceGetName(handle))
            memory = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
            mig_on = False
            try:
                current, _pending = nv.nvmlDeviceGetMigMode(handle)
                mig_on = current == mig_enable
            except Exception:  # not MIG-capable
                mig_on = False
            if not mig_on:
                if whole_sms is None:
                    whole_sms = cuda_sm_counts()
                devices.append(Device(uuid, i, name, memory, whole_sms.get(uuid, 0), units.quanta_per_gpu))
                continue
            for j in range(int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))):
                try:
                    mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                except Exception:  # empty slot (NVML_ERROR_NOT_FOUND)
                    continue
                mig_name = _text(nv.nvmlDeviceGetName(mig))
                devices.append(
                    Device(
                        uuid=_text(nv.nvmlDeviceGetUUID(mig)),
                        index=i,
                        name=mig_name,
                        memory_bytes=int(nv.nvmlDeviceGetMemoryInfo(mig).total),
                        sm_count=_mig_sm_count(nv, mig),
                        quanta=units.quanta_per_gpu,
                        mig_parent=uuid,
                        mig_profile=_mig_profile(nv, mig, mig_name),
                    )
                )
        if not devices:
            raise NoGpuError("NVML reports GPUs in MIG mode but no MIG instances are configured")
        return tuple(devices)
    except NoGpuError:
        raise
    except Exception as e:
        raise NoGpuError(f"NVML failed while reading the GPUs: {e}") from None
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


_live_cache: dict = {"at": 0.0, "data": {}}


def live_stats(nodes) -> dict:
    """Memory in use and utilization of the local real GPUs: {uuid: {"memory_used",
    "memory_total", "utilization"}}.

    Empty when every node is simulated, NVML is missing, or on any NVML error.
    Cached for a second so a page poll does not hammer the driver.
    """
    uuids = [d.uuid for n in nodes if not n.simulated and not n.docker_url for d in n.devices]
    if not uuids:
        return {}
    if time.monotonic() - _live_cache["at"] < 1.0:
        return _live_cache["data"]
    out = {}
    try:
        import pynvml as nv

        nv.nvmlInit()
        for uuid in uuids:
            try:
                h = nv.nvmlDeviceGetHandleByUUID(uuid)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:  # MIG instances have no utilization counter
                    util = None
                out[uuid] = {"memory_used": int(mem.used), "memory_total": int(mem.total), "utilization": util}
            except Exception:
                continue
    except Exception as e:
        log.debug("NVML live stats unavailable: %s", e)
    _live_cache.update(at=time.monotonic(), data=out)
    return out
