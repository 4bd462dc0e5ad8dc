"""The viewer's pace: pure hysteresis on measured idle CPU, and the measurement itself."""

from collections import namedtuple

import pytest

from cockpit.pace import BUSY_FACTOR, IdleCpu, ViewerPace

Times = namedtuple("Times", "user system idle iowait")


def test_pace_slows_below_half_an_idle_core_and_recovers_only_with_a_whole_one():
    pace = ViewerPace(2.0)
    assert pace.interval == 2.0 and not pace.busy and pace.label() == ""
    assert pace.observe(None) is False and not pace.busy           # unknown: keep the pace
    assert pace.observe(0.6) is False and not pace.busy
    assert pace.observe(0.3) is True and pace.busy
    assert pace.interval == 2.0 * BUSY_FACTOR and pace.label() == f"CPU busy: redraw every {2.0 * BUSY_FACTOR:g} s"
    assert pace.observe(0.9) is False and pace.busy                 # between the marks: no flapping
    assert pace.observe(None) is False and pace.busy
    assert pace.observe(1.2) is True and not pace.busy and pace.interval == 2.0


def test_idle_cpu_is_idle_plus_iowait_seconds_per_second(monkeypatch):
    import psutil

    clock = iter([10.0, 12.0, 13.0, 13.0])
    readings = iter([Times(5, 1, 100.0, 1.0), Times(7, 1, 102.5, 1.5), Times(8, 2, 102.6, 1.5),
                     Times(8, 2, 102.6, 1.5)])
    monkeypatch.setattr(psutil, "cpu_times", lambda: next(readings))
    idle = IdleCpu(clock=lambda: next(clock))                       # the first reading is the baseline
    assert idle() == pytest.approx(1.5)                             # 3.0 idle+iowait seconds over 2 s
    assert idle() == pytest.approx(0.1)
    assert idle() is None                                           # no time passed: no figure


def test_idle_cpu_is_unknown_when_it_cannot_be_read(monkeypatch):
    import psutil

    def broken():
        raise PermissionError("no /proc")

    monkeypatch.setattr(psutil, "cpu_times", broken)
    assert IdleCpu()() is None
