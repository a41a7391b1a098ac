"""benchmarks/gpu_check.py without a GPU: its dry run checks the plan and writes it with no figure; a broken plan
fails it; its setup, outcome parsing and target comparison on given inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
GPU_PRESETS = sorted(p.stem for p in (REPO / "launch" / "presets").glob("llama2-*.yaml"))
PRESET_TEST = "tests/test_gpu_train.py::test_preset_trains_in_bf16_on_nccl_and_writes_checkpoint_and_final_model"
ATTENTION_TEST = "tests/test_attention_gpu.py::test_backend_forward_and_backward_match_reference_with_packed_documents"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, str(SCRIPT), "--dry-run", "--work-dir", str(work_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return json.loads((work_dir / "gpu_check_dry_run.json").read_text()), work_dir


def test_dry_run_collects_the_gpu_tests_for_every_preset(dry_run):
    report, work_dir = dry_run
    assert report["dry_run"] is True and report["ok"] is True and report["problems"] == []
    assert report["environment"]["device"] == "cpu" and report["environment"]["versions"]["deepspeed"]
    assert report["setup"].startswith("deepspeed importable")
    collected = report["steps"]["tests"]["collected"]
    assert {f"{PRESET_TEST}[{preset}]" for preset in GPU_PRESETS} <= set(collected)
    assert any(n.startswith("tests/test_gpu_train.py::test_4bit_base_trains_one_step") for n in collected)
    assert any(n.startswith("tests/test_gpu_eval.py::test_perplexity_over_one_32k_window") for n in collected)
    assert {f"{ATTENTION_TEST}[sdpa]", f"{ATTENTION_TEST}[flash]"} <= set(collected)
    assert not any("test_scaled_preset_configs_validate" in n for n in collected)  # not marked gpu: runs here
    assert "gpu_check summary (dry run: nothing measured)" in (work_dir / "gpu_check.log").read_text()


def test_dry_run_plans_the_sweeps_with_the_real_runs_arguments(dry_run):
    report, _ = dry_run
    speed, longest = report["sweeps"]["speed"]["plan"], report["sweeps"]["longest"]["plan"]
    planned = [(c["seq_len"], c["attention"], c["training"], c["group_size"]) for c in speed["configurations"]]
    assert planned == [
        (32768, "s2attn", "lora", 8192),
        (32768, "s2attn-reach", "lora", 8192),
        (32768, "sdpa", "lora", None),
        (8192, "s2attn", "lora", 2048),
        (8192, "s2attn-reach", "lora", 2048),
        (8192, "sdpa", "lora", None),
    ]
    assert {(c["shape"], Path(c["preset"]).name) for c in speed["configurations"]} == {
        ("llama2-7b", "llama2-7b-32k.yaml")
    }
    (first,) = longest["configurations"]
    assert (first["seq_len"], first["attention"], first["training"]) == (131072, "s2attn", "lora")
    assert Path(first["preset"]).name == "llama2-7b-100k.yaml"
    assert first["memory_limit_gib"] == 79.6 and longest["bisection"]["limit"] == 262144
    for name in ("speed", "longest"):
        command = report["steps"][name]["command"]
        assert "benchmarks/train_step.py --sweep --shape llama2-7b" in command and "--budget-s" in command
        assert "--dry-run" not in command
    assert sum(step["share_of_budget"] for step in report["steps"].values()) == pytest.approx(1.0)


def test_dry_run_writes_no_figure(dry_run):
    report, _ = dry_run
    assert report["tests"] is None
    assert [(t["name"], t["threshold"]) for t in report["targets"]] == [
        ("s2attn_speedup_32k", 1.5),
        ("mfu_32k", 0.45),
        ("reach_step_32k", 1.2),
        ("longest_7b_context_one_h100", 131072),
    ]
    assert all(t["measured"] is None and t["met"] is None for t in report["targets"])
    text = json.dumps(report["sweeps"])
    assert all(key not in text for key in ('"rows"', '"step_s"', '"mfu"', '"longest_fitting_seq_len"'))


def test_a_broken_plan_fails_the_dry_run_and_names_each_problem(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(gpu_check, "read_environment", lambda log: {"device": "cpu"})
    monkeypatch.setattr(gpu_check, "SPEED_LENGTHS", (8190,))  # G = 2046 does not divide it
    monkeypatch.setattr(gpu_check, "GPU_PRESETS", [*GPU_PRESETS, "llama2-7b-1m"])  # a preset without a test
    assert gpu_check.main(["--dry-run", "--work-dir", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["ok"] is False
    assert report["problems"] == [
        "tests/test_gpu_train.py has no test for the preset llama2-7b-1m",
        *(
            f"speed sweep: N=8190 {attention} lora: train.seq_len=8190 is not a multiple of the S²-Attn group size "
            "2046: pick attention.group_size (or group_size_ratio) so that it divides the sequence length"
            for attention in ("s2attn", "s2attn-reach")
        ),
    ]
    assert "problem: speed sweep: N=8190" in capsys.readouterr().out


def test_missing_deepspeed_without_wheels_is_a_one_line_error_naming_the_script(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit) as error:
        gpu_check.prepare_imports(False, wheels_dir=tmp_path / "no-wheels", site=tmp_path / "site")
    message = str(error.value)
    assert "\n" not in message and "deepspeed is not importable" in message
    assert "../shared/tools/gpu-wheels.sh" in message

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl"):
        (wheels / name).touch()
    site = tmp_path / "site"
    site.mkdir()
    note = gpu_check.prepare_imports(True, wheels_dir=wheels, site=site)  # dry run: says what it would install
    assert note.startswith("would install 2 wheels: ")
    assert (
        f"-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site} "
        f"{wheels}/deepspeed-0.19.8-py3-none-any.whl {wheels}/hjson-3.1.0-py3-none-any.whl" in note
    )
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(site), str(REPO), "/elsewhere"]
    assert sys.path[:2] == [str(site), str(REPO)]


def test_outcomes_from_junit_xml_and_from_verbose_lines(gpu_check, tmp_path):
    xml = tmp_path / "pytest.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu_eval" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_gpu_train" name="test_b[x]" time="2">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_gpu_train" name="test_c" time="0"><skipped message="no bnb"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_outcomes(xml) == {
        "tests/test_gpu_eval.py::test_a": {"outcome": "passed", "duration_s": 1.5, "message": None},
        "tests/test_gpu_train.py::test_b[x]": {"outcome": "failed", "duration_s": 2.0, "message": "assert 1 == 2"},
        "tests/test_gpu_train.py::test_c": {"outcome": "skipped", "duration_s": 0.0, "message": "no bnb"},
    }
    lines = "tests/test_gpu_eval.py::test_a PASSED   [ 50%]\ntests/test_gpu_train.py::test_b[x] FAILED  [100%]\n"
    outcomes = gpu_check.verbose_outcomes(lines)
    assert {n: o["outcome"] for n, o in outcomes.items()} == {
        "tests/test_gpu_eval.py::test_a": "passed",
        "tests/test_gpu_train.py::test_b[x]": "failed",
    }


def row(seq_len, attention, status="ok", step_s=None, mfu=None):
    return dict(seq_len=seq_len, attention=attention, training="lora", status=status, step_s=step_s, mfu=mfu)


def bisection(longest, cut=False, probes=()):
    return {
        "longest_fitting_seq_len": longest,
        "cut_by_budget": cut,
        "cut_reason": "120 s left" if cut else None,
        "reached_limit": False,
        "limit": 262144,
        "probes": list(probes),
    }


def test_targets_are_met_not_met_or_not_measured(gpu_check):
    # Given rows (the comparison's logic, not measurements): 2.0x and 50% MFU at 32k, the reach preset's mean step
    # (0.75 * 5.2 + 0.25 * 10) / 5 = 1.28x plain's, 147456 tokens fit.
    sweeps = {
        "speed": {"rows": [row(32768, "s2attn", step_s=5.0, mfu=0.5), row(32768, "sdpa", step_s=10.0),
                           row(32768, "s2attn-reach", step_s=5.2)]},
        "longest": {"bisection": bisection(147456)},
    }  # fmt: skip
    targets = {t["name"]: t for t in gpu_check.evaluate_targets(sweeps, {"device_name": "NVIDIA H100"}, None)}
    assert [(t["measured"], t["met"]) for t in targets.values()] == [
        (2.0, True), (0.5, True), (pytest.approx(1.28), False), (147456, True)
    ]  # fmt: skip

    sweeps = {
        "speed": {"rows": [row(32768, "s2attn", step_s=5.0, mfu=0.3), row(32768, "sdpa", step_s=6.0),
                           row(32768, "s2attn-reach", step_s=5.0)]},
        "longest": {"bisection": bisection(98304)},
    }  # fmt: skip
    targets = {t["name"]: t for t in gpu_check.evaluate_targets(sweeps, {"device_name": "NVIDIA H200"}, 79.6)}
    assert [t["met"] for t in targets.values()] == [False, False, True, False]  # reach: 1.05x, at most 1.2x
    assert targets["s2attn_speedup_32k"]["measured"] == pytest.approx(1.2)
    assert targets["reach_step_32k"]["measured"] == pytest.approx(1.05)
    assert "capped at 79.6 GiB" in targets["longest_7b_context_one_h100"]["note"]

    # Dense out of memory, and a search cut by the budget below the threshold: nothing decided.
    sweeps = {
        "speed": {"rows": [row(32768, "s2attn", step_s=5.0, mfu=0.5), row(32768, "sdpa", status="oom")]},
        "longest": {"bisection": bisection(65536, cut=True)},
    }
    targets = {t["name"]: t for t in gpu_check.evaluate_targets(sweeps, {}, None)}
    assert targets["s2attn_speedup_32k"]["met"] is None and "dense oom" in targets["s2attn_speedup_32k"]["note"]
    assert targets["mfu_32k"]["met"] is True
    assert (
        targets["reach_step_32k"]["met"] is None
        and "with the variants not measured" in targets["reach_step_32k"]["note"]
    )
    assert targets["longest_7b_context_one_h100"]["met"] is None
    assert "a lower bound" in targets["longest_7b_context_one_h100"]["note"]
    assert all(t["met"] is None for t in gpu_check.evaluate_targets({}, {}, None))

    # A probe that crashed (not out of memory) leaves the longest context undecided.
    crashed = {"seq_len": 131072, "status": "failed", "error": "RuntimeError: boom"}
    sweeps = {"longest": {"rows": [], "bisection": bisection(65536, probes=[crashed])}}
    (longest,) = [t for t in gpu_check.evaluate_targets(sweeps, {}, None) if t["name"] == "longest_7b_context_one_h100"]
    assert longest["met"] is None and "N=131072: RuntimeError: boom" in longest["note"]

    # Out of memory at the threshold decides "not met", even when the search below it was cut.
    oom = {"seq_len": 131072, "status": "oom"}
    sweeps = {"longest": {"rows": [oom], "bisection": bisection(65536, cut=True)}}
    (longest,) = [t for t in gpu_check.evaluate_targets(sweeps, {}, None) if t["name"] == "longest_7b_context_one_h100"]
    assert longest["met"] is False and longest["measured"] == 65536


def test_a_child_past_its_deadline_is_killed_with_its_own_children(gpu_check, tmp_path):
    log = gpu_check.Log(tmp_path / "log")
    result = gpu_check.run_child(["sh", "-c", "echo started; sleep 60 & sleep 60"], 2, log)
    assert result["timed_out"] and result["returncode"] is None and result["elapsed_s"] < 15
    assert "started" in result["output"] and "stopped after" in (tmp_path / "log").read_text()
