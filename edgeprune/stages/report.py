"""Report stage: close the report's ``run`` section (finish time, seconds) and write ``report.json``,
``report.md`` and ``report.html`` into ``ctx.dir``."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..context import RunContext


@dataclass
class ReportInput:
    started: float  # time.time() when this process started the run (resumed runs add seconds_before)


def run(ctx: RunContext, inp: ReportInput) -> dict[str, Path]:
    """The written files by kind (``json``, ``md``, ``html``)."""
    from ..report import write_report

    section = ctx.report["run"]
    section.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   seconds=round(time.time() - inp.started + section.get("seconds_before", 0), 1))
    return write_report(ctx.dir, ctx.report)
