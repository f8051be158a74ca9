"""Where the GPU waits: idle time of a profiled cycle, by what the host threads were doing meanwhile.

Idle time is the part of the profiled window in which no kernel, copy or memset ran. Each stretch of it is
charged to the host (CPU) events open at its middle: the innermost `dpdmd/...` region (workers/distill.py names
the parts of a cycle with torch.profiler.record_function; the training thread holds them), and on the thread
that was last busy (the training thread, or autograd's own thread, which runs the backward pass on a GPU), the
outermost operator below any region (what the loop called: an autograd node, a compiled region, a DeepSpeed
copy) and the innermost event (what was running right then: a kernel launch, a synchronisation, an operator).

    summary = idle_summary(gpu_intervals, host_events, window)   # plain tuples: tests build them by hand
    summary = from_profiler(prof.events())                        # torch.profiler with CPU and CUDA activity
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

REGION_PREFIX = "dpdmd/"  # workers.cycle.REGION; not imported, so that --base runs older trees (tests hold them equal)
NO_HOST_EVENT = "(no host event open)"
OUTSIDE = "(outside every region)"


@dataclass(frozen=True)
class HostEvent:
    start: float  # microseconds
    end: float
    name: str
    thread: int = 0


def idle_stretches(gpu: Iterable[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    """The parts of window covered by no GPU interval."""
    out, cursor = [], window[0]
    for start, end in sorted(gpu):
        if start > cursor:
            out.append((cursor, min(start, window[1])))
        cursor = max(cursor, end)
        if cursor >= window[1]:
            break
    if cursor < window[1]:
        out.append((cursor, window[1]))
    return [(a, b) for a, b in out if b > a]


class _Open:
    """The events of one thread open at a moment, for moments asked in increasing order (events nest)."""

    def __init__(self, events: list[HostEvent]):
        self.events = sorted(events, key=lambda e: (e.start, -e.end))
        self.stack: list[HostEvent] = []
        self.i = 0

    def at(self, t: float) -> list[HostEvent]:
        """Outermost first."""
        while self.i < len(self.events) and self.events[self.i].start <= t:
            ev = self.events[self.i]
            while self.stack and self.stack[-1].end <= ev.start:
                self.stack.pop()
            self.stack.append(ev)
            self.i += 1
        while self.stack and self.stack[-1].end < t:
            self.stack.pop()
        return [e for e in self.stack if e.end >= t]


def _is_region(ev: HostEvent) -> bool:
    return ev.name.startswith(REGION_PREFIX)


class _Host:
    """Every thread's open events, asked at increasing moments: the region then, and the busiest thread's
    events below any region."""

    def __init__(self, host: list[HostEvent]):
        threads: dict[int, list[HostEvent]] = defaultdict(list)
        for ev in host:
            threads[ev.thread].append(ev)
        self.threads = {k: _Open(v) for k, v in threads.items()}

    def at(self, t: float) -> tuple[str, list[HostEvent]]:
        region, work = OUTSIDE, []
        for opened in self.threads.values():
            events = opened.at(t)
            regions = [k for k, e in enumerate(events) if _is_region(e)]
            if regions:
                region = events[regions[-1]].name[len(REGION_PREFIX):]
            below = [e for e in events if not _is_region(e)]
            if below and (not work or below[-1].start > work[-1].start):  # the thread busy most recently
                work = below
        return region, work


def idle_summary(gpu: list[tuple[float, float]], host: list[HostEvent], window: tuple[float, float],
                 top: int = 12) -> dict:
    """Idle GPU seconds in window, charged by the host events at each idle stretch's middle. Returns seconds by
    region, by outer operator, by innermost event, and the host's waits for the GPU (count, and where)."""
    stretches = idle_stretches(gpu, window)
    by_region: Counter = Counter()
    by_outer: Counter = Counter()
    by_inner: Counter = Counter()
    opened = _Host(host)
    for a, b in stretches:  # in time order
        region, work = opened.at((a + b) / 2)
        seconds = (b - a) / 1e6
        by_region[region] += seconds
        by_outer[work[0].name if work else NO_HOST_EVENT] += seconds
        by_inner[work[-1].name if work else NO_HOST_EVENT] += seconds
    syncs = synchronisations(host)

    def ranked(counter: Counter) -> dict[str, float]:
        return {k: round(v, 6) for k, v in counter.most_common(top)}

    idle = sum(b - a for a, b in stretches) / 1e6
    return {"idle_s": idle, "stretches": len(stretches),
            "stretches_over_1ms": sum(1 for a, b in stretches if b - a > 1000),
            "by_region_s": ranked(by_region), "by_outer_op_s": ranked(by_outer), "by_inner_event_s": ranked(by_inner),
            "host_syncs": sum(syncs.values()), "host_syncs_by_outer_op": dict(syncs.most_common(top))}


def synchronisations(host: list[HostEvent]) -> Counter:
    """The host's waits for the GPU (the runtime's *Synchronize calls: a blocking copy, .item(), bool() of a
    GPU tensor all end in one), counted by "region: outermost operator" they ran under."""
    found: Counter = Counter()
    opened = _Host(host)
    for ev in sorted((e for e in host if "synchronize" in e.name.lower()), key=lambda e: e.start):
        region, _ = opened.at(ev.start)
        own = [e for e in opened.threads[ev.thread].at(ev.start) if not _is_region(e)]
        found[f"{region}: {own[0].name if own else ev.name}"] += 1
    return found


def gpu_work(event) -> bool:
    """A kernel, copy or memset: a device event that is no annotation. The profiler mirrors every
    record_function region onto the GPU's timeline as an annotation spanning the region, which is no work."""
    from torch.autograd import DeviceType

    return (event.device_type == DeviceType.CUDA and not event.is_user_annotation
            and "annotation" not in str(getattr(event, "activity_type", "") or "").lower())


def from_profiler(events) -> dict:
    """idle_summary of a finished torch.profiler.profile run with CPU and CUDA activity (its events()): GPU
    intervals are its kernels, copies and memsets; host events, every thread's."""
    from torch.autograd import DeviceType

    gpu, host = [], []
    for ev in events:
        span = (ev.time_range.start, ev.time_range.end)
        if gpu_work(ev):
            gpu.append(span)
        elif ev.device_type == DeviceType.CPU and not ev.is_async:
            host.append(HostEvent(*span, ev.name, ev.thread))
    if not gpu or not host:
        return {"error": "the profile holds no GPU or no host events"}
    window = (min(min(s for s, _ in gpu), min(e.start for e in host)),
              max(max(e for _, e in gpu), max(e.end for e in host)))
    return idle_summary(gpu, host, window)
