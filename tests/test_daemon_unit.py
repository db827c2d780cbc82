"""twotower.daemon's signal handling, in child processes (no services)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

ROOT = __file__.rsplit("/tests/", 1)[0]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=ROOT)


def test_the_first_signal_shuts_down_cleanly_even_after_the_daemon_set_its_own_flag() -> None:
    """A daemon sets its own flag when a loop fails; the supervisor's one SIGTERM must not then
    be taken for a second one (which exits at once, skipping the shutdown)."""
    result = _run("""
        import os, signal, time
        from twotower.daemon import ShutdownFlag, install_signal_handlers
        flag = ShutdownFlag()
        install_signal_handlers(flag)
        flag.set()  # a loop failed: the daemon stops itself
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
        finally:
            print("shutdown ran")
    """)
    assert result.returncode == 0 and "shutdown ran" in result.stdout, result


def test_a_signal_while_the_flag_is_held_does_not_deadlock() -> None:
    result = _run("""
        import os, signal
        from twotower.daemon import ShutdownFlag, install_signal_handlers
        flag = ShutdownFlag()
        install_signal_handlers(flag)
        with flag._event._cond:  # where the main thread is inside flag.wait()
            os.kill(os.getpid(), signal.SIGTERM)
        assert flag.wait(5)
        print("stopping")
    """)
    assert result.returncode == 0 and "stopping" in result.stdout, result


def test_a_second_signal_exits_at_once() -> None:
    result = _run("""
        import os, signal, time
        from twotower.daemon import ShutdownFlag, install_signal_handlers
        install_signal_handlers(ShutdownFlag())
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not reached")
    """)
    assert result.returncode == 1 and "not reached" not in result.stdout
