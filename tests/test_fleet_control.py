import signal
import threading
from pathlib import Path

import pytest

from kiln import fleet_control


def test_a_restart_request_reaches_the_launcher_and_its_answer_comes_back(tmp_path: Path):
    launcher = fleet_control.Requests(tmp_path)
    launcher.announce()  # this process plays the launcher
    previous = signal.signal(signal.SIGHUP, lambda *_: launcher.asked.set())
    answers: list[str] = []
    asking = threading.Thread(target=lambda: answers.append(fleet_control.ask(tmp_path, "render", timeout_s=10)))
    try:
        asking.start()
        assert launcher.asked.wait(10)
        rolled: list[str] = []
        launcher.serve(lambda service: rolled.append(service) or [("render", 0), ("render-2", 0)], lambda _: None)
        asking.join(10)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert rolled == ["render"]
    assert answers == ["restarted render: render exited 0, render-2 exited 0"]
    assert not (tmp_path / "run" / "fleet-request").exists()


def test_a_failed_restart_is_reported_not_raised(tmp_path: Path):
    launcher = fleet_control.Requests(tmp_path)
    launcher.announce()
    (tmp_path / "run" / "fleet-request").write_text("render")

    def roll(service: str):
        raise TimeoutError("render-2 not ready after 120s")

    launcher.serve(roll, lambda _: None)
    assert (tmp_path / "run" / "fleet-result").read_text().startswith("the restart of render stopped: TimeoutError")


def test_without_a_running_launcher_the_command_says_so(tmp_path: Path):
    with pytest.raises(fleet_control.ControlError, match="no `kiln up` is running"):
        fleet_control.ask(tmp_path, "render", timeout_s=1)
    launcher = fleet_control.Requests(tmp_path)
    launcher.announce()
    launcher.retire()
    with pytest.raises(fleet_control.ControlError):
        fleet_control.ask(tmp_path, "render", timeout_s=1)
