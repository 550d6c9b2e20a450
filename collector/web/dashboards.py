"""Dashboards: the figures of `collector.reports` as charts and tables.

One implementation of the figures: every figure is computed by the functions
of `collector.reports`, as `feedback-collector report` computes it; this module
only lays them out.  The press figures come from the counts `collector.rollup`
keeps per local day (`reports.press_counts` of each day's presses, brought up
to date before the page is drawn), turned into rows by the same functions the
CLI applies to the counts of raw rows; a year's range then reads a few
hundred rows a day instead of every press.  Doctors and answer rates read
their events with `queries.report_events`: far fewer than presses.  Rows
carry phone numbers and comments, but no template is handed a row, only
figures and names of operators, desks, doctors and devices, so a clinic
manager never sees either.

Charts are pygal's SVG, inlined: no script (pygal's own config script is taken
out too), nothing fetched from elsewhere; each has a table of its figures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import pygal
from django import forms
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import formats
from django.utils.dates import WEEKDAYS
from django.utils.timesince import timesince
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from pygal.style import Style

from collector import queries, reports, rollup
from collector.db import Database, DatabaseError, open_database
from collector.web.names import Names, NoNames
from collector.web.roles import REPORTS, role_required
from edge.contract.timefmt import WALL_RANGE

T = TypeVar("T")

DEFAULT_WEEKS = 8
# More periods than a chart or a table can show (a year and a month of days).
MAX_PERIODS = 400
# Series in one trend chart; the table beneath has every group.
MAX_SERIES = 8
# Bars in the doctors' ranking chart; the table has every doctor.
MAX_BARS = 20

# -- the collector's database ------------------------------------------------------------

# One connection per process, used by one thread: an SQLite connection may not
# move between the threads the server serves requests on, and opening one per
# request would run the schema check (a write transaction) every time.
_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collector-db")


@functools.cache
def _database() -> Database:
    return open_database(settings.CONFIG.db_path, settings.CONFIG.dsn)


def read(fn: Callable[[Database], T]) -> T:
    """`fn` run on the collector's database, in its reader thread."""
    return _reader.submit(lambda: fn(_database())).result()


# -- the period and range chosen --------------------------------------------------------

PERIOD_CHOICES = [("day", gettext_lazy("Day")), ("week", gettext_lazy("Week")),
                  ("month", gettext_lazy("Month"))]


def _today() -> date:
    return datetime.now(ZoneInfo(settings.CONFIG.tz)).date()


def default_range(today: date) -> tuple[date, date]:
    """The last eight ISO weeks, this one included."""
    monday = today - timedelta(days=today.weekday())
    return monday - timedelta(weeks=DEFAULT_WEEKS - 1), today


def _date_input() -> forms.DateInput:
    return forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d")


class Filters(forms.Form):
    period = forms.ChoiceField(label=gettext_lazy("Period"), choices=PERIOD_CHOICES,
                               required=False)
    start = forms.DateField(label=gettext_lazy("From"), required=False, widget=_date_input())
    end = forms.DateField(label=gettext_lazy("To"), required=False, widget=_date_input())

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        start, end = default_range(_today())
        if data.get("end") is not None:
            end = data["end"]
            if data.get("start") is None:
                start = default_range(end)[0]
        if data.get("start") is not None:
            start = data["start"]
        period = data.get("period") or "week"
        lo, hi = WALL_RANGE
        if end < start:
            raise forms.ValidationError(_("“To” is before “From”."))
        if start < lo or end > hi:
            raise forms.ValidationError(_("Dates must be from %(lo)s to %(hi)s.")
                                        % {"lo": lo, "hi": hi})
        # A bound before `periods` walks the range day by day.
        if (end - start).days > MAX_PERIODS * 31 or \
                len(reports.periods(start, end, period)) > MAX_PERIODS:
            raise forms.ValidationError(
                _("That is more than %(n)d periods: choose a longer period or a shorter "
                  "range.") % {"n": MAX_PERIODS})
        return {"period": period, "start": start, "end": end}


@dataclass(frozen=True, slots=True)
class Choice:
    period: str
    start: date
    end: date
    tz: str

    @property
    def query(self) -> str:
        return urlencode({"period": self.period, "start": self.start.isoformat(),
                          "end": self.end.isoformat()})


def _choice(request: HttpRequest) -> tuple[Filters, Choice]:
    """The request's period and range, or the defaults (the form says why)."""
    tz = settings.CONFIG.tz
    form = Filters(request.GET or None)
    if form.is_bound and form.is_valid():
        d = form.cleaned_data
        return form, Choice(d["period"], d["start"], d["end"], tz)
    start, end = default_range(_today())
    if not form.is_bound:
        form = Filters(initial={"period": "week", "start": start, "end": end})
    return form, Choice("week", start, end, tz)


# -- charts -----------------------------------------------------------------------------

_STYLE = Style(
    background="transparent", plot_background="transparent",
    font_family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
    foreground="#1b1f24", foreground_strong="#1b1f24", foreground_subtle="#5b6570",
    colors=("#0b5cad", "#b42318", "#067647", "#b54708", "#6941c6", "#0e7090", "#c11574",
            "#4d5761"),
    # The SVG is drawn 480 wide and shown 350..600 px wide: near 1:1 on a phone.
    label_font_size=14, major_label_font_size=14, legend_font_size=14,
    value_font_size=13, title_font_size=16, tooltip_font_size=14)


def _plain_svg(title: str) -> Callable[[Any], Any]:
    """pygal's root made inert and labelled: its scripts (a config blob for the
    tooltip script we do not load) removed, an accessible name set."""
    def filter_(root: Any) -> Any:
        for parent in list(root.iter()):
            for child in list(parent):
                tag = child.tag if isinstance(child.tag, str) else ""
                if tag.rsplit("}", 1)[-1] == "script":
                    parent.remove(child)
                elif tag.rsplit("}", 1)[-1] == "title" and parent is root:
                    child.text = title
        root.set("role", "img")
        root.set("aria-label", title)
        return root
    return filter_


def _config(title: str, n_labels: int) -> dict[str, Any]:
    return {"js": [], "disable_xml_declaration": True, "style": _STYLE, "width": 480,
            "height": 320, "legend_at_bottom": True, "legend_at_bottom_columns": 2,
            "truncate_legend": 22, "truncate_label": 12, "margin": 6,
            "x_label_rotation": 40 if n_labels > 4 else 0,
            "show_minor_x_labels": n_labels <= 10, "x_labels_major_every": max(1, n_labels // 8),
            "allow_interruptions": True}


def _render(chart: Any, title: str) -> str:
    chart.add_xml_filter(_plain_svg(title))
    svg: str = chart.render(is_unicode=True)
    return svg


def _trend_svg(title: str, keys: list[str], series: dict[str, list[float | None]],
               *, lo: float, hi: float) -> str | None:
    if not any(v is not None for values in series.values() for v in values):
        return None
    chart = pygal.Line(range=(lo, hi), include_x_axis=lo < 0 < hi, **_config(title, len(keys)))
    chart.x_labels = keys
    for name, values in series.items():
        chart.add(name, values)
    return _render(chart, title)


def _bar_svg(title: str, labels: list[str], values: list[float | None], *,
             horizontal: bool = False, lo: float | None = None,
             hi: float | None = None) -> str | None:
    if not any(values):
        return None
    kind = pygal.HorizontalBar if horizontal else pygal.Bar
    extra: dict[str, Any] = {"show_legend": False}
    if lo is not None and hi is not None:
        extra["range"] = (lo, hi)
    config = _config(title, len(labels))
    if horizontal:
        config.update(x_label_rotation=0, show_minor_x_labels=True, x_labels_major_every=1,
                      height=max(240, 28 * len(labels) + 80))
    chart = kind(**config, **extra)
    chart.x_labels = labels
    chart.add(title, values)
    return _render(chart, title)


# -- figures laid out ---------------------------------------------------------------------

@dataclass
class Figure:
    """One chart and the table of its figures."""

    id: str
    title: str
    header: list[str]
    rows: list[list[str]]
    svg: str | None = None
    note: str = ""
    empty: str = field(default_factory=lambda: _("Nothing counted in this range."))


def _number(value: float | None) -> str:
    return "—" if value is None else formats.number_format(value, 1)


def _group_name(name: str) -> str:
    return {"(nobody)": _("(nobody)"), "(unknown)": _("(unknown)")}.get(name, name)


class Named(str):
    """A table cell holding the clinic's name for an identifier; the template
    puts the identifier in its title, so two people of one name stay apart."""

    key: str

    def __new__(cls, text: str, key: str) -> Named:
        cell = super().__new__(cls, text)
        cell.key = key
        return cell


def _label(names: Names, kind: str, group: str) -> str:
    """A group's name as people read it: the clinic's name, else the identifier
    (so with no names set the tables equal `feedback-collector report --csv`)."""
    if group in ("(nobody)", "(unknown)"):
        return _group_name(group)
    text = names.terminal(group) if kind == "terminal" else names.label(kind, group)
    return text if text == group else Named(text, group)


def _legend(labels: dict[str, str]) -> dict[str, str]:
    """group -> its label in a chart, with the identifier added where two groups
    share a name (a chart has no title attribute to tell them apart)."""
    count: dict[str, int] = {}
    for text in labels.values():
        count[text] = count.get(text, 0) + 1
    return {g: f"{t} ({g})" if count[t] > 1 else t for g, t in labels.items()}


def _index_series(rows: Sequence[reports.IndexRow], keys: list[str],
                  label: Callable[[str], str] = _group_name) -> dict[str, list[float | None]]:
    """The busiest groups' index per period, for a chart of a readable size."""
    by_group: dict[str, dict[str, reports.IndexRow]] = {}
    for r in rows:
        by_group.setdefault(r.group, {})[r.period] = r
    busiest = sorted(by_group, key=lambda g: -sum(r.base for r in by_group[g].values()))
    legend = _legend({g: str(label(g)) for g in busiest[:MAX_SERIES]})
    return {legend[g]: [by_group[g][k].index if k in by_group[g] else None for k in keys]
            for g in busiest[:MAX_SERIES]}


def _many_note(groups: int) -> str:
    if groups <= MAX_SERIES:
        return ""
    return _("The chart shows the %(n)d groups with the most presses; the table has all "
             "%(all)d.") % {"n": MAX_SERIES, "all": groups}


def loyalty_figures(presses: reports.PressCounts, c: Choice,
                    names: Names | None = None) -> list[Figure]:
    columns = {"operator": _("Receptionist"), "desk": _("Desk"), "site": _("Site")}
    titles = {"operator": _("Loyalty index per receptionist"),
              "desk": _("Loyalty index per desk"), "site": _("Loyalty index per site")}
    keys = reports.periods(c.start, c.end, c.period)
    clinic = names or NoNames()
    out = []
    for by in ("operator", "desk", "site"):
        def label(group: str, by: str = by) -> str:
            return _label(clinic, by, group)

        rows = reports.loyalty_from_counts(presses, by=by, period=c.period, start=c.start,
                                           end=c.end)
        groups = len({r.group for r in rows})
        out.append(Figure(
            f"loyalty-{by}", titles[by],
            [columns[by], _period_name(c.period), _("Good"), _("Neutral"), _("Bad"),
             _("Presses"), _("Index")],
            [[label(r.group), r.period, str(r.plus), str(r.neutral), str(r.minus),
              str(r.base), _number(r.index)] for r in rows],
            _trend_svg(titles[by], keys, _index_series(rows, keys, label), lo=-100, hi=100),
            _many_note(groups)))
    return out


def _period_name(period: str) -> str:
    return str(dict(PERIOD_CHOICES)[period])


def bad_time_figures(presses: reports.PressCounts, c: Choice) -> list[Figure]:
    hours, days = reports.bad_by_time_from_counts(presses)
    out = []
    for fid, title, slot_name, slots, names in (
            ("bad-hour", _("Bad presses by hour of day"), _("Hour"), hours,
             [f"{h:02d}" for h in range(24)]),
            ("bad-weekday", _("Bad presses by weekday"), _("Weekday"), days,
             [str(WEEKDAYS[d]) for d in range(7)])):
        out.append(Figure(
            fid, title, [slot_name, _("Bad presses"), _("All presses")],
            [[names[s.slot], str(s.bad), str(s.presses)] for s in slots],
            _bar_svg(title, names, [s.bad for s in slots]),
            _("Local time (%(tz)s).") % {"tz": c.tz}))
    return out


def doctor_figures(answers: list[dict[str, Any]],
                   visits: list[tuple[str, str, str, int]], c: Choice,
                   names: Names | None = None) -> list[Figure]:
    rows = reports.doctor_index(answers, period=c.period, tz=c.tz, start=c.start, end=c.end,
                                visits=visits)
    imported = {(d, a, b) for d, a, b, _n in visits}
    names = names or NoNames()

    def label(group: str) -> str:
        return _label(names, "doctor", group)

    def base_kind(r: reports.IndexRow) -> str:
        a, b = reports.period_bounds(r.period, c.period)
        return _("visits") if (r.group, a.isoformat(), b.isoformat()) in imported \
            else _("answers")

    keys = reports.periods(c.start, c.end, c.period)
    # The ranking is of the latest period anyone answered in: the current one may
    # have hardly begun.
    answered = [r for r in rows if r.plus + r.neutral + r.minus > 0]
    latest = max((r.period for r in answered), default=None)
    ranked = sorted((r for r in answered if r.period == latest),
                    key=lambda r: (-(r.index if r.index is not None else -1000), -r.base,
                                   r.group))
    rank_title = _("Doctors ranked by %% yes - %% no, %(period)s") % {"period": latest or "—"}
    ranking = Figure(
        "doctor-ranking", rank_title,
        [_("Rank"), _("Doctor"), _("Index"), _("Answers"), _("Base"), _("Base is")],
        [[str(i), label(r.group), _number(r.index), str(r.plus + r.neutral + r.minus),
          str(r.base), base_kind(r)] for i, r in enumerate(ranked, 1)],
        _bar_svg(rank_title, list(_legend({r.group: str(label(r.group))
                                           for r in ranked[:MAX_BARS]}).values()),
                 [r.index for r in ranked[:MAX_BARS]], horizontal=True, lo=-100, hi=100),
        _("The base is the doctor's answers, or the patients they saw in exactly that "
          "period where a visits file gave the number."))
    trend_title = _("Doctor index over time")
    trend = Figure(
        "doctors", trend_title,
        [_("Doctor"), _period_name(c.period), _("Yes"), _("Unsure"), _("No"), _("Base"),
         _("Index"), _("Base is")],
        [[label(r.group), r.period, str(r.plus), str(r.neutral), str(r.minus),
          str(r.base), _number(r.index), base_kind(r)] for r in rows],
        _trend_svg(trend_title, keys, _index_series(rows, keys, label), lo=-100, hi=100),
        _many_note(len({r.group for r in rows})))
    return [ranking, trend]


def answer_rate_figure(events: list[dict[str, Any]], c: Choice,
                       names: Names | None = None) -> Figure:
    rows = reports.answer_rate(events, period=c.period, tz=c.tz, start=c.start, end=c.end)
    keys = reports.periods(c.start, c.end, c.period)
    series: dict[str, dict[str, float | None]] = {}
    weight: dict[str, int] = {}
    for r in rows:
        series.setdefault(r.terminal, {})[r.period] = r.rate
        weight[r.terminal] = weight.get(r.terminal, 0) + r.approaches
    busiest = sorted(series, key=lambda t: -weight[t])[:MAX_SERIES]
    names = names or NoNames()
    legend = _legend({t: str(_label(names, "terminal", t)) for t in busiest})
    title = _("Answer rate per terminal (answers / approaches, %)")
    top = max([100.0, *(r.rate for r in rows if r.rate is not None)])
    return Figure(
        "answer-rate", title,
        [_("Terminal"), _period_name(c.period), _("Answers"), _("Approaches"), _("Rate %")],
        [[_label(names, "terminal", r.terminal), r.period, str(r.answers),
          str(r.approaches), _number(r.rate)] for r in rows],
        _trend_svg(title, keys, {legend[t]: [series[t].get(k) for k in keys] for t in busiest},
                   lo=0, hi=top),
        _many_note(len(series)))


# -- views --------------------------------------------------------------------------------

SECTIONS = (("dashboard", gettext_lazy("Receptionists and desks")),
            ("dashboard_doctors", gettext_lazy("Doctors and terminals")),
            ("dashboard_fleet", gettext_lazy("Fleet")))


def _page(request: HttpRequest, section: str, form: Filters | None, choice: Choice | None,
          figures: list[Figure], **extra: Any) -> HttpResponse:
    return render(request, "web/dashboard.html", {
        "section": section, "sections": SECTIONS, "form": form, "choice": choice,
        "query": choice.query if choice else "", "figures": figures, **extra})


def _unavailable(request: HttpRequest, section: str) -> HttpResponse:
    response = _page(request, section, None, None, [],
                     error=_("The collector's database cannot be reached; try again in a "
                             "minute."))
    response.status_code = 503
    return response


@role_required(*REPORTS)
def dashboard(request: HttpRequest) -> HttpResponse:
    """Loyalty per receptionist, desk and site; bad presses by hour and weekday."""
    form, c = _choice(request)

    def load(db: Database) -> reports.PressCounts:
        rollup.refresh(db, c.tz)  # only the days stale since the last one
        return rollup.counts(db, c.tz, c.start, c.end)

    try:
        presses = read(load)
    except DatabaseError:
        return _unavailable(request, "dashboard")
    return _page(request, "dashboard", form, c,
                 [*loyalty_figures(presses, c, Names()), *bad_time_figures(presses, c)])


@role_required(*REPORTS)
def doctors(request: HttpRequest) -> HttpResponse:
    """Doctors' index and ranking; answer rate per terminal."""
    form, c = _choice(request)

    def load(db: Database) -> tuple[list[dict[str, Any]], list[tuple[str, str, str, int]]]:
        return (queries.report_events(db, ["answer", "presence"], c.start, c.end),
                queries.visits(db))

    try:
        events, visits = read(load)
    except DatabaseError:
        return _unavailable(request, "dashboard_doctors")
    answers = [r for r in events if r["kind"] == "answer"]
    return _page(request, "dashboard_doctors", form, c,
                 [*doctor_figures(answers, visits, c, names := Names()),
                  answer_rate_figure(events, c, names)])


def _local_time(ms: int | None) -> str:
    if ms is None:
        return _("never")
    when = datetime.fromtimestamp(ms / 1000, UTC).astimezone(ZoneInfo(settings.CONFIG.tz))
    return _("%(time)s (%(age)s ago)") % {"time": when.strftime("%Y-%m-%d %H:%M"),
                                         "age": timesince(when)}


def fleet_figure(rows: Iterable[dict[str, Any]], names: Names | None = None) -> Figure:
    states = {"online": _("online"), "offline": _("offline"), "unknown": _("unknown")}
    clock = {True: _("synced"), False: _("not synced"), None: "—"}
    names = names or NoNames()
    table = []
    for r in rows:
        # Alarm codes only: their texts name badges and files, nothing a report needs.
        alarms = sorted({a.split(":", 1)[0] for a in r["alarms"]})
        table.append([
            _label(names, "terminal", r["edge"]), states.get(r["state"], r["state"]),
            _local_time(r["last_seen_ms"]),
            "—" if r["queue"] is None else str(r["queue"]),
            "—" if r["oldest_pending_s"] is None else
            _("%(s)d s") % {"s": int(r["oldest_pending_s"])},
            ", ".join(r["devices"]) or _("ok"), ", ".join(alarms) or _("none"),
            clock[r["clock_synced"]],
            ", ".join(f"{d} {n}" for d, n in r["device_lost_24h"].items()) or "0"])
    return Figure("fleet", _("Edges"),
                  [_("Edge"), _("State"), _("Last seen"), _("Queue"), _("Oldest waiting"),
                   _("Problem devices"), _("Alarms"), _("Clock"),
                   _("Lost on devices, 24 h")], table, None, "",
                  _("No edge has reported yet."))


@role_required(*REPORTS)
def fleet(request: HttpRequest) -> HttpResponse:
    try:
        rows = read(lambda db: queries.fleet_rows(db, int(time.time() * 1000)))
    except DatabaseError:
        return _unavailable(request, "dashboard_fleet")
    online = sum(1 for r in rows if r["state"] == "online")
    return _page(request, "dashboard_fleet", None, None, [fleet_figure(rows, Names())],
                 summary=_("%(online)d of %(all)d edges online") % {"online": online,
                                                                   "all": len(rows)},
                 problems=sum(1 for r in rows if r["devices"] or r["alarms"]
                              or r["state"] != "online"))
