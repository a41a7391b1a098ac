"""The GPU check: GPU tests, a LLaMA-2-7B training-step sweep and the longest context that fits, in one budget.

    python3 benchmarks/gpu_check.py [--budget-s 480] [--work-dir DIR]  # on the GPU machine (`make gpu-check`)
    .venv/bin/python benchmarks/gpu_check.py --dry-run                 # anywhere: check the plan, run nothing

A GPU is lent to this project rarely and briefly, so the check is prepared here and runs there as one command.
Its steps, in order:

  setup        when deepspeed is not importable and .whl/ holds wheels (made by ../shared/tools/gpu-wheels.sh), install
               them into /tmp/site with pip (no index, no dependencies); /tmp/site and the repository go first on
               sys.path and PYTHONPATH, so the children import the project from the tree, uninstalled.
  environment  device, driver, library versions and git commit (benchmarks/_env.py), in a child process.
  tests        `pytest -m gpu` on GPU_TESTS; the outcome of each test from pytest's JUnit XML, or from its -v lines
               when the budget stopped it (the tests it did not reach are listed as "not run").
  speed        benchmarks/train_step.py --sweep: LLaMA-2-7B shape, llama2-7b-32k preset, LoRA + embed/norm, S²-Attn,
               S²-Attn with the reach preset's variants (4 sinks, 2 dense heads) and dense SDPA at 32k and 8k tokens
               (32k first: the targets are there).
  longest      benchmarks/train_step.py --sweep with the llama2-7b-100k preset (tiled MLP and loss): one step at 128k,
               then the doubling / bisection search for the longest N (steps of 16k, up to 256k), GPU memory capped
               at an H100 80GB's on a larger GPU.

Budget: the whole check ends within --budget-s (default 480 s, which leaves a 10-minute device command room for the
wheels and a margin). Each step after setup has a share of it (SHARES) and a deadline at the running sum of the
shares, so the time one step leaves unused goes to the next. A step stopped at its deadline says so; a step that
can no longer start is skipped and says so; within the sweeps a configuration that no longer fits is skipped
(train_step.py's --budget-s). Everything measured is written, after every step, to
benchmarks/results/gpu_check_<device>.json and copied into --work-dir, beside the log and the sweeps' JSON and PNG:
device, driver, versions, commit, the per-test outcomes, the sweep rows, and the TARGETS with met / not met (null
where nothing was measured).

--dry-run, on a machine without a GPU (what tests/test_gpu_check.py runs in `make test`): the setup says what it
would install, the environment is read, the pytest selection is collected (and must hold a training test for every
GPU preset), the sweeps' configurations are built and validated by train_step.py --dry-run with the exact arguments
of the real run, and the plan is written to a temporary JSON with "dry_run": true and no figure in it.

Exit status: 0 when every step ran (or, in a dry run, the plan holds) and no test failed or errored; 1 otherwise.
Targets not met do not change it: they are findings, not breakage.

Only the standard library is imported here, so that the check can start before the wheels are installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TRAIN_STEP = REPO / "benchmarks" / "train_step.py"
WHEELS = REPO / ".whl"
SITE = Path("/tmp/site")
WHEELS_SCRIPT = "../shared/tools/gpu-wheels.sh"

# Only these files: collecting the whole suite imports modules that need packages the GPU machine lacks.
GPU_TESTS = ("tests/test_attention_gpu.py", "tests/test_gpu_train.py", "tests/test_gpu_eval.py")
TRAIN_TEST = "tests/test_gpu_train.py"
GPU_PRESETS = sorted(p.stem for p in (REPO / "launch" / "presets").glob("llama2-*.yaml"))

SHAPE = "llama2-7b"
SPEED_PRESET = "launch/presets/llama2-7b-32k.yaml"
SPEED_LENGTHS = (32768, 8192)
# plain S²-Attn, S²-Attn with the reach preset's variants (train_step.py's s2attn-reach) and dense SDPA
SPEED_ATTENTIONS = ("s2attn", "s2attn-reach", "sdpa")
# llama2-7b-32k-reach.yaml trains its last 25% of steps densely
REACH_DENSE_PHASE = 0.25
LONGEST_PRESET = "launch/presets/llama2-7b-100k.yaml"
LONGEST_FIRST, LONGEST_LIMIT, LONGEST_GRANULARITY = 131072, 262144, 16384
# What nvidia-smi reports for an H100 80GB HBM3 (81559 MiB): the cap on a larger GPU for the longest-context target.
H100_80GB_GIB = 79.6

# Fractions of the budget; a step's deadline is the running sum (unused time rolls over to the next step).
SHARES = {"tests": 0.40, "speed": 0.35, "longest": 0.25}
SWEEP_REPORT_S = 25  # what train_step.py needs after its last configuration: environment, JSON, plot
GRACE_S = 30  # a child past its deadline by this much is killed

TARGETS = (
    {
        "name": "s2attn_speedup_32k",
        "description": "S²-Attn training step at least 1.5x faster than dense SDPA at 32k tokens (LLaMA-2-7B shape, "
        "LoRA + embed/norm, llama2-7b-32k preset): dense step_s / S²-Attn step_s",
        "threshold": 1.5,
    },
    {
        "name": "mfu_32k",
        "description": "at least 45% MFU at 32k tokens (S²-Attn, same setup; FLOPs as benchmarks/train_step.py counts "
        "them, peak 989 TFLOP/s on H100/H200)",
        "threshold": 0.45,
    },
    {
        "name": "reach_step_32k",
        "description": "llama2-7b-32k-reach's mean training step at most 1.2x plain S²-Attn's at 32k tokens (same "
        "setup; its steps: 75% with 4 sinks and 2 of 32 heads dense, the last 25% dense): (0.75 s2attn-reach step_s "
        "+ 0.25 dense step_s) / S²-Attn step_s",
        "threshold": 1.2,
        "at_most": True,
    },
    {
        "name": "longest_7b_context_one_h100",
        "description": "longest LLaMA-2-7B context whose training step fits on one H100 80GB at least 128k tokens "
        "(llama2-7b-100k preset: S²-Attn, LoRA + embed/norm, tiled MLP and loss, ZeRO-3)",
        "threshold": 131072,
    },
)
TARGETS_SOURCE = "the project's GPU-check issue (README's benchmarks section states no GPU figure yet)"

ENVIRONMENT_SNIPPET = """
import json, sys
sys.path.insert(0, "benchmarks")
from _env import environment
import torch
env = environment()
env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
print("GPU_CHECK_ENVIRONMENT " + json.dumps(env))
"""


# ----------------------------------------------------------------------------------------------------------------
# Setup: make deepspeed importable here and in every child
# ----------------------------------------------------------------------------------------------------------------


def pip_install_command(wheels: list[Path], site: Path = SITE) -> list[str]:
    """The install that ../shared/tools/gpu-wheels.sh documents: no index, no dependencies, into `site`."""
    return [
        *(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"),
        *("--upgrade", "--target", str(site), *map(str, wheels)),
    ]


def put_first_on_path(path: Path) -> None:
    """`path` first on this process's sys.path and on PYTHONPATH, which every child inherits."""
    sys.path.insert(0, str(path))
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(path)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(path), *rest])


def prepare_imports(dry_run: bool, wheels_dir: Path = WHEELS, site: Path = SITE) -> str:
    """Ends with deepspeed importable (PYTHONPATH = site:repository:...) or a one-line error; returns what it did."""
    put_first_on_path(REPO)
    if importlib.util.find_spec("deepspeed") is None and site.is_dir():  # installed by an earlier run
        put_first_on_path(site)
        importlib.invalidate_caches()
    if importlib.util.find_spec("deepspeed") is not None:
        return f"deepspeed importable from {Path(importlib.util.find_spec('deepspeed').origin).parent.parent}"
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(
            f"gpu_check: deepspeed is not importable and {wheels_dir} holds no wheels: run {WHEELS_SCRIPT} "
            "[--with-bnb] in the repository here, then carry .whl to the GPU machine"
        )
    command = pip_install_command(wheels, site)
    if dry_run:
        return f"would install {len(wheels)} wheels: {shlex.join(command)}"
    subprocess.run(command, check=True)
    put_first_on_path(site)
    importlib.invalidate_caches()
    if importlib.util.find_spec("deepspeed") is None:
        raise SystemExit(f"gpu_check: installed {len(wheels)} wheels into {site}, but deepspeed is still missing")
    return f"installed {len(wheels)} wheels from {wheels_dir} into {site}"


# ----------------------------------------------------------------------------------------------------------------
# Children: run one command with a deadline, its output streamed to the terminal and to the log
# ----------------------------------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.file.write(text)
            self.file.flush()

    def header(self, text: str) -> None:
        self.write(f"\n=== gpu_check {datetime.datetime.now():%H:%M:%S}: {text}\n")


def run_child(command: list[str], timeout_s: float, log: Log) -> dict:
    """Run `command` in the repository in its own process group; kill the group after timeout_s.

    Returns {"returncode" (None when killed), "timed_out", "elapsed_s", "output"}."""
    log.write(f"$ {shlex.join(command)}\n")
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            lines.append(line)
            log.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: pytest's training children too
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    reader.join(timeout=10)
    elapsed = time.monotonic() - start
    if timed_out:
        log.write(f"[gpu_check] stopped after {elapsed:.0f} s: the step's deadline passed\n")
    return {
        "returncode": None if timed_out else process.returncode,
        "timed_out": timed_out,
        "elapsed_s": round(elapsed, 1),
        "output": "".join(lines),
    }


# ----------------------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------------------


def read_environment(log: Log) -> dict:
    result = run_child([sys.executable, "-c", ENVIRONMENT_SNIPPET], 300, log)
    marked = [line for line in result["output"].splitlines() if line.startswith("GPU_CHECK_ENVIRONMENT ")]
    if result["returncode"] != 0 or not marked:
        tail = result["output"].strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"gpu_check: reading the environment failed: {tail[0]}")
    return json.loads(marked[-1].removeprefix("GPU_CHECK_ENVIRONMENT "))


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


def pytest_command(junit_xml: Path | None) -> list[str]:
    """`pytest -m gpu` on GPU_TESTS; with junit_xml None, the collection alone."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    if junit_xml is None:
        return [*command, "--collect-only", "-q"]
    return [*command, "-v", "-rA", f"--junitxml={junit_xml}"]


def collected_tests(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if "::" in line and not line.startswith(" ")]


def collection_problems(result: dict, node_ids: list[str]) -> list[str]:
    """What is wrong with the GPU test selection: it must collect, every file must hold tests, and the training
    tests must cover every GPU preset."""
    if result["returncode"] != 0:
        tail = result["output"].strip().splitlines()[-3:]
        return [f"pytest could not collect the GPU tests (exit {result['returncode']}): {' | '.join(tail)}"]
    empty = [path for path in GPU_TESTS if not any(n.startswith(path) for n in node_ids)]
    problems = [f"{path} holds no test marked gpu" for path in empty]
    train_ids = [n for n in node_ids if n.startswith(TRAIN_TEST)]
    problems += [
        f"{TRAIN_TEST} has no test for the preset {preset}"
        for preset in GPU_PRESETS
        if not any(f"[{preset}]" in n for n in train_ids)
    ]
    return problems


def junit_outcomes(path: Path) -> dict[str, dict]:
    """{node id: {"outcome", "duration_s", "message"}} from pytest's JUnit XML."""
    outcomes = {}
    for case in ElementTree.parse(path).iter("testcase"):
        node_id = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, (element.get("message") or "").strip()[:1000]
                break
        outcomes[node_id] = {"outcome": outcome, "duration_s": float(case.get("time", 0)), "message": message}
    return outcomes


def verbose_outcomes(output: str) -> dict[str, dict]:
    """The same from pytest's -v lines, for a run stopped before it wrote its XML."""
    pattern = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
    matches = filter(None, map(pattern.match, output.splitlines()))
    return {m[1]: {"outcome": m[2].lower(), "duration_s": None, "message": None} for m in matches}


def run_tests(deadline: float, log: Log, report: dict) -> None:
    step = report["steps"]["tests"]
    collection = run_child(pytest_command(None), deadline - time.monotonic(), log)
    node_ids = collected_tests(collection["output"])
    problems = collection_problems(collection, node_ids)
    if problems:
        step.update(status="failed", problems=problems)
        return
    left = deadline - time.monotonic()
    if left < 30:
        step.update(status="skipped", note=f"not started: {left:.0f} s of its share of the budget left")
        report["tests"] = {n: {"outcome": "not run", "message": "budget"} for n in node_ids}
        return
    with tempfile.TemporaryDirectory() as tmp:
        junit_xml = Path(tmp) / "pytest.xml"
        result = run_child(pytest_command(junit_xml), left, log)
        outcomes = junit_outcomes(junit_xml) if junit_xml.is_file() else verbose_outcomes(result["output"])
    not_reached = "the tests' share of the budget ran out first" if result["timed_out"] else "pytest did not reach it"
    report["tests"] = {n: outcomes.get(n, {"outcome": "not run", "message": not_reached}) for n in node_ids}
    report["tests"].update({n: o for n, o in outcomes.items() if n not in report["tests"]})
    counts: dict[str, int] = {}
    for outcome in report["tests"].values():
        counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
    status = "timeout" if result["timed_out"] else "done" if result["returncode"] in (0, 1) else "failed"
    step.update(status=status, returncode=result["returncode"], elapsed_s=result["elapsed_s"], counts=counts)


def train_step_command(step: str, out: Path, budget_s: float, memory_limit_gib: float | None, dry_run: bool):
    """benchmarks/train_step.py's arguments for the speed or the longest-context sweep."""
    command = [sys.executable, str(TRAIN_STEP), "--sweep", "--shape", SHAPE, "--trainings", "lora"]
    if step == "speed":
        command += ["--preset", SPEED_PRESET, "--lengths", *map(str, SPEED_LENGTHS), "--bisect-limit", "0"]
        command += ["--attentions", *SPEED_ATTENTIONS]
        command += ["--warmup", "1", "--steps", "2"]
    else:  # one cold step per probe: whether it fits, not how fast
        command += ["--preset", LONGEST_PRESET, "--lengths", str(LONGEST_FIRST), "--attentions", "s2attn"]
        command += ["--warmup", "0", "--steps", "1", "--bisect-limit", str(LONGEST_LIMIT)]
        command += ["--granularity", str(LONGEST_GRANULARITY)]
        if memory_limit_gib:
            command += ["--memory-limit-gib", str(memory_limit_gib)]
    command += ["--budget-s", f"{budget_s:.0f}", "--out", str(out)]
    return [*command, "--dry-run"] if dry_run else command


def run_sweep(name: str, deadline: float, total_deadline: float, work_dir: Path, log: Log, report: dict) -> None:
    step = report["steps"][name]
    budget_s = deadline - time.monotonic() - SWEEP_REPORT_S
    if budget_s < 60:
        step.update(status="skipped", note=f"not started: {budget_s + SWEEP_REPORT_S:.0f} s of the budget left")
        return
    out = work_dir / f"{name}.json"
    command = train_step_command(name, out, budget_s, report["memory_limit_gib"] if name == "longest" else None, False)
    step["command"] = shlex.join(command)
    result = run_child(command, min(deadline, total_deadline) - time.monotonic() + GRACE_S, log)
    step.update(returncode=result["returncode"], elapsed_s=result["elapsed_s"])
    if result["returncode"] != 0 or not out.is_file():
        step.update(status="timeout" if result["timed_out"] else "failed")
        return
    sweep = json.loads(out.read_text())
    keep = ("preset", "deepspeed_config", "shape_config", "warmup_steps", "timed_steps", "peak_tflops", "rows")
    report["sweeps"][name] = {key: sweep.get(key) for key in (*keep, "bisection")}
    bisection = sweep["bisection"] or {}
    statuses = [row["status"] for row in sweep["rows"]] + [probe["status"] for probe in bisection.get("probes", [])]
    cut = any(s in ("skipped", "timeout") for s in statuses) or bisection.get("cut_by_budget")
    step.update(status="done", note="the budget cut part of it (see the rows' status)" if cut else None)


def plan_sweep(name: str, work_dir: Path, log: Log, report: dict, budget_s: float) -> list[str]:
    """--dry-run: train_step.py --dry-run with the real run's arguments; returns the problems it found."""
    out = work_dir / f"{name}_plan.json"
    command = train_step_command(name, out, budget_s, H100_80GB_GIB if name == "longest" else None, True)
    report["steps"][name]["command"] = shlex.join(command[:-1])
    result = run_child(command, 300, log)
    if not out.is_file():
        return [f"train_step.py --dry-run wrote no plan for the {name} sweep (exit {result['returncode']})"]
    plan = json.loads(out.read_text())
    report["sweeps"][name] = {"plan": plan}
    probes = " + bisection" if plan["bisection"] else ""
    report["steps"][name]["note"] = f"{len(plan['configurations'])} configurations{probes} validated"
    return [f"{name} sweep: {problem}" for problem in plan["problems"]]


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------


def evaluate_targets(sweeps: dict, environment: dict, memory_limit_gib: float | None) -> list[dict]:
    """Each target with its measured value and met (None: not measured), with a note saying why where needed."""
    speed_rows = {(r["seq_len"], r["attention"]): r for r in sweeps.get("speed", {}).get("rows") or []}
    s2attn, dense = speed_rows.get((32768, "s2attn")), speed_rows.get((32768, "sdpa"))
    measured, notes = {}, {}
    if ok(s2attn) and ok(dense):
        measured["s2attn_speedup_32k"] = dense["step_s"] / s2attn["step_s"]
    else:
        notes["s2attn_speedup_32k"] = f"32k rows: S²-Attn {status_of(s2attn)}, dense {status_of(dense)}"
    reach = speed_rows.get((32768, "s2attn-reach"))
    if ok(s2attn) and ok(reach) and ok(dense):
        mean_step = (1 - REACH_DENSE_PHASE) * reach["step_s"] + REACH_DENSE_PHASE * dense["step_s"]
        measured["reach_step_32k"] = mean_step / s2attn["step_s"]
    else:
        notes["reach_step_32k"] = (
            f"32k rows: S²-Attn {status_of(s2attn)}, with the variants {status_of(reach)}, dense {status_of(dense)}"
        )
    if ok(s2attn) and s2attn.get("mfu") is not None:
        measured["mfu_32k"] = s2attn["mfu"]
    else:
        notes["mfu_32k"] = f"32k S²-Attn row: {status_of(s2attn)}" + ("" if not ok(s2attn) else ", no peak FLOP/s")
    longest_key = "longest_7b_context_one_h100"
    bisection = sweeps.get("longest", {}).get("bisection")
    undecided = False  # a lower bound below the threshold decides nothing
    if bisection:
        measured[longest_key] = bisection["longest_fitting_seq_len"]
        tried = sweeps["longest"].get("rows", []) + bisection["probes"]
        crashed = [f"N={r['seq_len']}: {r.get('error')}" for r in tried if r["status"] == "failed"]
        longest_notes = [f"failed other than out of memory, so a lower bound: {'; '.join(crashed)}"] if crashed else []
        if bisection["cut_by_budget"]:
            longest_notes.append(f"search cut by the budget ({bisection['cut_reason']}): a lower bound")
        if bisection["reached_limit"]:
            longest_notes.append(f"the search's limit {bisection['limit']} fitted: longer may fit too")
        if memory_limit_gib:
            device = environment.get("device_name")
            longest_notes.append(f"GPU memory capped at {memory_limit_gib} GiB (an H100 80GB's) on {device}")
        notes[longest_key] = "; ".join(longest_notes) or None
        threshold = next(t["threshold"] for t in TARGETS if t["name"] == longest_key)
        # Fitting is monotone in N: out of memory at or below the threshold decides "not met" on its own.
        oom_below = any(r["status"] == "oom" and r["seq_len"] <= threshold for r in tried)
        undecided = (bool(crashed) or bisection["cut_by_budget"]) and not oom_below
    else:
        notes[longest_key] = "the longest-context search did not run"
    results = []
    for target in TARGETS:
        value = measured.get(target["name"])
        if value is None:
            met = None
        else:
            met = value <= target["threshold"] if target.get("at_most") else value >= target["threshold"]
        if met is False and target["name"] == longest_key and undecided:
            met = None
        results.append(target | {"measured": value, "met": met, "note": notes.get(target["name"])})
    return results


def ok(row: dict | None) -> bool:
    return bool(row) and row["status"] == "ok" and row.get("step_s") is not None


def status_of(row: dict | None) -> str:
    return "not measured" if not row else row["status"] + (f" ({row['error']})" if row.get("error") else "")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def new_report(args, setup_note: str) -> dict:
    return {
        "check": "benchmarks/gpu_check.py",
        "dry_run": args.dry_run,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s,
        "setup": setup_note,
        "environment": None,
        "memory_limit_gib": None,
        "steps": {
            name: {"share_of_budget": share, "status": "planned" if args.dry_run else "not started"}
            for name, share in SHARES.items()
        },
        "tests": None,
        "sweeps": {},
        "targets_source": TARGETS_SOURCE,
        "targets": None,
    }


def dry_run(args, report: dict, log: Log) -> list[str]:
    """Everything but running on a GPU; returns the problems of the plan."""
    report["steps"]["tests"]["command"] = shlex.join(pytest_command(Path("<tmp>/pytest.xml")))
    collection = run_child(pytest_command(None), 300, log)
    node_ids = collected_tests(collection["output"])
    problems = collection_problems(collection, node_ids)
    report["steps"]["tests"].update(collected=node_ids, note=f"{len(node_ids)} tests collected")
    for name in ("speed", "longest"):
        problems += plan_sweep(name, args.work_dir, log, report, SHARES[name] * args.budget_s)
    report["targets"] = [target | {"measured": None, "met": None} for target in TARGETS]
    report["problems"] = problems
    return problems


def real_run(args, report: dict, log: Log, out: Path, start: float) -> bool:
    """The steps on the GPU; returns whether all of them ran and no test failed."""
    environment = report["environment"]
    if environment["device"] != "cuda":
        raise SystemExit("gpu_check: torch sees no CUDA device here: on a machine without a GPU run with --dry-run")
    if (environment.get("gpu_memory_gib") or 0) > 1.05 * H100_80GB_GIB:
        report["memory_limit_gib"] = H100_80GB_GIB
    deadline, total_deadline = start, start + args.budget_s
    for name, share in SHARES.items():
        deadline += share * args.budget_s
        if name in args.skip:
            report["steps"][name].update(status="skipped", note="--skip")
            continue
        log.header(f"{name} (until {deadline - start:.0f} s of the budget)")
        if name == "tests":
            run_tests(deadline, log, report)
        else:
            run_sweep(name, deadline, total_deadline, args.work_dir, log, report)
        report["targets"] = evaluate_targets(report["sweeps"], environment, report["memory_limit_gib"])
        write_json(report, out)
    failed_tests = [n for n, o in (report["tests"] or {}).items() if o["outcome"] in ("failed", "error")]
    broken = [name for name, step in report["steps"].items() if step["status"] in ("failed", "timeout")]
    report["failed_tests"], report["broken_steps"] = failed_tests, broken
    return not failed_tests and not broken


def summary(report: dict) -> str:
    lines = ["", "gpu_check summary" + (" (dry run: nothing measured)" if report["dry_run"] else "")]
    for name, step in report["steps"].items():
        extra = step.get("counts") or step.get("note") or ""
        lines.append(f"  {name:8} {step['status']:11} {extra}")
    for target in report["targets"] or []:
        undecided = "not measured" if target["measured"] is None else "undecided"
        met = {True: "met", False: "NOT met", None: undecided}[target["met"]]
        value = "" if target["measured"] is None else f", measured {target['measured']:.4g}"
        lines.append(f"  target {target['name']}: {met}{value} (threshold {target['threshold']})")
    for problem in report.get("problems") or []:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check ends within this (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="check the plan on a machine without a GPU")
    parser.add_argument("--work-dir", type=Path, help="log, sweep JSON/PNG, a copy of the result (default: tmp)")
    parser.add_argument("--out", type=Path, help="result JSON (default results/gpu_check_<device>.json; dry run: tmp)")
    parser.add_argument("--skip", nargs="+", choices=sorted(SHARES), default=[], help="leave these steps out")
    args = parser.parse_args(argv)
    start = time.monotonic()
    args.work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check_"))).resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log = Log(args.work_dir / "gpu_check.log")
    log.header(("dry run" if args.dry_run else "run") + f", budget {args.budget_s:.0f} s, work dir {args.work_dir}")
    report = new_report(args, prepare_imports(args.dry_run))
    log.write(f"setup: {report['setup']}\n")
    report["environment"] = read_environment(log)
    if args.dry_run:
        out = args.out or args.work_dir / "gpu_check_dry_run.json"
        good = not dry_run(args, report, log)
    else:
        out = args.out or RESULTS / f"gpu_check_{device_slug(report['environment']['device_name'])}.json"
        good = real_run(args, report, log, out, start)
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    report["ok"] = good
    write_json(report, out)
    if out.parent != args.work_dir:
        write_json(report, args.work_dir / out.name)
    log.write(summary(report) + f"\nwrote {out}\n")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
