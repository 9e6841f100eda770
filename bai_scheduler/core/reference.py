"""A slow, obviously right scheduler: the specification the indexed one is checked against.

Same rules as ``queue.AdmissionQueue`` on ``placement.Capacity`` (see their docstrings), written as
directly as possible: plain lists and dicts, every pass walks the whole queue from scratch, every
placement scans every device.  No indexes, caches, fast paths or early exits.  Pure: no I/O.

``tests/test_reference.py`` runs both on thousands of random traces (every order, head rule,
span and strategy) and requires the same answers from every call: the same requests admitted,
in the same order, on the same devices.  Only the reference's state is kept between passes that
the specification itself has: the queue, the sessions, the skip rounds, the senior's pin and
which nodes' GPUs are ready.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .model import Node, Placement, Request, RequestKey, Share
from .queue import QueuePolicy, UserLimits


@dataclass
class _Dev:
    uuid: str
    node: int
    cap: int
    used: int = 0

    @property
    def free(self) -> int:
        return max(0, self.cap - self.used)


@dataclass
class _Held:
    """Resources one pass keeps from everyone but their owner: devices, node CPU and memory."""

    devices: set = field(default_factory=set)
    cpu: dict = field(default_factory=dict)
    mem: dict = field(default_factory=dict)

    def add(self, hold):
        node, devices, cpu, mem = hold
        self.devices |= set(devices)
        self.cpu[node] = self.cpu.get(node, 0) + cpu
        self.mem[node] = self.mem.get(node, 0) + mem


class ReferenceQueue:
    def __init__(self, nodes: list[Node], quanta_per_gpu: int, policy: QueuePolicy | None = None,
                 limits: UserLimits | None = None, span: str = "whole-then-fraction",
                 strategy: str = "concentrate"):
        self.Q = quanta_per_gpu
        self.policy = policy or QueuePolicy()
        self.limits = limits or UserLimits()
        self.span = span
        self.concentrate = strategy == "concentrate"
        self.nodes = list(nodes)
        self.devs = [_Dev(d.uuid, ni, d.quanta) for ni, n in enumerate(nodes) for d in n.devices]
        self.gpu_off = [False] * len(nodes)  # GPUs not ready: no new share there
        self.cpu_cap = [n.cpu_millis for n in nodes]
        self.mem_cap = [n.memory_bytes for n in nodes]
        self.cpu_used = [0] * len(nodes)
        self.mem_used = [0] * len(nodes)
        self.seq = 0
        self.pending: list[Request] = []  # in seq order
        self.mark: dict[int, int] = {}  # seq -> sessions admitted before it arrived
        self.running: dict[RequestKey, tuple[Request, Placement, int]] = {}  # + admission number
        self.clock = 0
        self.round = 0
        self.fails: dict[int, tuple[int, int]] = {}  # seq -> (rounds failed, last round counted)
        self.pin = None  # (key, (node, device indexes, cpu, mem))
        self.passed_over = None  # seq of a senior that did not fit in its turn while a place was free
        self.senior_now = None  # the senior of the pass under way

    # ---------------------------------------------------------------- capacity
    def set_gpu_ready(self, name: str, ready: bool):
        ni = next(i for i, n in enumerate(self.nodes) if n.name == name)
        if self.gpu_off[ni] == ready:
            self.gpu_off[ni] = not ready
            self.round += ready  # GPUs coming back count as capacity given back

    def allows(self, ni, di, q) -> bool:
        """May a one-device share of ``q`` go on device ``di`` of node ``ni`` (backend, readiness)?"""
        return not self.gpu_off[ni] and (self.nodes[ni].gpu.fractions or q == self.devs[di].cap)

    def allows_multi(self, ni, rest) -> bool:
        """May a session span devices of node ``ni`` (with a fraction ``rest`` on one of them)?"""
        gpu = self.nodes[ni].gpu
        return not self.gpu_off[ni] and gpu.multi_device and (not rest or gpu.mixed)

    def node_devs(self, ni):
        return [di for di, d in enumerate(self.devs) if d.node == ni]

    def node_free(self, ni):
        return sum(self.devs[di].free for di in self.node_devs(ni))

    def is_whole(self, di):
        d = self.devs[di]
        return d.cap == self.Q and d.used == 0

    def room(self, ni, cpu, mem, held):
        if cpu and self.cpu_cap[ni] and self.cpu_used[ni] + held.cpu.get(ni, 0) + cpu > self.cpu_cap[ni]:
            return False
        if mem and self.mem_cap[ni] and self.mem_used[ni] + held.mem.get(ni, 0) + mem > self.mem_cap[ni]:
            return False
        return True

    def hosts(self, ni, r: Request) -> bool:
        """Could node ``ni`` run ``r`` if it were empty?"""
        if (r.cpu_millis and self.cpu_cap[ni] and self.cpu_cap[ni] < r.cpu_millis) or (
                r.memory_bytes and self.mem_cap[ni] and self.mem_cap[ni] < r.memory_bytes):
            return False
        caps = [self.devs[di].cap for di in self.node_devs(ni)]
        gpu = self.nodes[ni].gpu
        if r.quanta <= self.Q:
            return r.quanta == 0 or any(c >= r.quanta and (gpu.fractions or c == r.quanta) for c in caps)
        k, rest = divmod(r.quanta, self.Q)
        if (rest and self.span == "whole-only") or not gpu.multi_device or (rest and not gpu.mixed):
            return False
        return sum(1 for c in caps if c == self.Q) >= k + (1 if rest else 0)

    def place(self, r: Request, held: _Held) -> Placement | None:
        q, cpu, mem = r.quanta, r.cpu_millis, r.memory_bytes
        nodes = range(len(self.nodes))
        if q == 0:
            fits = [ni for ni in nodes if self.room(ni, cpu, mem, held)]
            if not fits:
                return None
            ni = fits[0] if self.concentrate else min(fits, key=lambda n: (self.cpu_used[n], n))
            return Placement(self.nodes[ni].name, (), cpu, mem)
        if q <= self.Q:
            fits = [di for di, d in enumerate(self.devs) if d.free >= q and di not in held.devices
                    and self.room(d.node, cpu, mem, held) and self.allows(d.node, di, q)]
            if not fits:
                return None
            sign = 1 if self.concentrate else -1  # best fit, fullest node / emptiest of both
            di = min(fits, key=lambda i: (sign * self.devs[i].free, sign * self.node_free(self.devs[i].node),
                                          self.devs[i].node, i))
            return Placement(self.nodes[self.devs[di].node].name, (Share(self.devs[di].uuid, q),), cpu, mem)
        k, rest = divmod(q, self.Q)
        if rest and self.span == "whole-only":
            return None
        sign = 1 if self.concentrate else -1
        wholes = {ni: sum(1 for di in self.node_devs(ni) if self.is_whole(di)) for ni in nodes}
        for ni in sorted((n for n in nodes if wholes[n] >= k),
                         key=lambda n: (sign * wholes[n], sign * self.node_free(n), n)):
            if not self.room(ni, cpu, mem, held) or not self.allows_multi(ni, rest):
                continue
            usable = [di for di in self.node_devs(ni) if di not in held.devices]
            whole = [di for di in usable if self.is_whole(di)][:k]
            if len(whole) < k:
                continue
            shares = [Share(self.devs[di].uuid, self.Q) for di in whole]
            if rest:
                cands = [di for di in usable if di not in whole and self.devs[di].free >= rest]
                if not cands:
                    continue
                di = min(cands, key=lambda i: (sign * self.devs[i].free, i))
                shares.append(Share(self.devs[di].uuid, rest))
            return Placement(self.nodes[ni].name, tuple(shares), cpu, mem)
        return None

    def reserve(self, r: Request, held: _Held, only=None):
        """What ``r`` is closest to getting (the freest device, or node and devices); ``only``:
        (nodes, devices) to choose from."""
        q, cpu, mem = r.quanta, r.cpu_millis, r.memory_bytes
        if only is not None:
            held = _Held(held.devices | {di for di in range(len(self.devs)) if di not in only[1]})

        def may(ni):
            return (only is None or ni in only[0]) and (not cpu or not self.cpu_cap[ni] or self.cpu_cap[ni] >= cpu) \
                and (not mem or not self.mem_cap[ni] or self.mem_cap[ni] >= mem)

        if q == 0:
            ni = next((n for n in range(len(self.nodes)) if may(n)), None)
            return None if ni is None else (ni, (), cpu, mem)
        if q <= self.Q:
            cands = [di for di, d in enumerate(self.devs)
                     if di not in held.devices and d.cap >= q and may(d.node) and self.allows(d.node, di, q)]
            if not cands:
                return None
            di = min(cands, key=lambda i: (-self.devs[i].free, i))
            return (self.devs[di].node, (di,), cpu, mem)
        k, rest = divmod(q, self.Q)
        if rest and self.span == "whole-only":
            return None
        need = k + (1 if rest else 0)
        best = None
        for ni in range(len(self.nodes)):
            usable = sorted((di for di in self.node_devs(ni)
                             if di not in held.devices and self.devs[di].cap == self.Q),
                            key=lambda i: (-self.devs[i].free, i))[:need]
            if len(usable) < need or not may(ni) or not self.allows_multi(ni, rest):
                continue
            f = sum(self.devs[di].free for di in usable)
            if best is None or f > best[0]:
                best = (f, (ni, tuple(usable), cpu, mem))
        return best and best[1]

    def take(self, p: Placement):
        ni = next(i for i, n in enumerate(self.nodes) if n.name == p.node)
        for s in p.shares:
            next(d for d in self.devs if d.uuid == s.device_uuid).used += s.quanta
        self.cpu_used[ni] += p.cpu_millis
        self.mem_used[ni] += p.memory_bytes
        return ni

    def give_back(self, p: Placement):
        ni = next(i for i, n in enumerate(self.nodes) if n.name == p.node)
        for s in p.shares:
            next(d for d in self.devs if d.uuid == s.device_uuid).used -= s.quanta
        self.cpu_used[ni] -= p.cpu_millis
        self.mem_used[ni] -= p.memory_bytes

    # ---------------------------------------------------------------- users
    def usage(self, user):
        mine = [r for r, _, _ in self.running.values() if r.key.user == user]
        return (len(mine), sum(r.quanta for r in mine), sum(r.cpu_millis for r in mine),
                sum(r.memory_bytes for r in mine))

    def held_back(self, r: Request) -> bool:
        """Do the user's own limits keep ``r`` waiting now?"""
        lim = self.limits
        n, q, c, m = self.usage(r.key.user)
        return bool((lim.max_running and n >= lim.max_running)
                    or (lim.max_quanta and q + r.quanta > lim.max_quanta)
                    or (lim.max_cpu_millis and c + r.cpu_millis > lim.max_cpu_millis)
                    or (lim.max_memory_bytes and m + r.memory_bytes > lim.max_memory_bytes))

    def dominant(self, user):
        _, q, c, m = self.usage(user)
        total_q = sum(d.cap for d in self.devs)
        share = q / total_q if total_q else 0.0
        if all(self.cpu_cap):
            share = max(share, c / sum(self.cpu_cap)) if self.cpu_cap else share
        if all(self.mem_cap):
            share = max(share, m / sum(self.mem_cap)) if self.mem_cap else share
        return share

    def never_fits(self, r: Request) -> bool:
        """Refused at submit: over a per-user limit on its own, or no node could ever run it
        (judged, as ``Capacity.can_ever_fit`` does, by each node's biggest device)."""
        lim = self.limits
        if (lim.max_quanta and r.quanta > lim.max_quanta) or (
                lim.max_cpu_millis and r.cpu_millis > lim.max_cpu_millis) or (
                lim.max_memory_bytes and r.memory_bytes > lim.max_memory_bytes):
            return True
        for ni, node in enumerate(self.nodes):
            if (r.cpu_millis and self.cpu_cap[ni] and self.cpu_cap[ni] < r.cpu_millis) or (
                    r.memory_bytes and self.mem_cap[ni] and self.mem_cap[ni] < r.memory_bytes):
                continue
            caps = [self.devs[di].cap for di in self.node_devs(ni)]
            biggest = max(caps, default=0)
            if r.quanta == 0:
                return False
            if r.quanta <= self.Q:
                if biggest >= r.quanta and (node.gpu.fractions or r.quanta == biggest):
                    return False
                continue
            k, rest = divmod(r.quanta, self.Q)
            if rest and self.span == "whole-only":
                return True
            if (sum(1 for c in caps if c == self.Q) >= k + (1 if rest else 0) and node.gpu.multi_device
                    and (not rest or node.gpu.mixed)):
                return False
        return True

    # ---------------------------------------------------------------- API
    def submit(self, request: Request):
        """("REFUSED" | "PENDING" | "RUNNING", placement, others admitted by the same pass)."""
        if self.never_fits(request):
            return "REFUSED", None, []
        lim = self.limits
        if lim.max_pending and sum(1 for r in self.pending if r.key.user == request.key.user) >= lim.max_pending:
            return "REFUSED", None, []
        self.seq += 1
        r = Request(request.key, request.quanta, request.cpu_millis, request.memory_bytes, request.image,
                    seq=self.seq)
        self.pending.append(r)
        self.mark[r.seq] = self.clock
        admitted = self.schedule()
        mine = [p for req, p in admitted if req.key == r.key]
        others = [(req, p) for req, p in admitted if req.key != r.key]
        return ("RUNNING", mine[0], others) if mine else ("PENDING", None, others)

    def release(self, key: RequestKey):
        if key in self.running:
            _, p, _ = self.running.pop(key)
            self.give_back(p)
            self.round += 1
        elif any(r.key == key for r in self.pending):
            self.pending = [r for r in self.pending if r.key != key]
        else:
            return []
        return self.schedule()

    # ---------------------------------------------------------------- the pass
    def admit(self, r: Request, p: Placement, out):
        self.take(p)
        self.clock += 1
        self.running[r.key] = (r, p, self.clock)
        self.pending.remove(r)
        out.append((r, p))

    def due_at(self, senior: Request):
        """Where the unpinned senior may be pinned: where it was passed over, or any free place
        if it did not fit in its turn in an earlier pass while one was free."""
        fresh = self.fresh(senior)
        if not fresh[0] and self.passed_over == senior.seq:
            fresh = self.fresh(senior, empty_too=True)
        return fresh

    def blocked(self, r: Request, held: _Held, slots: list, reserve=True) -> bool:
        """The head rule for a request that did not fit; True if the pass stops."""
        if r is self.senior_now and self.pin is None and self.fresh(r, empty_too=True)[0]:
            self.passed_over = r.seq
        head = self.policy.head
        if head == "strict":
            return True
        if head == "skip":
            n, last = self.fails.get(r.seq, (0, None))
            if last != self.round:
                n = n + 1
            self.fails[r.seq] = (n, self.round)
            return n <= self.policy.skip_after
        if reserve and slots[0] < self.policy.reservations:
            slots[0] += 1
            hold = self.reserve(r, held)
            if hold is not None:
                held.add(hold)
        return False

    def fresh(self, r: Request, empty_too=False):
        """(nodes, devices) where ``r`` was passed over: they could host it, no session ``r``
        would wait for there is older than ``r``, and a younger one runs there (``empty_too``:
        or none).  The sessions ``r`` would wait for: those on the devices, and on the whole
        node if ``r`` asks for CPU or memory the node limits."""
        nodes, devices = set(), set()
        for ni, node in enumerate(self.nodes):
            ages = [born for _, p, born in self.running.values() if p.node == node.name]
            limited = (r.cpu_millis and self.cpu_cap[ni]) or (r.memory_bytes and self.mem_cap[ni])
            if not self.hosts(ni, r) or (r.quanta and self.gpu_off[ni]) or (
                    limited and any(b <= self.mark[r.seq] for b in ages)):
                continue
            if r.quanta == 0:
                if ages or empty_too:
                    nodes.add(ni)
                continue
            on = {di: [born for _, p, born in self.running.values()
                       if any(s.device_uuid == self.devs[di].uuid for s in p.shares)] for di in self.node_devs(ni)}
            clean = [di for di in self.node_devs(ni)
                     if (self.devs[di].cap >= r.quanta and self.allows(ni, di, r.quanta) if r.quanta <= self.Q
                         else self.devs[di].cap == self.Q)
                     and all(b > self.mark[r.seq] for b in on[di])]
            k, rest = divmod(r.quanta, self.Q)
            if r.quanta <= self.Q:
                clean = [di for di in clean if on[di] or empty_too]
                ok = bool(clean)
            else:
                ok = len(clean) >= k + (1 if rest else 0) and (empty_too or any(on[di] for di in clean))
            if ok:
                nodes.add(ni)
                devices.update(clean)
        return nodes, devices

    def senior(self):
        return next((r for r in self.pending if not self.held_back(r)), None)

    def schedule(self):
        out = []
        held = _Held()
        slots = [0]
        senior = self.senior_now = self.senior()
        if self.pin is not None and (senior is None or self.pin[0] != senior.key):
            self.pin = None
        first = None
        if senior is not None and (self.pin is not None or self.due_at(senior)[0]):
            first = senior
            p = self.place(senior, held)
            if p is not None:
                self.pin = None
                self.admit(senior, p, out)
            else:
                if self.pin is None:
                    self.pin = (senior.key, self.reserve(senior, held, only=self.due_at(senior)))
                held.add(self.pin[1])
                slots[0] = 1
                if self.blocked(senior, held, slots, reserve=False):
                    return out
        if self.policy.order == "fifo":
            for r in list(self.pending):
                if r is first or self.held_back(r):
                    continue
                p = self.place(r, held)
                if p is not None:
                    self.admit(r, p, out)
                elif self.blocked(r, held, slots):
                    return out
            return out
        # DRF: the user with the smallest dominant share (then the oldest next request) goes next
        queue = {}
        for r in self.pending:
            if r is not first:
                queue.setdefault(r.key.user, []).append(r)
        while queue:
            user = min(queue, key=lambda u: (self.dominant(u), queue[u][0].seq))
            r = queue[user].pop(0)
            if not queue[user]:
                del queue[user]
            if self.held_back(r):
                if self.limits.max_running and self.usage(user)[0] >= self.limits.max_running:
                    queue.pop(user, None)
                continue
            p = self.place(r, held)
            if p is not None:
                self.admit(r, p, out)
            elif self.blocked(r, held, slots):
                return out
        return out
