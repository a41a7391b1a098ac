"""A real SLURM cluster on this one machine, for tests: a controller and N compute nodes, each node in its own network
and UTS namespace (its own address and hostname), joined by a bridge that lives in the controller's namespace.

    sudo .venv/bin/python tests/cluster/harness.py up|down|status     (by hand; the test uses SlurmCluster)

    netns lcx-head   hostname lcx-head  bridge lcxbr0 10.201.0.1/24   slurmctld
    netns lcx-node1  hostname node1     eth0 10.201.0.11              slurmd -N node1
    netns lcx-node2  hostname node2     eth0 10.201.0.12              slurmd -N node2

Nothing is added to the machine's own network namespace: the bridge, the veths and every address live in the
namespaces created here, and deleting them removes it all. Client commands (sbatch, scontrol, ...) run inside
lcx-head through SlurmCluster.command. The daemons and jobs share the machine's filesystem, so job logs and
checkpoints are ordinary files, and MUNGE's socket (/run/munge) is reachable from every namespace: the machine's
munged is used, started here when it is not running. Everything else (slurm.conf, pid files, spool, logs) sits
under STATE_DIR; a lock keeps two test runs from sharing the cluster, and `up` first removes whatever a crashed
run left behind. Processes are stopped by pid (checked by name) or because they live in a namespace made here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

STATE_DIR = Path("/run/longctx-cluster")
LOCK_FILE = Path("/run/longctx-cluster.lock")
NETNS_PREFIX = "lcx-"
HEAD = "lcx-head"
BRIDGE = "lcxbr0"
SUBNET = "10.201.0"  # a private /24 that exists only on the bridge inside lcx-head
MUNGE_SOCKET_DIR = Path("/run/munge")
# Debian packages that provide the programs the cluster needs (bookworm names).
PACKAGES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "munged": "munge",
    "ip": "iproute2",
    "unshare": "util-linux",
    "runuser": "util-linux",
}
JOB_END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def log(message: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(*command: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll predicate until it returns something truthy (returned); RuntimeError naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def namespace_support() -> str | None:
    """Why this machine cannot host the cluster (the reason to skip), or None when it can."""
    if os.geteuid() != 0:
        return "not root: creating network and UTS namespaces needs root"
    if shutil.which("unshare") is None:
        return "no unshare (util-linux): cannot create namespaces"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine cannot create network/UTS namespaces: {probe.stderr.strip()}"
    return None


def install_packages() -> None:
    """apt-get install what is missing (CI is a fresh Debian machine), logging the time it takes."""
    missing = sorted({package for program, package in PACKAGES.items() if shutil.which(program) is None})
    if not missing:
        return
    start = time.monotonic()
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if run("apt-cache", "show", *missing, check=False).returncode != 0:
        run("apt-get", "update", "-qq", env=env, timeout=600)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env, timeout=900)
    log(f"installed {' '.join(missing)} in {time.monotonic() - start:.1f} s")


def pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def stop_processes(pids: list[int], *, names: tuple[str, ...] = (), grace_s: float = 15) -> None:
    """SIGTERM the live pids (only those whose command name is in `names`, when given), SIGKILL what outlives grace_s.

    All at once: each SLURM daemon takes a few seconds to shut down.
    """

    def alive(pid: int) -> bool:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return False
        return not names or comm in names

    targets = [pid for pid in pids if alive(pid)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):  # it may have exited since
            os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not any(alive(pid) for pid in targets), grace_s, f"pids {targets} to exit", interval=0.1)
    except RuntimeError:
        for pid in targets:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class SlurmCluster:
    """N slurmd nodes and a slurmctld in namespaces of this machine; `up()` starts it, `down()` always cleans up."""

    def __init__(self, num_nodes: int = 2, requeue_hold_s: int = 10):
        self.num_nodes = num_nodes
        # AuthInfo=cred_expire is also how long SLURM holds a requeued job before starting it again (default 120 s).
        self.requeue_hold_s = requeue_hold_s
        self.conf = STATE_DIR / "slurm.conf"
        self.logs = STATE_DIR / "logs"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._lock = None

    # ---- names -----------------------------------------------------------------------------------------------------

    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.num_nodes + 1)]

    @staticmethod
    def node_netns(node: str) -> str:
        return NETNS_PREFIX + node

    @staticmethod
    def node_address(node: str) -> str:
        return f"{SUBNET}.{10 + int(node.removeprefix('node'))}"

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def up(self) -> None:
        """Bring the cluster up from nothing (cleaning a crashed run's leftovers first); all nodes idle on return."""
        start = time.monotonic()
        self._take_lock()
        self.down(release_lock=False)
        install_packages()
        self._make_network()
        self._write_config()
        self._start_munge()
        self._start_daemons()
        nodes = self.command("sinfo", "-N", "-h", "-o", "%N=%o").stdout.split()
        log(f"cluster up in {time.monotonic() - start:.1f} s, nodes {' '.join(nodes)}")

    def down(self, release_lock: bool = True) -> None:
        """Stop and remove everything a (possibly crashed) run of this harness started; safe to call at any time."""
        pid_files = [STATE_DIR / "slurmctld.pid"] + [STATE_DIR / f"slurmd-{node}.pid" for node in self.node_names()]
        stop_processes([pid for pid in map(pid_from, pid_files) if pid], names=("slurmctld", "slurmd"))
        # What still runs in our namespaces (slurmstepd, job tasks) was started by our daemons.
        for netns in self.namespaces():
            pids = run("ip", "netns", "pids", netns, check=False).stdout.split()
            stop_processes([int(pid) for pid in pids], grace_s=5)
            run("ip", "netns", "del", netns, check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        if Path("/etc/netns").is_dir() and not any(Path("/etc/netns").iterdir()):
            Path("/etc/netns").rmdir()
        munged = pid_from(STATE_DIR / "munged.pid")  # only there when this harness started munged
        if munged:
            stop_processes([munged], names=("munged",))
        for entry in STATE_DIR.glob("*") if STATE_DIR.is_dir() else []:
            if entry.is_dir() and entry != self.logs:  # the logs stay for a post-mortem until the next `up`
                shutil.rmtree(entry)
            elif entry.is_file():
                entry.unlink()
        if release_lock and self._lock is not None:
            self._lock.close()
            self._lock = None

    def _take_lock(self) -> None:
        self._lock = open(LOCK_FILE, "w")  # held until down()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another run holds {LOCK_FILE}: waiting for it to finish")
            fcntl.flock(self._lock, fcntl.LOCK_EX)

    def namespaces(self) -> list[str]:
        """The network namespaces of this harness that exist now (also those of a crashed run)."""
        listed = run("ip", "netns", "list", check=False).stdout.split("\n") if shutil.which("ip") else []
        return [line.split()[0] for line in listed if line.startswith(NETNS_PREFIX)]

    # ---- network ---------------------------------------------------------------------------------------------------

    def _make_network(self) -> None:
        head_address = f"{SUBNET}.1"
        hosts = f"127.0.0.1 localhost\n{head_address} {HEAD}\n"
        hosts += "".join(f"{self.node_address(node)} {node}\n" for node in self.node_names())
        run("ip", "netns", "add", HEAD)
        run("ip", "-n", HEAD, "link", "add", BRIDGE, "type", "bridge")
        run("ip", "-n", HEAD, "addr", "add", f"{head_address}/24", "dev", BRIDGE)
        run("ip", "-n", HEAD, "link", "set", BRIDGE, "up")
        run("ip", "-n", HEAD, "link", "set", "lo", "up")
        for netns in [HEAD] + [self.node_netns(node) for node in self.node_names()]:
            # `ip netns exec` mounts /etc/netns/<netns>/* over /etc/*: each namespace resolves the others' names.
            etc = Path("/etc/netns") / netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            (etc / "resolv.conf").write_text("# no DNS inside the cluster's namespaces\n")
        for node in self.node_names():
            netns, veth = self.node_netns(node), f"v{node}"
            run("ip", "netns", "add", netns)
            run("ip", "-n", HEAD, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            run("ip", "-n", HEAD, "link", "set", veth, "master", BRIDGE, "up")
            run("ip", "-n", netns, "addr", "add", f"{self.node_address(node)}/24", "dev", "eth0")
            run("ip", "-n", netns, "link", "set", "eth0", "up")
            run("ip", "-n", netns, "link", "set", "lo", "up")

    # ---- SLURM -----------------------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        for directory in ["ctld", "logs"] + [f"spool/{node}" for node in self.node_names()]:
            shutil.rmtree(STATE_DIR / directory, ignore_errors=True)
            (STATE_DIR / directory).mkdir(parents=True)
        hardware = dict(re.findall(r"(\w+)=(\S+)", run("slurmd", "-C").stdout.splitlines()[0]))
        node_resources = " ".join(
            f"{key}={hardware[key]}"
            for key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        )
        # The nodes share this machine's CPUs; each claims its share of the memory.
        memory_mb = int(hardware["RealMemory"]) // self.num_nodes
        nodes = "\n".join(
            f"NodeName={node} NodeHostname={node} NodeAddr={self.node_address(node)} {node_resources} "
            f"RealMemory={memory_mb} State=UNKNOWN"
            for node in self.node_names()
        )
        self.conf.write_text(
            f"""# written by tests/cluster/harness.py
ClusterName=longctx-test
SlurmctldHost={HEAD}({SUBNET}.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire={self.requeue_hold_s}
StateSaveLocation={STATE_DIR}/ctld
SlurmdSpoolDir={STATE_DIR}/spool/%n
SlurmctldPidFile={STATE_DIR}/slurmctld.pid
SlurmdPidFile={STATE_DIR}/slurmd-%n.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=60
KillWait=5
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        # slurmd always loads a cgroup plugin; autodetection stat()s /sys/fs/cgroup, which `ip netns exec` leaves
        # empty (it mounts a fresh sysfs), and slurmd dies. cgroup/v1 skips the detection, and with proctrack/linuxproc
        # and task/none no cgroup is ever created.
        (STATE_DIR / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    def _start_munge(self) -> None:
        if self._munge_works():
            return
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            run("mungekey", "--create", f"--keyfile={key}")
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        MUNGE_SOCKET_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        run("runuser", "-u", "munge", "--", "munged")  # daemonizes
        wait_until(self._munge_works, 10, "munged to answer")
        (STATE_DIR / "munged.pid").write_text((MUNGE_SOCKET_DIR / "munged.pid").read_text())
        log("started munged")

    @staticmethod
    def _munge_works() -> bool:
        return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0

    def _start_daemons(self) -> None:
        # unshare --uts gives each daemon its own hostname; slurmctld checks that it runs on SlurmctldHost.
        self._in_namespace(HEAD, f"hostname {HEAD} && exec slurmctld")
        wait_until(lambda: "is UP" in self.command("scontrol", "ping", check=False).stdout, 30, "slurmctld to answer")
        for node in self.node_names():
            self._in_namespace(self.node_netns(node), f"hostname {node} && exec slurmd -N {node}")
        wait_until(
            lambda: (
                len(self.command("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).stdout.split())
                == self.num_nodes
            ),
            60,
            f"{self.num_nodes} idle nodes (see {self.logs}/slurmd-*.log)",
        )

    def _in_namespace(self, netns: str, script: str) -> None:
        run("ip", "netns", "exec", netns, "unshare", "--uts", "--", "sh", "-c", script, env=self.env)

    # ---- use -------------------------------------------------------------------------------------------------------

    def command(self, *args: str, check: bool = True, cwd: Path | None = None, env: dict | None = None):
        """A SLURM client command (sbatch, scontrol, squeue, ...) run against this cluster, from lcx-head."""
        return run("ip", "netns", "exec", HEAD, *args, check=check, cwd=cwd, env={**self.env, **(env or {})})

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        text = self.command("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_job_end(self, job_id: str, timeout: float) -> dict[str, str]:
        """The job's final `scontrol show job` fields, once it has ended for good (a requeued job runs again)."""

        def ended_job():
            job = self.job(job_id)
            return job if job["JobState"] in JOB_END_STATES else None

        return wait_until(ended_job, timeout, f"job {job_id} to end")

    def log_tails(self, num_lines: int = 40) -> str:
        """The last lines of slurmctld's and every slurmd's log, for a failure report."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-num_lines:]
            parts.append(f"---- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else "status"
    cluster = SlurmCluster()
    if action == "up":
        if reason := namespace_support():
            sys.exit(f"harness: {reason}")
        cluster.up()
        print(f"up; use it with: SLURM_CONF={cluster.conf} ip netns exec {HEAD} sbatch|squeue|scontrol ...")
    elif action == "down":
        cluster.down()
    elif action == "status":
        print("namespaces:", " ".join(cluster.namespaces()) or "none")
        if cluster.conf.is_file():
            print(cluster.command("sinfo", "-N", "-o", "%N %T %o", check=False).stdout)
    else:
        sys.exit("usage: harness.py up|down|status")


if __name__ == "__main__":
    main()
