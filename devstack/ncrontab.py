"""Six-field NCRONTAB schedules ("{second} {minute} {hour} {day} {month} {day-of-week}"), as the Functions
timer trigger reads them, for the dev host's timers.

The trigger parses schedules with NCrontab (https://github.com/atifaziz/NCrontab, CrontabSchedule.cs) with
seconds included. Two points where NCrontab differs from Vixie cron matter here: a day must match BOTH the
day-of-month and the day-of-week field (cron matches either), and day-of-week runs 0-6 from Sunday.
Times are UTC: Linux plans ignore WEBSITE_TIME_ZONE
(https://learn.microsoft.com/azure/azure-functions/functions-bindings-timer#ncrontab-time-zones).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime, time, timedelta

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
# (field name, lowest, highest, names of lowest.. in order: full or the first three letters, any case)
FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day-of-week", 0, 6, DAYS),
)
# Longest gap between two occurrences of a satisfiable schedule: "0 0 0 29 Feb Mon" can wait 28 years.
SEARCH_YEARS = 29


class ScheduleError(ValueError):
    """A schedule the timer trigger would refuse at start-up."""


@dataclass(frozen=True)
class Schedule:
    expression: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        fields = expression.split()
        if len(fields) != 6:
            raise ScheduleError(
                f"schedule {expression!r}: expected 6 fields (second minute hour day month day-of-week), "
                f"got {len(fields)}"
            )
        values = [_field(text, *spec, expression=expression) for text, spec in zip(fields, FIELDS, strict=True)]
        return cls(expression, *(tuple(sorted(v)) for v in values[:3]),
                   frozenset(values[3]), frozenset(values[4]), frozenset(values[5]))

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after `moment` (whole seconds; tz-aware in, same tz out)."""
        start = moment.replace(microsecond=0)
        day = start.date()
        for _ in range(366 * SEARCH_YEARS):
            if day.month in self.months and day.day in self.days and (day.isoweekday() % 7) in self.weekdays:
                after = start.time() if day == start.date() else None
                hit = self._first_time(after)
                if hit is not None:
                    return datetime.combine(day, hit, tzinfo=moment.tzinfo)
            day += timedelta(days=1)
        raise ScheduleError(f"schedule {self.expression!r} never fires")

    def _first_time(self, after: time | None) -> time | None:
        """The first (hour, minute, second) of a matching day after `after` (any, when None)."""
        for hour in self.hours[bisect.bisect_left(self.hours, after.hour) if after else 0:]:
            same_hour = after is not None and hour == after.hour
            for minute in self.minutes[bisect.bisect_left(self.minutes, after.minute) if same_hour else 0:]:
                same_minute = same_hour and minute == after.minute
                index = bisect.bisect_right(self.seconds, after.second) if same_minute else 0
                if index < len(self.seconds):
                    return time(hour, minute, self.seconds[index])
        return None


def _field(text: str, name: str, low: int, high: int, names: tuple[str, ...], *, expression: str) -> set[int]:
    def fail(why: str) -> ScheduleError:
        return ScheduleError(f"schedule {expression!r}: {name} field {text!r}: {why}")

    def number(token: str) -> int:
        lowered = token.lower()
        for index, full in enumerate(names):
            if lowered in (full, full[:3]):
                return low + index
        if not token.isdigit():
            raise fail(f"{token!r} is not a number" + (" or a name" if names else ""))
        value = int(token)
        if not low <= value <= high:
            raise fail(f"{value} is outside {low}-{high}")
        return value

    found: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        if step_text and (not step_text.isdigit() or int(step_text) == 0):
            raise fail(f"step {step_text!r} must be a whole number above 0")
        step = int(step_text) if step_text else 1
        if base == "*":
            first, last = low, high
        elif "-" in base:
            first_text, _, last_text = base.partition("-")
            first, last = number(first_text), number(last_text)
            if first > last:
                raise fail(f"range {base!r} runs backwards")
        else:
            first = number(base)
            last = high if step_text else first  # "5/15" is 5, 20, 35, 50
        found.update(range(first, last + 1, step))
    return found

