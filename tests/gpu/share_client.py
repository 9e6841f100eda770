"""One CUDA client of tests/gpu/check_share.py, run in its own process with the environment
under test.  Prints one JSON object per line:

    {"event": "start", "pid": …, "free": …, "total": …}      torch.cuda.mem_get_info()
    {"event": "alloc", "bytes": N, "result": "ok" | "oom" | "error", "detail": …}
    {"event": "holding"}   the first allocation is held until a line arrives on stdin

    python share_client.py BYTES [BYTES …]

Each size is allocated (and written, so the memory is really used) in turn; the first one is
held while the caller looks around (e.g. asks the MPS daemon for its clients), then freed.
"""
import json
import os
import sys


def say(**event):
    print(json.dumps(event), flush=True)


def alloc(torch, nbytes: int):
    try:
        x = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        x.fill_(1)
        torch.cuda.synchronize()
        return x, "ok", None
    except Exception as e:  # noqa: BLE001 - classified below, never counted as success
        oom = isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()
        return None, "oom" if oom else "error", f"{type(e).__name__}: {str(e)[:300]}"


def main() -> int:
    import torch

    sizes = [int(s) for s in sys.argv[1:]]
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(0)
    say(event="start", pid=os.getpid(), free=int(free), total=int(total))
    for i, nbytes in enumerate(sizes):
        held, result, detail = alloc(torch, nbytes)
        say(event="alloc", bytes=nbytes, result=result, detail=detail)
        if i == 0 and held is not None:
            say(event="holding")
            sys.stdin.readline()
        del held
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
