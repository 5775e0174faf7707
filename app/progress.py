"""Progress bars that count what an operator thinks in (events, subscriptions, log entries), with a rate.

Shown on a terminal only (callers check `isatty`), on stderr and transient, so piped or JSON
output stays exactly what it would be without them. A task may advance its bar by another
measure (ingest fills it by bytes read, which is all a stream's size tells in advance) while
it counts items in the `count` field.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


def _count(task: Task) -> float:
    return float(task.fields.get("count", task.completed))


class CountColumn(ProgressColumn):
    """`12,345 events`, or `1,200/5,000 subscriptions` when the bar counts the items themselves."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        count, unit = _count(task), task.fields.get("unit", self.unit)
        if "count" not in task.fields and task.total:
            return Text(f"{count:,.0f}/{task.total:,.0f} {unit}")
        return Text(f"{count:,.0f} {unit}")


class RateColumn(ProgressColumn):
    """Items per second since the task started (a steady figure, not a jittery instant rate)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        # a finished task keeps the rate it finished at (rich's elapsed would keep growing)
        elapsed = (task.finished_time if task.finished else task.elapsed) or 0.0
        unit = task.fields.get("unit", self.unit)
        if elapsed < 0.2:
            return Text(f"- {unit}/s")
        return Text(f"{_count(task) / elapsed:,.0f} {unit}/s")


def counting(console: Console, label: str, unit: str) -> Progress:
    """A transient bar on `console`: label, bar, count, rate, time left.

    A task's `unit` field overrides `unit`, and its description follows the label, so one display
    can hold stages counting different things (verify: log entries, then subscriptions).
    """
    return Progress(
        TextColumn(label + " {task.description}"), BarColumn(), CountColumn(unit), RateColumn(unit),
        TimeRemainingColumn(),
        console=console, transient=True,
    )
