"""The Mac: caffeinate while a run trains, and MPS watermark variables torch would reject."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.fit.awake import caffeinate_command, keep_awake
from engine.fit.mps_env import HIGH, LOW, check_mps_watermarks, mps_may_be_used

ON_PATH = {"caffeinate": "/usr/bin/caffeinate"}.get


def test_caffeinate_command_on_macos_waits_on_the_training_process():
    assert caffeinate_command(4242, platform="darwin", which=ON_PATH) == ["/usr/bin/caffeinate", "-i", "-w", "4242"]


def test_no_caffeinate_off_macos_without_the_binary_or_with_no_prevent_sleep():
    assert caffeinate_command(1, platform="linux", which=ON_PATH) is None
    assert caffeinate_command(1, platform="darwin", which=lambda name: None) is None
    assert caffeinate_command(1, no_prevent_sleep=True, platform="darwin", which=ON_PATH) is None


class FakeProc:
    def __init__(self, command, **kwargs) -> None:
        self.command, self.running, self.terminated = command, True, False

    def poll(self):
        return None if self.running else 0

    def terminate(self) -> None:
        self.running, self.terminated = False, True

    def wait(self, timeout=None) -> int:
        return 0


def test_keep_awake_starts_caffeinate_for_the_run_and_stops_it_after(monkeypatch):
    started: list[FakeProc] = []

    def popen(command, **kwargs):
        started.append(FakeProc(command, **kwargs))
        return started[-1]

    with keep_awake(False, pid=77, popen=popen, platform="darwin", which=ON_PATH) as proc:
        assert proc.command == ["/usr/bin/caffeinate", "-i", "-w", "77"] and proc.running
    assert started == [proc] and proc.terminated
    with pytest.raises(RuntimeError):
        with keep_awake(False, pid=77, popen=popen, platform="darwin", which=ON_PATH) as proc:
            raise RuntimeError("a run that fails")
    assert proc.terminated
    with keep_awake(True, popen=popen, platform="darwin", which=ON_PATH) as proc:
        assert proc is None
    assert len(started) == 2


@pytest.mark.parametrize("env", [
    {}, {HIGH: "0"}, {HIGH: "2.0"}, {HIGH: "1.7", LOW: "1.4"}, {HIGH: "0.0", LOW: "2.0"}, {HIGH: "1.0", LOW: "0.5"},
    {LOW: "0"},
])
def test_watermark_values_torch_accepts_pass(env):
    check_mps_watermarks(env)


@pytest.mark.parametrize("env,expected", [
    ({HIGH: "2.5"}, f"{HIGH}=2.5 is outside torch's range [0, 2] (0 = no limit, default 1.7)"),
    ({HIGH: "-1"}, f"{HIGH}=-1 is outside torch's range [0, 2]"),
    ({HIGH: "1.0"}, f"{HIGH}=1.0 is below the default {LOW}=1.4, which torch then rejects; also set {LOW} in [0, 1]"),
    ({HIGH: "1.2", LOW: "1.3"}, f"{LOW}=1.3 is outside torch's range [0, 1.2] (it must not exceed {HIGH}=1.2)"),
    ({LOW: "1.8"}, f"{LOW}=1.8 is outside torch's range [0, 1.7]"),
    ({HIGH: "lots"}, f"{HIGH}='lots' is not a number; torch accepts a ratio in [0, 2] (0 = no limit)"),
])
def test_watermark_values_torch_would_reject_are_one_line_naming_the_variable_and_range(env, expected):
    with pytest.raises(ConfigError) as err:
        check_mps_watermarks(env)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_watermarks_are_checked_only_where_mps_can_run():
    assert mps_may_be_used("auto", platform="darwin") and mps_may_be_used("mps", platform="darwin")
    assert not mps_may_be_used("cpu", platform="darwin") and not mps_may_be_used("auto", platform="linux")


def test_plan_run_refuses_a_bad_watermark_before_loading_on_a_mac(tiny_cache, tmp_path, monkeypatch):
    from engine.demo import prepare_demo
    from engine.plan import plan_run

    monkeypatch.setattr("engine.plan.mps_may_be_used", lambda device: mps_may_be_used(device, platform="darwin"))
    monkeypatch.setenv(HIGH, "3")
    config = prepare_demo(root=tiny_cache, output_root=tmp_path, device="auto")
    with pytest.raises(ConfigError, match=rf"^{HIGH}=3 is outside torch's range \[0, 2\]"):
        plan_run(config)
    plan_run(config.replace(device="cpu"))
