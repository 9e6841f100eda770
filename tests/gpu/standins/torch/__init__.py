"""Stand-in torch with one CUDA device that enforces the limits a real backend would.

MPS: when the control daemon runs (its state file in CUDA_MPS_PIPE_DIRECTORY), the client
registers with it and CUDA_MPS_PINNED_DEVICE_MEM_LIMIT's entry for device 0 caps memory.
HAMi: when LD_PRELOAD names an existing file, CUDA_DEVICE_MEMORY_LIMIT_0 caps memory and
mem_get_info() shows the cap as the total.  See README.md.
"""
import json
import os

uint8 = "uint8"
_state = {"limit": None, "used": 0, "total": 0}


def _mib(text: str) -> int:
    return int(text.rstrip("mMiB")) * 1024**2


def _enforcing() -> bool:
    return os.environ.get("BAI_STANDIN_IGNORE_LIMITS") != "1"


class _Cuda:
    class OutOfMemoryError(RuntimeError):
        pass

    def init(self):
        total = int(os.environ["BAI_STANDIN_GPU_BYTES"])
        _state.update(total=total, limit=None, used=0)
        pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
        state = os.path.join(pipe, "standin-daemon.json") if pipe else None
        if state and os.path.exists(state):  # MPS: a daemon answers, the client connects
            with open(state) as f:
                daemon = json.load(f)
            daemon["clients"].append(os.getpid())
            with open(state, "w") as f:
                json.dump(daemon, f)
            for entry in os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "").split(","):
                device, _, limit = entry.partition("=")
                if device == "0" and _enforcing():
                    _state["limit"] = _mib(limit)
        preload = os.environ.get("LD_PRELOAD", "")
        if preload and os.path.isfile(preload) and "CUDA_DEVICE_MEMORY_LIMIT_0" in os.environ and _enforcing():
            _state["limit"] = _state["shown"] = _mib(os.environ["CUDA_DEVICE_MEMORY_LIMIT_0"])

    def mem_get_info(self, device=0):
        total = _state.get("shown") or _state["total"]
        return total - _state["used"], total

    def synchronize(self):
        pass

    def empty_cache(self):
        pass


cuda = _Cuda()


class _Tensor:
    def __init__(self, nbytes):
        self.nbytes = nbytes

    def fill_(self, value):
        return self

    def __del__(self):
        _state["used"] -= self.nbytes


def empty(nbytes, dtype=None, device=None):
    cap = min(x for x in (_state["limit"], _state["total"]) if x is not None)
    if _state["used"] + nbytes > cap:
        raise cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")
    _state["used"] += nbytes
    return _Tensor(nbytes)
