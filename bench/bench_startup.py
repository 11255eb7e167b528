"""Time from `raytron train` starting to its first finished step with 2 workers (goal <= 20 s).

A child process runs the real command, ``raytron.cli.main(["train", CONFIG, --set ...])``, so the
clock starts when its process is created. Two ways to find the cluster, as users do:

  cold   RAY_ADDRESS=local: the command starts a new local cluster (GCS, raylet, dashboard, agents)
  warm   a cluster the bench started before with `ray start --head` (its own ports and temp dir),
         joined through RAY_ADDRESS as `ray job submit` and long-lived clusters are
  zero   a fake autoscaling cluster (tests/fake_cluster.py, Ray's fake_multinode provider) whose only
         worker node type offers the custom resource the run asks for (`resources.custom`), 0 nodes at
         rest: the run is timed first from zero nodes, then again on the same cluster with the node
         still up (static); the ratio zero / static is what scaling from zero costs (issue 15)

Both run after an untimed `raytron prepare` of the same config and with an existing MLflow sqlite
database: the prepared shards and the database are reused by every run after the first.

The timeline: driver marks from wrapping raytron.train.run's connect / training_data / fit in the
child; Ray Train's controller milestones from its system log; worker marks from
bench/worker_marks.py. A sampler adds up the CPU seconds (user + system) of every process involved
-- the child and its descendants, plus the warm cluster's processes (only what they used after the
child started). On N cores, start-up cannot beat (CPU seconds) / N, which is what these figures
show on 2 shared cores.

    .venv/bin/python bench/bench_startup.py                      # cold and warm, one run each
    .venv/bin/python bench/bench_startup.py --cluster cold --runs 2
    .venv/bin/python bench/bench_startup.py --cluster zero
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

from cpu_sampler import CpuSampler  # bench/, next to this file

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs/configs/tiny_smoke.yaml"
ZERO_RESOURCE = "zeronode"
"""The custom resource only the fake cluster's autoscaled node type offers (2 per node: one node hosts the run)."""


def overrides(args, storage: Path) -> list[str]:
    """The throughput bench's model (bench_train.py) with 2 workers and 2 steps."""
    layout = [f"parallel.{axis}={n}" for axis, n in (("dp", args.dp), ("pp", args.pp)) if n > 1]
    return [*layout, "model.vocab_size=4096", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
            "model.max_position_embeddings=128", "train.seq_len=128", "train.micro_batch_size=8",
            "train.grad_accum_steps=1", "train.steps=2", "train.warmup_steps=1", "train.threads=1",
            "parallel.zero_stage=1", f"train.storage_path={storage}", "name=bench-startup"]


def set_flags(values: list[str]) -> list[str]:
    return [flag for value in values for flag in ("--set", value)]


# ---------------------------------------------------------------- the child: the timed command


def child(args) -> None:
    """Runs `raytron train` in this process with marks around it; prints one JSON line."""
    process_start = psutil.Process().create_time()
    sampler = CpuSampler([os.getpid(), *([args.cluster_pid] if args.cluster_pid else [])], driver=os.getpid())
    sampler.start()
    from raytron import cli
    from raytron.train import run

    import worker_marks  # bench/, next to this file

    marks = {"process_start": process_start, "imported": time.time()}

    def marked(name: str, function):
        def wrapper(*a, **k):
            out = function(*a, **k)
            marks[name] = time.time()
            return out
        return wrapper

    run.connect = marked("connected", run.connect)
    run.training_data = marked("data", run.training_data)
    fit = run.fit

    def marked_fit(*a, **k):
        marks["fit_called"] = time.time()  # after the MLflow run opened
        return fit(*a, **k)
    run.fit = marked_fit
    workdir = Path(args.workdir)
    restore = worker_marks.install(workdir / "marks")
    try:
        status = cli.main(["train", str(CONFIG), *set_flags(overrides(args, Path(args.storage)) + args.extra_set)])
        marks["returned"] = time.time()
    finally:
        restore()
    workers = worker_marks.read(workdir / "marks")
    first_step = max(m["step_end"][0] for m in workers.values())
    sampler.running = False
    import ray

    print("STARTUP_JSON " + json.dumps({"status": status, "driver": marks, "workers": workers,
                                        "controller": controller_phases(ray),
                                        "cpu": sampler.cpu_by_kind(sampler.samples[0][0], first_step)}), flush=True)


def controller_phases(ray) -> list[tuple[str, float]]:
    """(message, epoch seconds) of Ray Train's controller milestones, from its system log."""
    node = ray._private.worker._global_node  # no public API for the session folder
    if node is None:
        return []
    wanted = ("Requesting resources", "Placement group ready", "worker actors created",
              "Train context initialized", "Train function launched")
    phases = []
    for log in sorted(Path(node.get_session_dir_path()).glob("logs/train/ray-train-sys-controller-*.log")):
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = record.get("message", "")
            if any(key in message for key in wanted):
                stamp = datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                phases.append((message.split("\n")[0].replace("[Worker Group Initialization] ", ""), stamp))
    return phases


# ---------------------------------------------------------------- the parent: set-up, runs, report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the warm cluster did not open port {port} in {timeout:.0f} s")


class WarmCluster:
    """`ray start --head --block` with its own ports and temp dir; stopping it stops only its processes."""

    def __init__(self, num_cpus: int):
        self.port, dashboard = free_port(), free_port()
        self.temp = tempfile.mkdtemp(prefix="rtb-", dir="/tmp")  # short: Ray's socket paths have a length limit
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={self.port}",
                   f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.temp}",
                   "--disable-usage-stats"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        wait_for_port(dashboard, 120)
        time.sleep(5)  # let its start-up work (agents, prestarted workers) finish before the clock runs

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()  # `ray start --block` stops the processes it started
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
        shutil.rmtree(self.temp, ignore_errors=True)


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def timed_run(args, mode: str, workdir: Path, env: dict, cluster_pid: int = 0, extra_set: tuple[str, ...] = (),
              node_starts=lambda: []) -> float:
    """One timed `raytron train`; prints its timeline and returns the seconds to its first finished step.
    ``node_starts()`` gives (label, epoch seconds) of the cluster's nodes, read after the run."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    command = [sys.executable, __file__, "--child", f"--workdir={run_dir}", f"--storage={workdir / 'runs'}",
               f"--pp={args.pp}", f"--dp={args.dp}", f"--cluster-pid={cluster_pid}",
               *[f"--extra-set={value}" for value in extra_set]]
    before = load()
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    line = next((line for line in out.stdout.splitlines() if line.startswith("STARTUP_JSON ")), None)
    if line is None or out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise SystemExit(f"the timed `raytron train` failed (exit {out.returncode})")
    result = json.loads(line[len("STARTUP_JSON "):])
    driver, workers = result["driver"], result["workers"].values()
    zero = driver["process_start"]

    def last_rank(key, index=None):
        return max((m[key] if index is None else m[key][index]) for m in workers) - zero

    phases = [
        ("driver: python, imports (raytron.cli, then the train path)", driver["imported"] - zero),
        (f"driver: connected ({'new local cluster' if mode == 'cold' else 'joined the running cluster'})",
         driver["connected"] - zero),
        ("driver: prepared data found (manifest read)", driver["data"] - zero),
        ("driver: MLflow run opened, fit() called", driver["fit_called"] - zero),
        # the controller logs and the node table also hold earlier runs on the same cluster: keep this run's
        *[(f"controller log: {message[:52]}", stamp - zero)
          for message, stamp in result["controller"] if stamp >= zero],
        *[(label, stamp - zero) for label, stamp in node_starts() if stamp >= zero],
        ("workers: last worker process created", last_rank("process_created")),
        ("workers: train function entered (last rank)", last_rank("entered")),
        ("workers: deepspeed + raytron imported (last rank)", last_rank("imported")),
        ("workers: DeepSpeed engine built (last rank)", last_rank("engine_built")),
        ("workers: first batch in hand (last rank)", last_rank("batch_ready", 0)),
        ("FIRST STEP FINISHED (last rank)", last_rank("step_end", 0)),
    ]
    print(f"  {mode}: parallel dp={args.dp} pp={args.pp}  [{before} -> {load()}]")
    previous = 0.0
    for label, value in sorted(phases, key=lambda phase: phase[1]):
        print(f"    {label:68s} t={value:6.2f} s  (+{value - previous:5.2f})")
        previous = value
    cpu = result["cpu"]
    cores = os.cpu_count() or 1
    print(f"    CPU seconds of all processes up to the first step: {sum(cpu.values()):.1f} "
          f"(on {cores} cores no schedule finishes sooner than {sum(cpu.values()) / cores:.1f} s)")
    for kind, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
        if seconds >= 0.05:
            print(f"      {kind:44s} {seconds:6.2f}")
    first = last_rank("step_end", 0)
    print(f"  RESULT start-up ({mode} cluster): first finished step {first:.2f} s after `raytron train` started "
          f"(goal <= 20 s: {'met' if first <= 20 else 'NOT met'})", flush=True)
    return first


def zero_and_static(args, workdir: Path, env: dict) -> None:
    """The same run from zero worker nodes, then on the same cluster with its node up (issue 15's bench)."""
    sys.path.insert(0, str(REPO))
    from tests.fake_cluster import fake_autoscaling_cluster

    node_type = {"fake.zero": {"resources": {"CPU": 2, ZERO_RESOURCE: 2}, "max_workers": 1}}
    # a long idle timeout keeps the node for the static run; the dashboard serves the state API (node start times)
    with fake_autoscaling_cluster(node_type, head_cpus=2, idle_timeout_minutes=30, dashboard=True) as cluster:
        def node_starts() -> list[tuple[str, float]]:
            done = cluster.driver("import json, ray; from ray.util.state import list_nodes; ray.init(); "
                                  "print(json.dumps([(n.is_head_node, n.start_time_ms) for n in list_nodes(detail=True)]))")
            nodes = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
            return [("autoscaler: the worker node's raylet started", start_ms / 1000)
                    for is_head, start_ms in nodes if not is_head]

        run_env = {**env, **cluster.env}
        extra = (f"resources.custom={{{ZERO_RESOURCE}: 1}}",)
        seconds = {mode: timed_run(args, mode, workdir, run_env, cluster.head_pid, extra, node_starts)
                   for mode in ("zero", "static")}
    print(f"  RESULT scale from zero: first step {seconds['zero']:.2f} s from zero nodes / {seconds['static']:.2f} s "
          f"with the node up = {seconds['zero'] / seconds['static']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", choices=["cold", "warm", "both", "zero"], default="both",
                        help="both = cold and warm; zero = from zero autoscaled nodes vs the same nodes up")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per cluster mode")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--cluster-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--extra-set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="raytron-bench-startup-"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    try:
        print(f"untimed set-up: raytron prepare (reused by the timed runs), MLflow database; {load()}", flush=True)
        prepare = [str(Path(sys.executable).parent / "raytron"), "prepare", str(CONFIG),
                   *set_flags(overrides(args, workdir / "runs"))]
        subprocess.run(prepare, check=True, cwd=REPO, env={**env, "RAY_ADDRESS": "local"}, capture_output=True)
        subprocess.run([sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                        env["MLFLOW_TRACKING_URI"]], check=True, env=env, capture_output=True)
        if args.cluster == "zero":
            zero_and_static(args, workdir, env)
            return
        for mode in (["cold", "warm"] if args.cluster == "both" else [args.cluster]):
            cluster = WarmCluster(num_cpus=4) if mode == "warm" else None
            try:
                for _ in range(args.runs):
                    # a `ray start` cluster wants its token (~/.ray/auth_token) from clients
                    joined = {"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"} if cluster else {}
                    timed_run(args, mode, workdir, {**env, "RAY_ADDRESS": "local", **joined},
                              cluster.process.pid if cluster else 0)
            finally:
                if cluster is not None:
                    cluster.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
