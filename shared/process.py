"""A child process with its log file: what `prism up` runs (servers and services) and the tests' servers.

The child runs in its own session (a Ctrl-C on the terminal reaches only the parent, which stops
its children in order) and, on Linux, gets SIGTERM when the parent dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path


class Child:
    """One child process writing stdout and stderr to `log_path`; `stop()` sends SIGTERM, then SIGKILL
    after a bound. `start()` again after it exited restarts it (with the current `argv` and `env`)."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def failure(self) -> str | None:
        """'<name> exited with code N: <last log line> (log: <path>)' once it has exited."""
        if self.returncode is None:
            return None
        return f"{self.name} exited with code {self.returncode}: {_last_line(self.log_path)} (log: {self.log_path})"

    async def stop(self, timeout_s: float) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: ask the kernel to SIGTERM this child when the parent dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][-300:] if lines else "(empty log)"
