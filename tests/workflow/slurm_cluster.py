"""A throw-away single-node SLURM cluster for tests: munged, slurmctld and slurmd, as root, in a folder.

Debian's `slurm-wlm` and `munge` packages (`apt-get install slurm-wlm munge`; `make test-slurm`
installs them). Everything the daemons write (config, munge key and socket, state, spool, logs,
the job-completion log) lies under one folder. Clients find the cluster through `SLURM_CONF`
(`SlurmCluster.env`) and through a link /etc/slurm/slurm.conf → that folder's slurm.conf, made
only where /etc/slurm/slurm.conf does not exist and removed by `stop()`: the `srun` that
snakemake-executor-plugin-slurm-jobstep runs inside each job drops every SLURM_* variable,
SLURM_CONF included, so it reads the default path. A machine that already has a SLURM
configuration there is refused (one line), not changed.

The node claims more than the machine has (`SlurmdParameters=config_overrides`: 16 CPUs, 64 GB,
one GPU as a count-only GRES with no device file) so that the workflow's SLURM profile, written for
a real cluster (`--cpus-per-task=9`, `--mem=32000`, `--gpus=1` on partition `gpu`), is accepted as
it is; there are two partitions, `cpu` (the default) and `gpu`, both of this one node. Processes
are tracked by `proctrack/linuxproc`, tasks are not bound, no cgroups, no accounting database:
`sacct` does not work ("accounting storage is disabled"): slurmctld keeps finished jobs for an hour
(`MinJobAge=3600`, `scontrol show job`, `SlurmCluster.jobs()`), and every finished job is also a
line of `jobcomp.txt` (`jobcomp/filetxt`, `SlurmCluster.completed_jobs()`).

    python -m tests.workflow.slurm_cluster DIR     # start one by hand (Ctrl-C stops it)

`start()` raises `SlurmUnavailable` with a one-line reason when it cannot: not root, the packages
not installed, a daemon that exits or a node that does not come up (the line quotes its log).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "sacct", "scontrol", "srun")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")  # where clients look without SLURM_CONF
INSTALL_HINT = "apt-get install slurm-wlm munge (as root; `make test-slurm` does it)"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message is one line saying why."""


@dataclass
class SlurmCluster:
    root: Path
    node: str
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: what every SLURM client (and Snakemake's plugin) needs."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
        return res

    def node_state(self) -> str:
        res = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=20)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""

    def jobs(self) -> list[dict[str, str]]:
        """`scontrol show job`: one dict per job slurmctld knows (JobId, Comment, Partition, NumCPUs, TresPerJob, …)."""
        res = self.run("scontrol", "show", "job", "-o", timeout=20)
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in res.stdout.splitlines() if line.startswith("JobId=")]

    def completed_jobs(self) -> list[dict[str, str]]:
        """The job-completion log: one dict per finished job (JobId, JobName, JobState, Partition, …)."""
        path = self.root / "jobcomp.txt"
        if not path.exists():
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines() if line.strip()]

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.root / "log" / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """Cancel what is left, stop slurmd, slurmctld, munged (in that order), remove the /etc link; idempotent."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "-u", "root", check=False, timeout=20)
        if DEFAULT_CONF.is_symlink() and Path(os.readlink(DEFAULT_CONF)) == self.conf:
            DEFAULT_CONF.unlink()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_can_run() -> None:
    """Raises SlurmUnavailable (one line) unless this process is root and the SLURM commands are installed."""
    if sys.platform != "linux":
        raise SlurmUnavailable(f"a single-node SLURM needs Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"starting munged, slurmctld and slurmd needs root; running as uid {os.geteuid()}")
    missing = [c for c in COMMANDS if shutil.which(c, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        raise SlurmUnavailable(f"{', '.join(missing)} not found: {INSTALL_HINT}")


def _which(cmd: str) -> str:
    return shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or cmd


def write_config(root: Path, node: str, cpus: int = 16, mem_mb: int = 64000, gpus: int = 1) -> Path:
    """slurm.conf (and gres.conf) of a one-node cluster under root; returns slurm.conf's path."""
    for d in ("state", "spool", "log", "run", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ctld_port, d_port = _free_port(), _free_port()
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    conf = f"""\
ClusterName=needletest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SchedulerType=sched/backfill
{"GresTypes=gpu" if gpus else ""}
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb}{gres} State=UNKNOWN
PartitionName=cpu Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={node} MaxTime=INFINITE State=UP
"""
    (root / "slurm.conf").write_text(conf)
    (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File=/dev/null Count={gpus}\n" if gpus else "")
    (root / "cgroup.conf").write_text("")  # not used (no cgroup plugins); keeps slurmd from reading /etc's
    return root / "slurm.conf"


def _wait(cluster: SlurmCluster, what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                cluster.stop()
                raise SlurmUnavailable(f"{name} exited {proc.returncode} while waiting for {what}: {cluster.log_tail(name)}")
        if ready():
            return
        time.sleep(0.5)
    tails = "; ".join(f"{n}: {cluster.log_tail(n, 2)}" for n in ("slurmctld", "slurmd"))
    cluster.stop()
    raise SlurmUnavailable(f"no {what} after {timeout:.0f} s; {tails}")


def start(root: Path, cpus: int = 16, mem_mb: int = 64000, gpus: int = 1, timeout: float = 60) -> SlurmCluster:
    """Write the config under root, start munged, slurmctld, slurmd; return once the node is idle."""
    check_can_run()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    node = socket.gethostname().split(".")[0]
    conf = write_config(root, node, cpus=cpus, mem_mb=mem_mb, gpus=gpus)
    if DEFAULT_CONF.is_symlink() and not DEFAULT_CONF.exists():
        DEFAULT_CONF.unlink()  # left by a test cluster that was not stopped (its folder is gone)
    if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
        raise SlurmUnavailable(
            f"{DEFAULT_CONF} exists ({'a link to ' + os.readlink(DEFAULT_CONF) if DEFAULT_CONF.is_symlink() else 'a SLURM is configured'}): "
            "not replacing it with a test cluster's"
        )
    DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_CONF.symlink_to(conf)
    cluster = SlurmCluster(root=root, node=node, conf=conf)
    env = cluster.env

    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    os.chmod(root / "munge", 0o700)
    sock = root / "munge" / "munge.socket"
    logs = root / "log"

    def daemon(name: str, *cmd: str) -> None:
        out = open(logs / f"{name}.out", "wb")
        cluster.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    daemon(
        "munged",
        _which("munged"),
        "-F",
        "--force",
        f"--socket={sock}",
        f"--key-file={key}",
        f"--pid-file={root / 'run' / 'munged.pid'}",
        f"--log-file={logs / 'munged.log'}",
        f"--seed-file={root / 'munge' / 'munged.seed'}",
    )
    _wait(cluster, "munged's socket", sock.exists, timeout)
    daemon("slurmctld", _which("slurmctld"), "-D", "-i", "-f", str(conf))
    _wait(cluster, "slurmctld answering", lambda: cluster.run("scontrol", "ping", check=False, timeout=10).returncode == 0, timeout)
    daemon("slurmd", _which("slurmd"), "-D", "-f", str(conf), "-N", node)
    _wait(cluster, f"node {node} idle", lambda: cluster.node_state() == "idle", timeout)
    return cluster


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    c = start(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/needle-slurm"))
    print(f"SLURM up: export SLURM_CONF={c.conf}   (Ctrl-C stops it)", flush=True)
    try:
        while all(p.poll() is None for p in c.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
