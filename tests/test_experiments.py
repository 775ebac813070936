"""The experiment runner (``engine/experiments.py``) where the sweep's, the outcome benchmark's and the
study's tests do not reach it: output echoed while a run is still going, a run stopped at its timeout with
its whole process group, and the error naming a failed run's log."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from engine import experiments

# Prints a line, then waits (up to 30 s) for the file argv[1] to appear, says whether it did and exits 3
# after a last line without a newline.
WAITER = """
import sys, time
from pathlib import Path
print("first", flush=True)
deadline = time.time() + 30
while not Path(sys.argv[1]).exists() and time.time() < deadline:
    time.sleep(0.02)
print("saw the marker" if Path(sys.argv[1]).exists() else "no marker", flush=True)
sys.stdout.write("last")
sys.exit(3)
"""


def test_output_is_echoed_while_the_run_goes_on_and_logged_between_header_and_footer(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    marker, echoed = tmp_path / "marker", []

    def echo(text: str, flush: bool = False) -> None:  # the run waits for the marker until "first" is echoed
        echoed.append(text)
        if text.endswith("first"):
            marker.touch()

    monkeypatch.setattr(experiments, "print", echo, raising=False)
    script, log = tmp_path / "waiter.py", tmp_path / "logs" / "run.log"
    script.write_text(WAITER)
    status, seconds, output = experiments.run([sys.executable, str(script), str(marker)], log, echo="run| ")
    assert (status, echoed, output) == (3, ["run| first", "run| saw the marker", "run| last"],
                                        "first\nsaw the marker\nlast")
    header, *output = log.read_text().splitlines()
    assert header.startswith("# ") and header.endswith(f" run: {sys.executable} {script} {marker}")
    assert output == ["first", "saw the marker", "last", f"# exit status 3 after {seconds:.1f} s"]


def test_a_run_past_its_timeout_is_stopped_with_its_process_group(tmp_path: Path) -> None:
    spawner, log = tmp_path / "spawner.py", tmp_path / "run.log"
    spawner.write_text("import subprocess, sys, time\n"
                       "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                       "print(child.pid, flush=True)\n"
                       "time.sleep(60)\n")
    status, seconds, output = experiments.run([sys.executable, str(spawner)], log, timeout=2)
    assert status is None and seconds < 25  # SIGTERM ended it, no SIGKILL after the 60 s grace
    assert output.endswith("\n(timed out after 2 s)"), output
    grandchild = int(log.read_text().splitlines()[1])
    deadline = time.time() + 10
    while time.time() < deadline:  # gone once init has reaped it
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"process {grandchild}, started by the run, outlived its timeout")


def test_a_failed_run_is_an_error_naming_its_log_and_last_lines(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import sys\nfor i in range(8):\n    print('line', i)\nsys.exit(2)\n")
    log = tmp_path / "train.log"
    with pytest.raises(RuntimeError) as error:
        experiments.run_checked([sys.executable, str(script)], log, tmp_path)
    message = str(error.value).splitlines()
    assert message[0] == f"train.py exited with 2 (log {log}):"
    assert message[1:5] == ["line 4", "line 5", "line 6", "line 7"] and message[5].startswith("# exit status 2")
