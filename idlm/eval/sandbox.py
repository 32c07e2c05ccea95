"""The child side of `execution.py`: runs one untrusted Python program inside the limits the
parent asks for. It runs as `python -I -B sandbox.py` with the request as JSON on stdin, so it
imports nothing of idlm (standard library only).

Layers, strongest first:
- namespaces (Linux, root or unprivileged user namespaces): a network namespace with no
  interface up, a mount namespace in which every mount is read-only and the working directory
  is a small private tmpfs;
- resource limits: address space, CPU seconds, file size, open files, no core dumps;
- a guard in the interpreter that disables deleting, renaming, chmod/chown, process creation
  and signals, and sockets where no network namespace could be made. The guard is easy to get
  round for hostile code; it stops model-written code that is merely careless.
The parent adds the rest: a fresh temporary cwd, a minimal environment, a new session, and a
kill of the whole process group at the timeout.
"""

import builtins
import ctypes
import json
import os
import re
import resource
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
# per-mount flags a bind remount must repeat: dropping a locked one fails inside a user namespace
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21}
DISABLED_OS = ("kill", "killpg", "system", "popen", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink",
               "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown",
               "lchown", "chroot", "chdir", "fchdir", "link", "symlink", "fork", "forkpty", "vfork", "_exit",
               "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve",
               "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "setuid", "setgid")


def set_limits(memory_mb: int, cpu_s: int, file_mb: int) -> None:
    for res, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu_s),
                       (resource.RLIMIT_FSIZE, file_mb << 20), (resource.RLIMIT_NOFILE, 64),
                       (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mounts() -> list[tuple[bytes, int]]:
    """(mount point, flags to keep) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = sum(MOUNT_FLAGS.get(opt, 0) for opt in fields[5].split(","))
            out.append((point.encode(), flags))
    return out


def isolate(workdir: str) -> list[str]:
    """Enters new network and mount namespaces; returns what is isolated ("network", "filesystem")."""
    if not sys.platform.startswith("linux"):
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET) != 0:
            return []
        try:  # be root inside the new user namespace, so that we may mount
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
        except OSError:
            return ["network"]
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return ["network"]
    for point, flags in _mounts():
        if libc.mount(b"none", point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None) != 0:
            return ["network"]
    if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=0700") != 0:
        return ["network"]
    os.chdir(workdir)  # enter the tmpfs that now covers the directory
    return ["network", "filesystem"]


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the idlm sandbox")
    return refuse


def guard(block_sockets: bool) -> None:
    import faulthandler
    import shutil
    import subprocess

    faulthandler.disable()
    for name in DISABLED_OS:
        if hasattr(os, name):
            setattr(os, name, _disabled(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    subprocess.Popen = _disabled("subprocess.Popen")
    builtins.help = _disabled("help")
    if block_sockets:
        import socket

        for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
            setattr(socket, name, _disabled(f"socket.{name}"))
        sys.modules["_socket"] = None  # a later `import _socket` fails


def main() -> None:
    request = json.loads(sys.stdin.read())
    nonce = request["nonce"]  # a local: the program cannot read it, so it cannot fake success
    set_limits(request["memory_mb"], request["cpu_s"], request["file_mb"])
    isolated = isolate(os.getcwd()) if request["isolate"] else []
    report, write, exit_ = os.dup(1), os.write, os._exit
    write(report, f"{'+'.join(isolated) or 'none'}\n".encode())
    guard(block_sockets="network" not in isolated)
    try:
        code = compile(request["program"], "candidate.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        sys.stdout.flush()
    except BaseException:  # SystemExit too: a program that exits early did not pass its tests
        traceback.print_exc()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        exit_(1)
    write(report, f"\n{nonce}\n".encode())
    exit_(0)


if __name__ == "__main__":
    main()
