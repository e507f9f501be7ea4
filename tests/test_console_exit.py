"""The ``recarchive`` console script ends its process without Python's teardown, losing nothing.

Each case runs the console script's function in a child process whose stdout is a pipe (block
buffered: output not flushed at exit would be lost whole), and checks what came out.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

#: A child that registers what a command may leave for exit, then runs ``console()``.
CHILD = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from pathlib import Path

    marks = Path(sys.argv[1])

    class Teardown:
        def __init__(self, path, write):
            self.path, self.write = path, write  # module globals may be gone by then

        def __del__(self):  # runs only in the interpreter's finalization
            self.write(self.path, "ran")

    keep = Teardown(marks / "teardown", Path.write_text)
    atexit.register(lambda: (marks / "atexit").write_text("ran"))
    # Buffered on a pipe, written after the command's own output and flushes.
    atexit.register(lambda: print("the last words of an atexit handler", end=""))
    if sys.argv[2] == "thread":
        def late():
            time.sleep(0.5)
            (marks / "thread").write_text("ran")
        threading.Thread(target=late).start()
    from recarchive.cli.app import main
    from recarchive.cli.console_script import console

    sys.argv = ["recarchive", *sys.argv[3:]]
    if sys.argv[1:2] == ["--main"]:
        sys.argv.pop(1)
        main()
    console()
    """
)

GLUE = ["ddl", "glue", "--location", "s3://bucket/prefix"]
LAST_WORDS = b"the last words of an atexit handler"


def child_env() -> dict[str, str]:
    """No settings, and stdout buffered as a user's is (``PYTHONUNBUFFERED`` would hide a
    missing flush)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("RECARCHIVE_") and key != "PYTHONUNBUFFERED"
    }


def run_child(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), mode, *args],
        capture_output=True,
        env=child_env(),
        timeout=60,
        check=False,
    )


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def glue_output() -> bytes:
    """What ``recarchive ddl glue`` prints through the installed console script."""
    done = subprocess.run(
        [str(BIN / "recarchive"), *GLUE], capture_output=True, timeout=60, check=True
    )
    assert len(done.stdout) > 2000
    return done.stdout


def test_output_exit_code_and_atexit_handlers_survive(tmp_path: Path, glue_output: bytes) -> None:
    done = run_child(tmp_path, "plain", *GLUE)
    assert done.returncode == 0, done.stderr
    # Every byte, the atexit handler's last (only a flush after the handlers sends it).
    assert digest(done.stdout) == digest(glue_output + LAST_WORDS)
    assert (tmp_path / "atexit").read_text() == "ran"
    # The teardown was skipped: the fast path was taken (the control below takes the other).
    assert not (tmp_path / "teardown").exists()


def test_main_alone_keeps_the_ordinary_exit(tmp_path: Path, glue_output: bytes) -> None:
    """Control: ``main()`` raises ``SystemExit`` and Python's teardown runs as always."""
    done = run_child(tmp_path, "plain", "--main", *GLUE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == glue_output + LAST_WORDS
    assert (tmp_path / "teardown").read_text() == "ran"


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        pytest.param(["archive"], 2, b"missing required setting", id="usage-error"),
        pytest.param(["ddl", "nosuch"], 2, b"nosuch", id="bad-argument"),
        pytest.param(["--help"], 0, b"Usage", id="help"),
    ],
)
def test_exit_codes_and_messages_arrive(
    tmp_path: Path, args: list[str], code: int, said: bytes
) -> None:
    done = run_child(tmp_path, "plain", *args)
    assert done.returncode == code, done.stderr
    assert said in done.stdout + done.stderr
    assert (tmp_path / "atexit").read_text() == "ran"


def test_a_running_thread_is_waited_for(tmp_path: Path, glue_output: bytes) -> None:
    """A non-daemon thread still at work: the ordinary exit, which waits for it."""
    done = run_child(tmp_path, "thread", *GLUE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == glue_output + LAST_WORDS
    assert (tmp_path / "thread").read_text() == "ran"
    assert (tmp_path / "teardown").read_text() == "ran"


def closed_stdout_exit(tmp_path: Path, entry: list[str]) -> tuple[int, bytes]:
    """Exit status and stderr of ``recarchive archive`` (an error) whose stdout reader left."""
    child = subprocess.Popen(
        # No output of its own on stdout (an error on stderr): only the flush at exit fails.
        [sys.executable, "-c", CHILD, str(tmp_path), "plain", *entry, "archive"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    errors = child.stderr.read()
    child.stderr.close()
    return child.wait(timeout=60), errors


def test_a_stdout_that_cannot_be_flushed_ends_as_python_ends_it(tmp_path: Path) -> None:
    """The reader went away: the console script exits as Python does (120, said on stderr)."""
    code, errors = closed_stdout_exit(tmp_path, [])
    ordinary_code, ordinary_errors = closed_stdout_exit(tmp_path, ["--main"])
    assert (code, ordinary_code) == (120, 120), errors  # Python's "flush failed" status
    for said in (errors, ordinary_errors):
        assert b"missing required setting" in said
        assert b"BrokenPipeError" in said
