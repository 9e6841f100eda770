"""Free capacity of the cluster and where a request goes.  Pure: no I/O.

``Capacity`` holds, for every device, how many fGPU quanta are free, and for every node how
much CPU and memory is left (0 capacity = not limited).  ``place`` answers where a request
would go without changing anything; ``take`` and ``give_back`` apply and undo a placement and
refuse anything that would over-allocate or return more than was taken.  The one exception is
``take(force=True)``: a session the engine shows running is counted even when its device is
already full (an over-commit found by reconcile); the excess is kept as that device's *debt*,
reported by ``overcommitted()`` and ``snapshot()``, and paid off first when shares come back.

Placement rules
---------------
* A request of at most one GPU's worth (``quanta <= quanta_per_gpu``) gets exactly one share of
  exactly that many quanta on one device: never split, never short.
* Above one GPU, ``span="whole-then-fraction"`` grants ``k`` whole free devices plus one share of
  the remainder on another device of the same node; ``span="whole-only"`` accepts only whole
  multiples of a GPU there (all devices whole and free, on one node).
* ``strategy="concentrate"`` is best fit: the device with the least free quanta that still fits,
  ties broken towards the fullest node (so whole devices and whole nodes stay free for large
  requests).  ``strategy="spread"`` is the opposite: emptiest device on the emptiest node.
* CPU-only requests (0 quanta) get a placement without shares on a node with CPU/memory room.
* A node's GPU backend (``Node.gpu``) limits what one session may hold there: "whole" and "mig"
  nodes give whole devices only, "mps" nodes no fraction next to whole GPUs (one SM percentage
  per process), "mig" nodes one device per session (CUDA enumerates one MIG instance per process).
* A request with ``pools`` goes only to nodes of those pools (``Node.pool``); every rule above
  holds within them.
* ``set_gpu_ready(node, False)`` takes a node's GPUs out of placement (its backend cannot enforce
  shares now); CPU-only requests still go there.  Allocations already made are kept.
* Images (``set_node_images``): when the place chosen is on an empty node that lacks the request's
  image, and an empty twin of that node (the same devices, CPU, memory, backend, readiness and pool,
  no session, nothing reserved) holds it, the twin gets the request instead, so it pulls nothing.  The
  two nodes also swap their places in the order that breaks every other tie (their *rank*), which
  makes the result exactly the placement without images with the two nodes' names exchanged: the
  preference never admits less, sooner or later (``benchmarks/scheduler_bench.py --images`` replays
  the churn trace with and without it).  Among nodes with sessions there is no such exchange (their
  sessions end at other times), so no preference either.

Speed
-----
No full scans per request.  Devices sit in one lazy heap per amount of free quanta (keyed by
how full their node is); nodes sit in one lazy heap per count of fully free devices.  A change to
a node bumps its version and re-pushes its entries (O(devices per node · log n)); stale entries
are dropped when they reach the top, and the heaps are rebuilt when stale entries pile up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush

from .model import Node, Placement, Request, Share
from .units import FgpuUnits, format_bytes

SPANS = ("whole-then-fraction", "whole-only")
STRATEGIES = ("concentrate", "spread")
# How many nodes holding a request's image the image preference looks at.
TIE_SCAN = 32


@dataclass(frozen=True)
class Reservation:
    """Resources held back for a request that does not fit yet (see ``Capacity.reserve``)."""

    node: str
    devices: tuple[str, ...]
    cpu_millis: int = 0
    memory_bytes: int = 0


@dataclass
class Reservations:
    """A set of reservations that ``Capacity.place`` must not use (one scheduling pass)."""

    items: list[Reservation] = field(default_factory=list)
    devices: set[int] = field(default_factory=set)  # internal device indexes
    node_cpu: dict[int, int] = field(default_factory=dict)  # internal node index -> millis held
    node_mem: dict[int, int] = field(default_factory=dict)

    def __bool__(self):
        return bool(self.items)

    def __len__(self):
        return len(self.items)


def _cores(millis: int) -> str:
    return f"{millis / 1000:g}"


class Capacity:
    """Free-capacity state of a set of nodes (see the module docstring for the rules)."""

    def __init__(
        self,
        nodes: list[Node],
        quanta_per_gpu: int,
        span: str = "whole-then-fraction",
        strategy: str = "concentrate",
        *,
        units: FgpuUnits | None = None,
    ):
        if span not in SPANS:
            raise ValueError(f"span must be one of {', '.join(SPANS)}, not {span!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        if int(quanta_per_gpu) < 1:
            raise ValueError("quanta_per_gpu must be a positive integer")
        self.quanta_per_gpu = Q = int(quanta_per_gpu)
        if units is None:
            units = FgpuUnits(fgpu_per_gpu=Q, fgpu_step=1)
        elif units.quanta_per_gpu != Q:
            raise ValueError("units.quanta_per_gpu does not match quanta_per_gpu")
        self.units = units
        self._fmt: dict[int, str] = {}
        self.span = span
        self.strategy = strategy
        self._concentrate = strategy == "concentrate"
        self.nodes: list[Node] = list(nodes)

        self._node_idx: dict[str, int] = {}
        self._dev_idx: dict[str, int] = {}
        self._dev_uuid: list[str] = []
        self._cap: list[int] = []
        self._free: list[int] = []
        self._debt: list[int] = []  # quanta in use beyond capacity (forced takes), per device
        self._dev_node: list[int] = []
        self._node_devs: list[list[int]] = []
        for ni, node in enumerate(self.nodes):
            if node.name in self._node_idx:
                raise ValueError(f"duplicate node name {node.name!r}")
            if node.cpu_millis < 0 or node.memory_bytes < 0:
                raise ValueError(f"node {node.name!r}: negative CPU or memory capacity")
            self._node_idx[node.name] = ni
            devs = []
            for dev in node.devices:
                if dev.uuid in self._dev_idx:
                    raise ValueError(f"duplicate device uuid {dev.uuid!r}")
                if dev.quanta < 1:
                    raise ValueError(f"device {dev.uuid!r}: capacity must be at least 1 quantum")
                di = len(self._cap)
                self._dev_idx[dev.uuid] = di
                self._dev_uuid.append(dev.uuid)
                self._cap.append(dev.quanta)
                self._free.append(dev.quanta)
                self._debt.append(0)
                self._dev_node.append(ni)
                devs.append(di)
            self._node_devs.append(devs)
        n = len(self.nodes)
        self._maxcap = max(self._cap, default=Q)
        self._maxcap = max(self._maxcap, Q)
        self._count = [0] * (self._maxcap + 1)  # devices by free quanta
        for f in self._free:
            self._count[f] += 1
        self._node_free = [sum(self._cap[d] for d in devs) for devs in self._node_devs]
        # "whole" devices: capacity exactly one GPU's worth and entirely free
        self._whole = [sum(1 for d in devs if self._cap[d] == Q) for devs in self._node_devs]
        self._cpu_cap = [nd.cpu_millis for nd in self.nodes]
        self._mem_cap = [nd.memory_bytes for nd in self.nodes]
        self._cpu_used = [0] * n
        self._mem_used = [0] * n
        self._ver = [0] * n
        # Ties between otherwise equal nodes go to the lower rank (the image preference exchanges
        # the ranks of two empty twins); a session count tells an empty node.
        self._rank = list(range(n))
        self._by_rank = list(range(n))
        self._sessions = [0] * n
        self._node_images: list[frozenset[str]] = [frozenset()] * n
        self._holders: dict[str, set[int]] = {}  # image reference -> nodes holding it
        self._maxdevs = max((len(d) for d in self._node_devs), default=0)
        self.total_quanta = sum(self._cap)
        self.used_quanta = 0
        self.total_cpu_millis = 0 if any(c == 0 for c in self._cpu_cap) else sum(self._cpu_cap)
        self.total_memory_bytes = 0 if any(m == 0 for m in self._mem_cap) else sum(self._mem_cap)
        self._rebuild()
        # What each node's GPU backend lets one session hold there, and whether its GPUs are
        # usable now (see the module docstring).
        self._fractions = [nd.gpu.fractions for nd in self.nodes]
        self._mixed = [nd.gpu.mixed for nd in self.nodes]
        self._multi = [nd.gpu.multi_device for nd in self.nodes]
        self._gpu_off = [False] * n
        self._missing: dict[tuple, str | None] = {}  # wait reasons by request shape, until a change
        self._restricted = False
        self._update_restricted()
        self._shapes = self._node_shapes(range(n))
        # Node pools: the nodes a request limited to some pools may use (see allowed_nodes)
        self._pool_nodes: dict[str, set[int]] = {}
        for ni, node in enumerate(self.nodes):
            self._pool_nodes.setdefault(node.pool, set()).add(ni)
        self._allowed: dict[tuple[str, ...], frozenset[int] | None] = {(): None}

    def _node_shapes(self, indexes) -> list[tuple]:
        """Node shapes for can_ever_fit: (whole-capable devices, biggest device, cpu, mem,
        fractions allowed, fraction next to whole GPUs allowed, several devices allowed)."""
        Q = self.quanta_per_gpu
        return sorted(
            {
                (
                    sum(1 for d in self._node_devs[ni] if self._cap[d] == Q),
                    max((self._cap[d] for d in self._node_devs[ni]), default=0),
                    self._cpu_cap[ni],
                    self._mem_cap[ni],
                    self._fractions[ni],
                    self._mixed[ni],
                    self._multi[ni],
                )
                for ni in indexes
            }
        )

    def allowed_nodes(self, pools: tuple[str, ...]) -> frozenset[int] | None:
        """Internal indexes of the nodes in ``pools``; None when that is every node (no limit).
        An unknown pool has no nodes."""
        found = self._allowed.get(pools, False)
        if found is False:
            nodes = frozenset().union(*(self._pool_nodes.get(p, ()) for p in pools))
            found = self._allowed[pools] = None if len(nodes) == len(self.nodes) else nodes
        return found

    def pools(self) -> dict[str, list[str]]:
        """Pool name -> names of its nodes."""
        return {p: [self.nodes[ni].name for ni in sorted(nis)] for p, nis in sorted(self._pool_nodes.items())}

    def _update_restricted(self):
        # Fast path: with no backend limits and every node ready, placement skips the checks.
        self._restricted = any(self._gpu_off) or not (
            all(self._fractions) and all(self._mixed) and all(self._multi)
        )

    @property
    def restricted(self) -> bool:
        """True if some node's GPU backend limits what a session may hold, or some node's GPUs
        are out of service: a larger request may then fit where a smaller one does not."""
        return self._restricted

    def set_gpu_ready(self, name: str, ready: bool) -> None:
        """Let placement use node ``name``'s GPUs (ready) or not (CPU-only requests still go there)."""
        self._gpu_off[self._node_idx[name]] = not ready
        self._missing = {}
        self._update_restricted()

    def gpu_ready(self, name: str) -> bool:
        return not self._gpu_off[self._node_idx[name]]

    def _refuses(self, ni: int, di: int, q: int) -> bool:
        """True if a one-device share of ``q`` quanta may not go on device ``di`` of node ``ni``."""
        return self._gpu_off[ni] or (q < self._cap[di] and not self._fractions[ni])

    def _refuses_multi(self, ni: int, r: int) -> bool:
        """True if node ``ni`` may not hold a session spanning devices (remainder ``r``)."""
        return self._gpu_off[ni] or not self._multi[ni] or (r and not self._mixed[ni])

    # ------------------------------------------------------------------ indexes
    def _dkey(self, ni: int) -> int:
        fill = self._node_free[ni] if self._concentrate else -self._node_free[ni]
        return fill * len(self.nodes) + self._rank[ni]

    def _rebuild(self):
        self._heaps: list[list] = [[] for _ in range(self._maxcap + 1)]
        self._nheaps: list[list] = [[] for _ in range(self._maxdevs + 1)]
        for ni, devs in enumerate(self._node_devs):
            key = self._dkey(ni)
            ver = self._ver[ni]
            for di in devs:
                f = self._free[di]
                if f:
                    self._heaps[f].append((key, ni, di, ver))
            if self._whole[ni]:
                self._nheaps[self._whole[ni]].append((key, ni, ver))
        for h in self._heaps:
            heapify(h)
        for h in self._nheaps:
            heapify(h)
        self._entries = sum(map(len, self._heaps)) + sum(map(len, self._nheaps))
        self._entry_limit = 4 * (len(self._cap) + len(self.nodes)) + 4096

    def _touch(self, ni: int):
        ver = self._ver[ni] + 1
        self._ver[ni] = ver
        key = self._dkey(ni)
        heaps = self._heaps
        free = self._free
        pushed = 0
        for di in self._node_devs[ni]:
            f = free[di]
            if f:
                heappush(heaps[f], (key, ni, di, ver))
                pushed += 1
        w = self._whole[ni]
        if w:
            heappush(self._nheaps[w], (key, ni, ver))
            pushed += 1
        self._entries += pushed
        if self._entries > self._entry_limit:
            self._rebuild()

    def _room(self, ni: int, cpu: int, mem: int, res: Reservations | None) -> bool:
        if cpu:
            cap = self._cpu_cap[ni]
            if cap:
                held = res.node_cpu.get(ni, 0) if res else 0
                if self._cpu_used[ni] + held + cpu > cap:
                    return False
        if mem:
            cap = self._mem_cap[ni]
            if cap:
                held = res.node_mem.get(ni, 0) if res else 0
                if self._mem_used[ni] + held + mem > cap:
                    return False
        return True

    # ------------------------------------------------------------------ images
    def set_node_images(self, name: str, refs) -> None:
        """The image references node ``name`` holds (see "Images" in the module docstring)."""
        ni = self._node_idx[name]
        new, old = frozenset(refs), self._node_images[ni]
        for ref in old - new:
            held = self._holders[ref]
            held.discard(ni)
            if not held:
                del self._holders[ref]
        for ref in new - old:
            self._holders.setdefault(ref, set()).add(ni)
        self._node_images[ni] = new

    def _twins(self, a: int, b: int) -> bool:
        """Two nodes placement cannot tell apart: the same devices in the same order, the same CPU
        and memory, GPU backend, readiness and pool, and no session on either."""
        return (not self._sessions[a] and not self._sessions[b]
                and [self._cap[d] for d in self._node_devs[a]] == [self._cap[d] for d in self._node_devs[b]]
                and self._cpu_cap[a] == self._cpu_cap[b] and self._mem_cap[a] == self._mem_cap[b]
                and self._gpu_off[a] == self._gpu_off[b] and self.nodes[a].gpu == self.nodes[b].gpu
                and self.nodes[a].pool == self.nodes[b].pool)

    @staticmethod
    def _reserved_on(ni: int, devs, res: Reservations | None) -> bool:
        return bool(res) and (ni in res.node_cpu or ni in res.node_mem or any(d in res.devices for d in devs))

    def _prefer_holder(self, p: Placement, image: str, res: Reservations | None) -> Placement:
        """``p``, or the same placement on an empty twin of its node that holds ``image``."""
        ni = self._node_idx[p.node]
        holders = self._holders.get(image)
        if not holders or ni in holders or self._sessions[ni] or self._reserved_on(ni, self._node_devs[ni], res):
            return p
        for hi in sorted(holders, key=self._rank.__getitem__)[:TIE_SCAN]:
            if self._twins(ni, hi) and not self._reserved_on(hi, self._node_devs[hi], res):
                self._swap_ranks(ni, hi)
                at = {self._dev_uuid[d]: pos for pos, d in enumerate(self._node_devs[ni])}
                twin = self._node_devs[hi]
                return Placement(self.nodes[hi].name,
                                 tuple(Share(self._dev_uuid[twin[at[s.device_uuid]]], s.quanta) for s in p.shares),
                                 p.cpu_millis, p.memory_bytes)
        return p

    def _swap_ranks(self, a: int, b: int) -> None:
        """Exchange the tie-breaking places of two empty twins: nothing else can tell them apart, so
        every later decision is the one it would have been, with their names exchanged."""
        ra, rb = self._rank[a], self._rank[b]
        self._rank[a], self._rank[b] = rb, ra
        self._by_rank[ra], self._by_rank[rb] = b, a
        self._touch(a)
        self._touch(b)

    # ------------------------------------------------------------------ queries
    def place(self, request: Request, reserved: Reservations | None = None) -> Placement | None:
        """Where ``request`` would go now (avoiding ``reserved``), or None.  Changes nothing but, for
        the image preference, the tie order of two empty twin nodes (see the module docstring)."""
        p = self._place(request, reserved)
        if p is not None and request.image and self._holders:
            p = self._prefer_holder(p, request.image, reserved)
        return p

    def _place(self, request: Request, reserved: Reservations | None) -> Placement | None:
        q = request.quanta
        cpu = request.cpu_millis
        mem = request.memory_bytes
        if q < 0 or cpu < 0 or mem < 0:
            return None
        allowed = self.allowed_nodes(request.pools) if request.pools else None
        if q == 0:
            ni = self._place_cpu_only(cpu, mem, reserved, allowed)
            if ni is None:
                return None
            return Placement(self.nodes[ni].name, (), cpu, mem)
        if q <= self.quanta_per_gpu:
            found = self._place_fraction(q, cpu, mem, reserved, allowed)
            if found is None:
                return None
            ni, di = found
            return Placement(self.nodes[ni].name, (Share(self._dev_uuid[di], q),), cpu, mem)
        return self._place_multi(q, cpu, mem, reserved, allowed)

    def _place_cpu_only(self, cpu, mem, res, allowed):
        best = None
        for ni in self._by_rank if allowed is None else [ni for ni in self._by_rank if ni in allowed]:
            if self._room(ni, cpu, mem, res):
                if self._concentrate:
                    return ni
                if best is None or self._cpu_used[ni] < self._cpu_used[best]:
                    best = ni
        return best

    def _place_fraction(self, q, cpu, mem, res, allowed):
        heaps = self._heaps
        count = self._count
        free = self._free
        ver = self._ver
        excl = res.devices if res else ()
        check_room = bool(cpu or mem)
        restricted = self._restricted
        fr = range(q, self._maxcap + 1) if self._concentrate else range(self._maxcap, q - 1, -1)
        for f in fr:
            if not count[f]:
                continue
            h = heaps[f]
            stash = None
            found = None
            while h:
                e = h[0]
                ni = e[1]
                di = e[2]
                if e[3] != ver[ni] or free[di] != f:
                    heappop(h)
                    self._entries -= 1
                    continue
                if (di in excl or (check_room and not self._room(ni, cpu, mem, res))
                        or (restricted and self._refuses(ni, di, q))
                        or (allowed is not None and ni not in allowed)):
                    if stash is None:
                        stash = []
                    stash.append(heappop(h))
                    continue
                found = (ni, di)
                break
            if stash:
                for e in stash:
                    heappush(h, e)
            if found:
                return found
        return None

    def _place_multi(self, q, cpu, mem, res, allowed):
        Q = self.quanta_per_gpu
        k, r = divmod(q, Q)
        if r and self.span == "whole-only":
            return None
        need = k + (1 if r else 0)
        if need > self._maxdevs:
            return None
        nheaps = self._nheaps
        ver = self._ver
        whole = self._whole
        cr = range(k, self._maxdevs + 1) if self._concentrate else range(self._maxdevs, k - 1, -1)
        for c in cr:
            h = nheaps[c]
            stash = None
            found = None
            while h:
                e = h[0]
                ni = e[1]
                if e[2] != ver[ni] or whole[ni] != c:
                    heappop(h)
                    self._entries -= 1
                    continue
                found = None if allowed is not None and ni not in allowed else self._multi_on_node(
                    ni, k, r, cpu, mem, res)
                if found is not None:
                    break
                if stash is None:
                    stash = []
                stash.append(heappop(h))
            if stash:
                for e in stash:
                    heappush(h, e)
            if found is not None:
                return found
        return None

    def _multi_on_node(self, ni, k, r, cpu, mem, res):
        if (self._restricted and self._refuses_multi(ni, r)) or not self._room(ni, cpu, mem, res):
            return None
        Q = self.quanta_per_gpu
        excl = res.devices if res else ()
        wholes = []
        rest = []
        for di in self._node_devs[ni]:
            if di in excl:
                continue
            if self._cap[di] == Q and self._free[di] == Q and len(wholes) < k:
                wholes.append(di)
            else:
                rest.append(di)
        if len(wholes) < k:
            return None
        shares = [Share(self._dev_uuid[di], Q) for di in wholes]
        if r:
            cands = [di for di in rest if self._free[di] >= r]
            if not cands:
                return None
            if self._concentrate:
                di = min(cands, key=lambda d: (self._free[d], d))
            else:
                di = min(cands, key=lambda d: (-self._free[d], d))
            shares.append(Share(self._dev_uuid[di], r))
        return Placement(self.nodes[ni].name, tuple(shares), cpu, mem)

    def max_free(self, reserved: Reservations | None = None) -> int:
        """The most free quanta on any one device not held in ``reserved``."""
        excl_at: dict[int, int] = {}
        if reserved:
            for di in reserved.devices:
                f = self._free[di]
                excl_at[f] = excl_at.get(f, 0) + 1
        count = self._count
        for f in range(self._maxcap, 0, -1):
            c = count[f]
            if c and c > excl_at.get(f, 0):
                return f
        return 0

    def reserve(
        self, request: Request, reserved: Reservations | None = None, only_nodes=None, only_devices=None
    ) -> Reservation | None:
        """Hold back the resources ``request`` is closest to getting, so backfill avoids them.

        For up to one GPU: the device (not yet reserved) with the most free quanta.  Above one
        GPU: the node with the most free quanta and its freest devices.  Without GPU: the first
        node (in tie order, see "Images") that could host it.  The node's CPU and memory the request needs are held too.
        ``only_nodes`` and ``only_devices`` (internal indexes) limit the choice, as do the
        request's pools.  The reservation
        is added to ``reserved`` when given.  None when nothing could host the request.

        The choice never changes when capacity outside the chosen devices is taken (a device
        that is freest stays freest when others fill up), so a reservation made in one pass
        is the one a later pass would make, as long as nothing was given back.
        """
        q, cpu, mem = request.quanta, request.cpu_millis, request.memory_bytes
        Q = self.quanta_per_gpu
        excl = set(reserved.devices) if reserved else set()
        if only_devices is not None:
            excl.update(d for d in range(len(self._cap)) if d not in only_devices)

        allowed = self.allowed_nodes(request.pools) if request.pools else None

        def could_host(ni):
            return (only_nodes is None or ni in only_nodes) and (allowed is None or ni in allowed) and (
                not cpu or not self._cpu_cap[ni] or self._cpu_cap[ni] >= cpu) and (
                not mem or not self._mem_cap[ni] or self._mem_cap[ni] >= mem
            )

        best = None
        if q == 0:
            # The first node in tie order, not by current use: that changes as backfill fills
            # the node (see above).
            ni = next((ni for ni in self._by_rank if could_host(ni)), None)
            if ni is not None:
                best = (0, ni, ())
        elif q <= Q:
            for ni in self._by_rank:
                for di in self._node_devs[ni]:
                    f = self._free[di]
                    if di in excl or self._cap[di] < q:
                        continue
                    if self._restricted and self._refuses(ni, di, q):
                        continue
                    if could_host(ni) and (best is None or f > best[0]):
                        best = (f, ni, (di,))
        else:
            k, r = divmod(q, Q)
            if r and self.span == "whole-only":
                return None
            need = k + (1 if r else 0)
            free = self._free
            for ni in self._by_rank:
                devs = self._node_devs[ni]
                if len(devs) < need or (best is not None and self._node_free[ni] <= best[0]):
                    continue  # cannot beat the best node found so far
                if self._restricted and self._refuses_multi(ni, r):
                    continue
                usable = [d for d in devs if d not in excl and self._cap[d] == Q]
                if len(usable) < need or not could_host(ni):
                    continue
                if len(usable) > need:
                    usable.sort(key=lambda d: (-free[d], d))
                    usable = usable[:need]
                f = sum(free[d] for d in usable)
                if best is None or f > best[0]:
                    best = (f, ni, tuple(usable))
        if best is None:
            return None
        _, ni, devs = best
        res = Reservation(self.nodes[ni].name, tuple(self._dev_uuid[d] for d in devs), cpu, mem)
        if reserved is not None:
            reserved.items.append(res)
            reserved.devices.update(devs)
            if cpu:
                reserved.node_cpu[ni] = reserved.node_cpu.get(ni, 0) + cpu
            if mem:
                reserved.node_mem[ni] = reserved.node_mem.get(ni, 0) + mem
        return res

    def hold(self, reservation: Reservation, reserved: Reservations) -> None:
        """Add a reservation made earlier (by ``reserve``) to ``reserved``."""
        ni = self._node_idx[reservation.node]
        reserved.items.append(reservation)
        reserved.devices.update(self._dev_idx[u] for u in reservation.devices)
        if reservation.cpu_millis:
            reserved.node_cpu[ni] = reserved.node_cpu.get(ni, 0) + reservation.cpu_millis
        if reservation.memory_bytes:
            reserved.node_mem[ni] = reserved.node_mem.get(ni, 0) + reservation.memory_bytes

    def node_index(self, name: str) -> int:
        return self._node_idx[name]

    def device_index(self, uuid: str) -> int:
        return self._dev_idx[uuid]

    def node_devices(self, ni: int) -> list[int]:
        """Internal indexes of node ``ni``'s devices."""
        return self._node_devs[ni]

    def device_capacity(self, di: int) -> int:
        return self._cap[di]

    def fmt(self, quanta: int) -> str:
        text = self._fmt.get(quanta)
        if text is None:  # wait reasons repeat the same few amounts for every queued request
            text = self._fmt[quanta] = f"{self.units.to_fgpu(quanta)} fGPU"
        return text

    def hosts(self, ni: int, request: Request) -> bool:
        """True if node ``ni`` could run ``request`` when nothing else runs there (its GPU
        backend's limits and the request's pools included; whether its GPUs are ready now is not
        asked)."""
        q, cpu, mem = request.quanta, request.cpu_millis, request.memory_bytes
        if request.pools:
            allowed = self.allowed_nodes(request.pools)
            if allowed is not None and ni not in allowed:
                return False
        if (cpu and self._cpu_cap[ni] and self._cpu_cap[ni] < cpu) or (
                mem and self._mem_cap[ni] and self._mem_cap[ni] < mem):
            return False
        Q = self.quanta_per_gpu
        devs = self._node_devs[ni]
        if q <= Q:
            return q == 0 or any(self._cap[d] >= q and (self._fractions[ni] or self._cap[d] == q) for d in devs)
        k, r = divmod(q, Q)
        if (r and self.span == "whole-only") or not self._multi[ni] or (r and not self._mixed[ni]):
            return False
        return sum(1 for d in devs if self._cap[d] == Q) >= k + (1 if r else 0)

    def refuses(self, di: int, q: int) -> bool:
        """True if a share of ``q`` quanta may not go on device ``di`` now (backend, readiness)."""
        return self._refuses(self._dev_node[di], di, q)

    def gpu_off(self, ni: int) -> bool:
        return self._gpu_off[ni]

    def _device_label(self, di: int) -> str:
        ni = self._dev_node[di]
        dev = self.nodes[ni].devices[self._node_devs[ni].index(di)]
        return f"GPU {dev.index}" + (f" of {self.nodes[ni].name}" if len(self.nodes) > 1 else "")

    def _node_room(self, ni: int) -> str:
        """What CPU and memory node ``ni`` has left, e.g. "1 CPU and 2 GiB memory free on local"."""
        parts = []
        if self._cpu_cap[ni]:
            parts.append(f"{_cores(self._cpu_cap[ni] - self._cpu_used[ni])} CPU")
        if self._mem_cap[ni]:
            parts.append(f"{format_bytes(self._mem_cap[ni] - self._mem_used[ni])} memory")
        return f"{' and '.join(parts) or 'no room'} free on {self.nodes[ni].name}"

    def missing(self, request: Request) -> str | None:
        """What keeps ``request`` from starting now, the queue aside, or None if it fits now, e.g.
        "needs 1 fGPU; 0.5 free on GPU 0".  For the wait reasons people read: it scans every
        device, so the answer is kept per request shape until the next change."""
        shape = (request.quanta, request.cpu_millis, request.memory_bytes)
        if shape not in self._missing:
            self._missing[shape] = self._what_is_missing(request)
        return self._missing[shape]

    def _what_is_missing(self, request: Request) -> str | None:
        if self.place(request) is not None:
            return None
        q, cpu, mem = request.quanta, request.cpu_millis, request.memory_bytes
        Q = self.quanta_per_gpu
        asks = " and ".join(p for p in (f"{_cores(cpu)} CPU" if cpu else "",
                                        f"{format_bytes(mem)} memory" if mem else "") if p)
        if q == 0:
            best = max(range(len(self.nodes)), key=lambda ni: (self._cpu_cap[ni] - self._cpu_used[ni],
                                                               self._mem_cap[ni] - self._mem_used[ni]))
            return f"needs {asks}; {'at most ' if len(self.nodes) > 1 else ''}{self._node_room(best)}"
        if q <= Q:
            usable = [di for di in range(len(self._cap))
                      if self._cap[di] >= q and not self._refuses(self._dev_node[di], di, q)]
            if not usable:
                return f"needs {self.fmt(q)}; no GPU that could hold it is ready now"
            fitting = [di for di in usable if self._free[di] >= q]
            if fitting:  # the GPU share is there; CPU or memory on those nodes is not
                ni = max({self._dev_node[di] for di in fitting},
                         key=lambda n: (self._cpu_cap[n] - self._cpu_used[n], self._mem_cap[n] - self._mem_used[n]))
                return f"needs {self.fmt(q)} with {asks}; {self._node_room(ni)}"
            best = max(usable, key=lambda di: (self._free[di], -di))
            if len(usable) == 1 and not self._free[best]:
                return f"needs {self.fmt(q)}; {self._device_label(best)} is fully in use"
            if len(usable) == 1:
                return f"needs {self.fmt(q)}; {self.units.to_fgpu(self._free[best])} free on {self._device_label(best)}"
            if not self._free[best]:
                return f"needs {self.fmt(q)} on one GPU; every GPU is fully in use"
            return (f"needs {self.fmt(q)} on one GPU; at most {self.units.to_fgpu(self._free[best])} "
                    f"free on one ({self._device_label(best)})")
        k, r = divmod(q, Q)
        gpus = k + (1 if r else 0)
        nodes = [ni for ni in range(len(self.nodes)) if not self._refuses_multi(ni, r)
                 and sum(1 for di in self._node_devs[ni] if self._cap[di] == Q) >= gpus]
        if not nodes:
            return f"needs {self.fmt(q)} on {gpus} GPUs of one node; no such node is ready now"
        best = max(nodes, key=lambda ni: (self._whole[ni], -ni))
        if self._whole[best] >= k:  # the whole GPUs are there: the remainder, CPU or memory is not
            return (f"needs {self.fmt(q)} on {gpus} GPUs of one node"
                    + (f" with {asks}; {self._node_room(best)}" if asks else
                       f"; {self._whole[best]} whole GPUs free on {self.nodes[best].name}, "
                       f"but no other GPU there has {self.units.to_fgpu(r)} free"))
        return (f"needs {self.fmt(q)} on {gpus} GPUs of one node; at most {self._whole[best]} whole "
                f"GPU{'s' if self._whole[best] != 1 else ''} free on one node ({self.nodes[best].name})")

    def can_ever_fit(self, request: Request) -> str | None:
        """None if ``request`` fits on some node (of its pools) when that node is empty, else why not."""
        if request.pools:
            allowed = self.allowed_nodes(request.pools)
            if allowed is not None:
                where = f"pool{'s' if len(request.pools) > 1 else ''} {', '.join(request.pools)}"
                if not allowed:
                    return f"there are no nodes in {where}"
                reason = self._can_ever_fit(request, self._node_shapes(sorted(allowed)))
                return f"{reason} (in {where})" if reason else None
        return self._can_ever_fit(request, self._shapes)

    def _can_ever_fit(self, request: Request, all_shapes: list[tuple]) -> str | None:
        q, cpu, mem = request.quanta, request.cpu_millis, request.memory_bytes
        Q = self.quanta_per_gpu
        if q < 0 or cpu < 0 or mem < 0:
            return "asks for a negative amount"
        if not self.nodes:
            return "there are no nodes"

        def host_cpu_mem(shape):
            c, m = shape[2], shape[3]
            return (not cpu or not c or c >= cpu) and (not mem or not m or m >= mem)

        shapes = [s for s in all_shapes if host_cpu_mem(s)]
        if not shapes:
            if cpu and all(s[2] and s[2] < cpu for s in all_shapes):
                biggest = max(s[2] for s in all_shapes)
                return f"asks for {_cores(cpu)} CPU but the largest node has {_cores(biggest)} CPU"
            if mem and all(s[3] and s[3] < mem for s in all_shapes):
                biggest = max(s[3] for s in all_shapes)
                return (
                    f"asks for {format_bytes(mem)} memory but the largest node has "
                    f"{format_bytes(biggest)}"
                )
            return (
                f"asks for {_cores(cpu)} CPU and {format_bytes(mem)} memory; "
                "no node has both"
            )
        if q == 0:
            return None
        if not any(s[1] for s in all_shapes):
            return f"asks for {self.fmt(q)} but {'this cluster has' if all_shapes is self._shapes else 'these nodes have'} no GPU"
        if q <= Q:
            if any(s[1] >= q and (s[4] or q == s[1]) for s in shapes):
                return None
            if any(s[1] >= q for s in shapes):
                return (
                    f"asks for {self.fmt(q)}, a fraction of a GPU, but the nodes with room give whole "
                    f"GPUs only (GPU backend 'whole' or 'mig'); ask for {self.fmt(Q)}"
                )
            biggest = max(s[1] for s in shapes)
            return f"asks for {self.fmt(q)} but the largest device has {self.fmt(biggest)}"
        k, r = divmod(q, Q)
        if r and self.span == "whole-only":
            return (
                f"asks for {self.fmt(q)}; above one GPU ({self.fmt(Q)}) only whole GPUs can be "
                f"granted, i.e. multiples of {self.fmt(Q)}"
            )
        need = k + (1 if r else 0)
        if any(s[0] >= need and s[6] and (not r or s[5]) for s in shapes):
            return None
        big = [s for s in shapes if s[0] >= need]
        if big and not any(s[6] for s in big):
            return (
                f"asks for {self.fmt(q)} on several GPUs, but the nodes with room are MIG nodes, which "
                f"give one MIG instance per session (CUDA sees one per process); ask for at most "
                f"{self.fmt(Q)}"
            )
        if big:
            return (
                f"asks for {self.fmt(q)}: whole GPUs plus a fraction, which the GPU backend of the "
                f"nodes with room ('mps' or 'whole') cannot enforce; ask for a multiple of {self.fmt(Q)}"
            )
        biggest = max(s[0] for s in shapes) * Q
        all_biggest = max(s[0] for s in all_shapes) * Q
        if all_biggest >= q:
            return (
                f"asks for {self.fmt(q)} with {_cores(cpu)} CPU and {format_bytes(mem)} memory; "
                "no node has all of that"
            )
        return f"asks for {self.fmt(q)} but the largest node has {self.fmt(biggest)}"

    # ------------------------------------------------------------------ changes
    def _resolve(self, placement: Placement):
        ni = self._node_idx.get(placement.node)
        if ni is None:
            raise ValueError(f"unknown node {placement.node!r}")
        if placement.cpu_millis < 0 or placement.memory_bytes < 0:
            raise ValueError("negative CPU or memory in placement")
        per_dev: dict[int, int] = {}
        for s in placement.shares:
            di = self._dev_idx.get(s.device_uuid)
            if di is None:
                raise ValueError(f"unknown device {s.device_uuid!r}")
            if self._dev_node[di] != ni:
                raise ValueError(f"device {s.device_uuid!r} is not on node {placement.node!r}")
            if s.quanta <= 0:
                raise ValueError(f"share of {s.quanta} quanta on {s.device_uuid!r} must be positive")
            per_dev[di] = per_dev.get(di, 0) + s.quanta
        return ni, per_dev

    def _set_free(self, di: int, new: int):
        old = self._free[di]
        self._count[old] -= 1
        self._count[new] += 1
        self._free[di] = new
        if self._cap[di] == self.quanta_per_gpu:
            Q = self.quanta_per_gpu
            ni = self._dev_node[di]
            if old == Q and new != Q:
                self._whole[ni] -= 1
            elif new == Q and old != Q:
                self._whole[ni] += 1

    def take(self, placement: Placement, force: bool = False) -> None:
        """Allocate ``placement``; ValueError (and no change) if anything would over-allocate.

        ``force``: count it even so (a session that runs on the engine); quanta beyond a
        device's capacity become its debt (see ``overcommitted``).
        """
        ni, per_dev = self._resolve(placement)
        cpu, mem = placement.cpu_millis, placement.memory_bytes
        if not force:
            for di, q in per_dev.items():
                if q > self._free[di]:
                    raise ValueError(
                        f"device {self._dev_uuid[di]!r} has {self._free[di]} quanta free, "
                        f"placement asks for {q}"
                    )
            if self._cpu_cap[ni] and self._cpu_used[ni] + cpu > self._cpu_cap[ni]:
                raise ValueError(f"node {placement.node!r} has not {cpu} CPU millicores free")
            if self._mem_cap[ni] and self._mem_used[ni] + mem > self._mem_cap[ni]:
                raise ValueError(f"node {placement.node!r} has not {mem} bytes of memory free")
        if self._missing:
            self._missing = {}
        total = 0
        for di, q in per_dev.items():
            taken = min(q, self._free[di])
            self._debt[di] += q - taken
            self._set_free(di, self._free[di] - taken)
            total += taken
        self._node_free[ni] -= total
        self.used_quanta += placement.quanta
        self._cpu_used[ni] += cpu
        self._mem_used[ni] += mem
        self._sessions[ni] += 1
        if total:
            self._touch(ni)

    def give_back(self, placement: Placement) -> None:
        """Exact inverse of ``take``; ValueError (and no change) if it returns more than is in use."""
        ni, per_dev = self._resolve(placement)
        for di, q in per_dev.items():
            used = self._cap[di] - self._free[di] + self._debt[di]
            if q > used:
                raise ValueError(
                    f"device {self._dev_uuid[di]!r} has {used} quanta in use, "
                    f"cannot give back {q}"
                )
        cpu, mem = placement.cpu_millis, placement.memory_bytes
        if cpu > self._cpu_used[ni] or mem > self._mem_used[ni]:
            raise ValueError(f"node {placement.node!r}: giving back more CPU or memory than in use")
        if not self._sessions[ni]:
            raise ValueError(f"node {placement.node!r} has no session to give back")
        if self._missing:
            self._missing = {}
        total = 0
        for di, q in per_dev.items():
            paid = min(q, self._debt[di])  # an over-committed device is paid off first
            self._debt[di] -= paid
            self._set_free(di, self._free[di] + q - paid)
            total += q - paid
        self._node_free[ni] += total
        self.used_quanta -= placement.quanta
        self._cpu_used[ni] -= cpu
        self._mem_used[ni] -= mem
        self._sessions[ni] -= 1
        if total:
            self._touch(ni)

    # ------------------------------------------------------------------ views
    @property
    def free_quanta(self) -> int:
        return self.total_quanta - self.used_quanta

    def device_free(self, uuid: str) -> int:
        return self._free[self._dev_idx[uuid]]

    def device_used(self, uuid: str) -> int:
        di = self._dev_idx[uuid]
        return self._cap[di] - self._free[di] + self._debt[di]

    def overcommitted(self) -> dict[str, int]:
        """Quanta in use beyond capacity, by device uuid (only devices that have any)."""
        return {self._dev_uuid[di]: d for di, d in enumerate(self._debt) if d}

    def node_used(self, name: str) -> tuple[int, int]:
        """(CPU millicores, memory bytes) in use on node ``name``."""
        ni = self._node_idx[name]
        return self._cpu_used[ni], self._mem_used[ni]

    def usage(self) -> list[dict]:
        """Per node, per device capacity and use, as plain data for pages and the API."""
        out = []
        for ni, node in enumerate(self.nodes):
            devices = []
            for dev, di in zip(node.devices, self._node_devs[ni]):
                devices.append(
                    {
                        "uuid": dev.uuid,
                        "index": dev.index,
                        "name": dev.name,
                        "memory_bytes": dev.memory_bytes,
                        "sm_count": dev.sm_count,
                        "mig_parent": dev.mig_parent,
                        "mig_profile": dev.mig_profile,
                        "capacity_quanta": self._cap[di],
                        "used_quanta": self._cap[di] - self._free[di] + self._debt[di],
                        "overcommitted_quanta": self._debt[di],
                    }
                )
            out.append(
                {
                    "name": node.name,
                    "docker_url": node.docker_url,
                    "simulated": node.simulated,
                    "gpu_backend": node.gpu.name,
                    "gpu_ready": not self._gpu_off[ni],
                    "pool": node.pool,
                    "cpu_millis_total": self._cpu_cap[ni],
                    "cpu_millis_used": self._cpu_used[ni],
                    "memory_bytes_total": self._mem_cap[ni],
                    "memory_bytes_used": self._mem_used[ni],
                    "capacity_quanta": sum(self._cap[d] for d in self._node_devs[ni]),
                    "used_quanta": sum(self._cap[d] - self._free[d] + self._debt[d]
                                       for d in self._node_devs[ni]),
                    "overcommitted_quanta": sum(self._debt[d] for d in self._node_devs[ni]),
                    "devices": devices,
                }
            )
        return out
