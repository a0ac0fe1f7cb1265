"""Linux namespaces for the executor: no network, a read-only view of the host, no other processes.

Standard library only: this runs as `python -I -S flaap_mq/executor/inside`
before anything else, so it must not import flaap-mq, TensorFlow or any
installed package (see `__main__.py`).

Everything here works as an unprivileged user (a new user namespace makes
the caller root over its own namespaces and nothing else), and as root.
Python 3.11 has no `os.unshare` or `mount`, hence `ctypes`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
# statvfs f_flag bits and the mount flags they stand for. A bind mount made
# in a user namespace keeps ("locks") these flags of the mount it copies: a
# remount that would clear one fails with EPERM, so each remount repeats them.
_LOCKED_FLAGS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_PR_SET_PDEATHSIG = 1
_CAP_SYS_ADMIN = 21

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


class SandboxError(Exception):
    """The sandbox could not be made; the message says why and what to do."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def enter_namespaces() -> None:
    """Moves this process into new user, network, mount and IPC namespaces.

    The caller must be single-threaded, as a fresh interpreter is.
    """
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
    try:
        _check(_libc.unshare(CLONE_NEWUSER | flags), "unshare")
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL, errno.EUSERS):
            raise
        if not _has_cap_sys_admin():
            raise SandboxError(
                "this process may not create a user namespace "
                f"({os.strerror(e.errno)}), which the executor's sandbox needs. Either the "
                "host forbids them (Debian: sysctl kernel.unprivileged_userns_clone=1; any "
                "distribution: user.max_user_namespaces > 0; Ubuntu 24.04: "
                "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for "
                "flaap-mq), or a container's seccomp policy or a systemd unit's "
                "RestrictNamespaces= does (the shipped unit allows what is needed). Only if "
                "the executor may be reachable from the network, pass --executor-network=host."
            ) from None
        # Root (CAP_SYS_ADMIN) where user namespaces are off: the other
        # namespaces need no user namespace then.
        try:
            _check(_libc.unshare(flags), "unshare")
        except OSError as e2:
            raise SandboxError(
                f"cannot create the executor's namespaces even as root ({e2.strerror}): a "
                "container or seccomp policy forbids unshare(2). Allow CLONE_NEWNET, "
                "CLONE_NEWNS and CLONE_NEWPID, or pass --executor-network=host knowingly."
            ) from None
        return
    # Map root in the namespace to the caller, and nothing else.
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def enter_pid_namespace() -> None:
    """The children this process forks next live in a new PID namespace.

    Its first child is the namespace's PID 1: when it exits, the kernel
    kills every other process in it. (A process that has unshared its PID
    namespace can no longer start threads, so only a process that needs
    none calls this.)
    """
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")


def _has_cap_sys_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << _CAP_SYS_ADMIN))
    return False


def bring_up_loopback() -> None:
    """A new network namespace's `lo` starts down; the executor listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(result, f"mount {target}")


def _locked_flags(path: str) -> int:
    f_flag = os.statvfs(path).f_flag
    return sum(mount_flag for bit, mount_flag in _LOCKED_FLAGS.items() if f_flag & bit)


def _mount_points() -> list[str]:
    """Every mount point this mount namespace sees, parents before children."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. as octal escapes.
            point = line.split()[4]
            points.append(point.encode().decode("unicode_escape").encode("latin-1").decode())
    return points


def seal_filesystem(hidden: list[str]) -> None:
    """Makes every mount read-only and hides the `hidden` paths.

    Read-only everywhere means the executor cannot change the silo's data
    directory, flaap-mq's code or anything else of the host's, whatever the
    file permissions say. `hidden` files read as empty (a bind of
    /dev/null) and hidden directories as empty (a tmpfs): the worker's
    credential files. Mounts the kernel will not remount (some pseudo file
    systems) stay as they are; the data directory and the root must not.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for point in _mount_points():
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(point))
        except OSError as e:
            if point == "/":
                raise SandboxError(f"cannot make the root file system read-only: {e}") from None
    for path in hidden:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k")
        elif os.path.exists(path):
            _mount("/dev/null", path, None, MS_BIND)


def mount_proc() -> None:
    """A read-only /proc that shows only this PID namespace: no other process's environment.

    Read-only, like every other mount: the executor is root in its user
    namespace, and when the owner is root that is the host's uid 0, whom
    the kernel lets write /proc/sys (host-wide settings such as
    kernel.core_pattern) and /proc/sysrq-trigger whatever the namespace.
    """
    _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


_PR_SET_SECUREBITS = 28
_PR_CAPBSET_DROP = 24
_SECBIT_NOROOT = 1 << 0
_SECBIT_NOROOT_LOCKED = 1 << 1
_SECBIT_NO_SETUID_FIXUP = 1 << 2
_SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
_SECBIT_KEEP_CAPS_LOCKED = 1 << 5
_LAST_CAP = 63  # higher than any capability a kernel knows; unknown ones are skipped


def drop_capabilities() -> None:
    """The executor keeps no capability, not even in its own namespaces, across exec.

    It runs as root of its user namespace, and exec would give root every
    capability there: enough for code that escapes TensorFlow (native code)
    to unmount the masks over the credentials or remount the file system
    read-write. The bounding set is emptied and `SECBIT_NOROOT` (locked)
    stops exec from granting capabilities to uid 0.
    """
    for cap in range(_LAST_CAP + 1):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    bits = (
        _SECBIT_NOROOT
        | _SECBIT_NOROOT_LOCKED
        | _SECBIT_NO_SETUID_FIXUP
        | _SECBIT_NO_SETUID_FIXUP_LOCKED
        | _SECBIT_KEEP_CAPS_LOCKED
    )
    _check(_libc.prctl(_PR_SET_SECUREBITS, bits, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")


def check_read_only(path: str) -> None:
    """Raises unless writes under `path` are refused by its mount."""
    if not os.statvfs(path).f_flag & os.ST_RDONLY:
        raise SandboxError(f"{path} is still writable inside the sandbox; refusing to go on")


def die_with_parent(signal_number: int) -> None:
    """The kernel sends `signal_number` when the thread that forked us exits."""
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0), "prctl")


# seccomp: the executor may not create Unix sockets. A read-only mount does
# not stop connect(2) to a socket on the file system, and the network
# namespace does not cover path-named sockets: without this, a gRPC service
# of the host listening on a Unix socket the worker's user may open would be
# reachable from a computation (tf.data service and RPC ops speak gRPC).
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_AF_UNIX = 1
# (audit architecture, socket, socketpair) by machine.
_SYSCALLS = {
    "x86_64": (0xC000003E, 41, 53),
    "aarch64": (0xC00000B7, 198, 199),
}


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def refuse_unix_sockets() -> None:
    """Installs a seccomp filter: socket() and socketpair() of AF_UNIX fail with EPERM.

    Inherited by the executor across exec. Raises `SandboxError` on a
    machine whose system call numbers are not known here.
    """
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        raise SandboxError(
            f"no seccomp filter for {machine} machines: the executor could open Unix sockets"
        )
    arch, socket_nr, socketpair_nr = _SYSCALLS[machine]
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    program = b"".join(
        [
            _bpf(ld_w_abs, 0, 0, 4),  # seccomp_data.arch
            _bpf(jeq_k, 1, 0, arch),
            _bpf(ret_k, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM),  # another ABI: refused
            _bpf(ld_w_abs, 0, 0, 0),  # seccomp_data.nr
            _bpf(jeq_k, 1, 0, socket_nr),
            _bpf(jeq_k, 0, 3, socketpair_nr),
            _bpf(ld_w_abs, 0, 0, 16),  # seccomp_data.args[0], the domain
            _bpf(jeq_k, 0, 1, _AF_UNIX),
            _bpf(ret_k, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM),
            _bpf(ret_k, 0, 0, _SECCOMP_RET_ALLOW),
        ]
    )
    filters = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(filters))
    fprog_buffer = ctypes.create_string_buffer(fprog)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(
        _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog_buffer), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )
