"""Runs model-written Python programs, never in our own process: each in a fresh `python -I`
subprocess (see `sandbox.py` for the limits and namespaces it sets up on its side), in a new
temporary directory, with a minimal environment, in its own session, killed with its whole
process group at the timeout."""

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

SANDBOX = Path(__file__).with_name("sandbox.py")
TAIL_CHARS = 2000


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds, interpreter start included
    memory_mb: int = 2048  # address space
    file_mb: int = 16  # largest file (stdout and stderr included) the program may write
    isolate: bool = True  # network and mount namespaces where the system allows them


@dataclass
class ExecResult:
    status: str  # passed, failed or timeout
    seconds: float
    stdout: str  # the last TAIL_CHARS characters
    stderr: str
    isolation: str  # "network+filesystem", "network" or "none": which namespaces held (guards always)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * TAIL_CHARS))
    return f.read().decode("utf-8", "replace")[-TAIL_CHARS:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session leader's pid is the group id
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_python(program: str, limits: Limits = Limits()) -> ExecResult:
    """Runs `program`; it passes when it runs to its end without an exception (SystemExit included)."""
    nonce = secrets.token_hex(16)
    request = json.dumps({"program": program, "nonce": nonce, "memory_mb": limits.memory_mb,
                          "cpu_s": math.ceil(limits.timeout) + 1, "file_mb": limits.file_mb,
                          "isolate": limits.isolate}).encode()
    with (tempfile.TemporaryDirectory(prefix="idlm-exec-") as work, tempfile.TemporaryFile() as out,
          tempfile.TemporaryFile() as err):
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(SANDBOX)], stdin=subprocess.PIPE, stdout=out,
                                stderr=err, cwd=work, env=env, start_new_session=True)
        try:
            proc.communicate(request, timeout=limits.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)  # also whatever the program left running
        seconds = time.monotonic() - start
        out.seek(0)
        isolation = out.readline(100).decode("utf-8", "replace").strip() or "unknown"
        stdout, stderr = _tail(out), _tail(err)
    stdout = stdout.removeprefix(isolation + "\n")
    finished = not timed_out and proc.returncode == 0 and stdout.rstrip("\n").endswith("\n" + nonce)
    if finished:
        stdout = stdout.rstrip("\n").removesuffix("\n" + nonce)
    status = "timeout" if timed_out else "passed" if finished else "failed"
    if status == "failed" and not stderr.strip():
        rc = proc.returncode
        stderr = (f"killed by signal {-rc} (a resource limit?)" if rc < 0 else
                  f"exited with status {rc} before the end of the program")
    return ExecResult(status, seconds, stdout, stderr, isolation)


def run_many(programs: list[str], limits: Limits = Limits(), workers: int | None = None,
             progress: bool = True) -> list[ExecResult]:
    """Runs programs in parallel (each in its own sandboxed process); results in input order."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(programs), desc="executing", disable=not progress) as bar:
        futures = [pool.submit(run_python, p, limits) for p in programs]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        return [f.result() for f in futures]
