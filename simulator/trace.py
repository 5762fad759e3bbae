"""Chrome trace (Perfetto, chrome://tracing) of an event-engine run, as a JSON-ready dict.

Trace Event Format (Google, "Trace Event Format" document): complete events `ph: "X"` with
`ts`/`dur` in microseconds, and metadata events naming each process and thread. One
process per simulated rank, one thread per stream; communication spans are named by
collective and group, e.g. "all_gather dp(128)".
"""

from __future__ import annotations

from typing import Any

from .des import DesRun

STREAMS = ("compute", "tp", "cp", "ep", "pp", "dp", "offload")


def chrome_trace(run: DesRun) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    for pid, label in enumerate(run.ranks):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {label}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        for tid, stream in enumerate(STREAMS):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": stream}})
    tid_of = {s: i for i, s in enumerate(STREAMS)}
    for s in run.spans:
        events.append({"ph": "X", "name": s.name, "cat": s.stream, "pid": s.rank,
                       "tid": tid_of.get(s.stream, len(STREAMS)),
                       "ts": s.start_s * 1e6, "dur": max(0.0, s.end_s - s.start_s) * 1e6})
    r = run.result
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"engine": "meshplan des", "plan": r.plan.to_text(),
                          "step_time_s": r.step_time_s}}
