"""CPU threads and waiting: the default count (affinity, cgroup quota), --threads on every computing command,
passive waiting set before torch loads, ONNX Runtime sessions that do not spin (runtime/threads.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from dsdkit.runtime import threads
from dsdkit.runtime.backends import OrtRunner, make_runners
from typer.testing import CliRunner

from dsdkit.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A fake cgroup tree and affinity mask: ``set(cpus, proc_cgroup, files)`` writes them."""
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc-self-cgroup"
    monkeypatch.setattr(threads, "CGROUP_ROOT", root)
    monkeypatch.setattr(threads, "PROC_CGROUP", proc)

    def set_machine(cpus: int, proc_cgroup: str, files: dict[str, str]):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        proc.write_text(proc_cgroup)
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text + "\n")

    return set_machine


@pytest.mark.parametrize(
    "cpus, proc_cgroup, files, limit, expected",
    [
        # cgroup v2: 1.5 CPUs in the process's own cgroup round up to 2 threads.
        (8, "0::/user.slice/job\n", {"user.slice/job/cpu.max": "150000 100000"}, 1.5, 2),
        # v2 unlimited: the affinity mask decides.
        (4, "0::/\n", {"cpu.max": "max 100000"}, None, 4),
        # v2: a quota on an ancestor limits its children too.
        (8, "0::/a/b\n", {"a/b/cpu.max": "max 100000", "a/cpu.max": "300000 100000"}, 3.0, 3),
        # v2 quota above the affinity: the affinity decides.
        (2, "0::/\n", {"cpu.max": "400000 100000"}, 4.0, 2),
        # cgroup v1 (a container: its own cgroup shows as /docker/...); half a CPU is still one thread.
        (
            16,
            "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n",
            {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"},
            0.5,
            1,
        ),
        # v1 unlimited (quota -1).
        (3, "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None, 3),
        # No cgroup files at all.
        (1, "0::/\n", {}, None, 1),
    ],
)
def test_default_threads_is_affinity_capped_by_cgroup_quota(fake_machine, cpus, proc_cgroup, files, limit, expected):
    fake_machine(cpus, proc_cgroup, files)
    assert threads.cgroup_cpu_limit() == limit
    assert threads.default_threads() == expected


def test_configure_threads_explicit_env_and_default(fake_machine, monkeypatch):
    fake_machine(6, "0::/\n", {"cpu.max": "200000 100000"})
    monkeypatch.setattr(threads, "_configured", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sys, "modules", {k: v for k, v in sys.modules.items() if k != "torch"})  # "before torch"
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.configure_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and threads.current_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # a user's explicit environment is the default...
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.configure_threads() == 5 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert threads.configure_threads(3) == 3 and os.environ["OMP_NUM_THREADS"] == "3"  # ...--threads overrides it
    with pytest.raises(threads.ConfigError, match="`threads` must be >= 1, got 0") as refused:
        threads.configure_threads(0)  # a Python caller is told the argument; the CLI says --threads (below)
    assert refused.value.field == "threads"


def test_after_torch_loaded_sets_torch_threads_and_says_the_policy_is_fixed(monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # restored after the test
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "_configured", None)
    try:
        with caplog.at_level(logging.DEBUG, logger="dsdkit.runtime.threads"):
            assert threads.configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert "OMP_WAIT_POLICY" not in os.environ  # too late to matter, so not pretended
        assert "torch is already imported" in caplog.text
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "command",
    [
        ["match", "images", "captions.txt"],
        ["eval", "data.jsonl"],
        ["train", "data.jsonl"],
        ["explain", "image.png", "a caption"],
        ["bench"],
        ["export", "--out", "bundle"],
        ["world", "train", "run"],
    ],
)
def test_threads_below_one_is_refused_in_one_line(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--threads", "0"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --threads must be >= 1, got 0"
    assert not any(tmp_path.iterdir())  # refused before anything was written


_CHILD = r"""
import json, os, sys
LOAD_TORCH = sys.argv[1] == "load-torch"
import dsdkit.jobs.match

def fake_match(*args, **kwargs):
    seen = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if LOAD_TORCH:
        import torch
        seen["torch_threads"] = torch.get_num_threads()
    print(json.dumps(seen))
    raise SystemExit(0)

dsdkit.jobs.match.match = fake_match
from dsdkit.cli import main
sys.argv = ["dsdkit", "match", "examples/images", "examples/captions.txt", "--threads", "1", *sys.argv[2:]]
main()
"""


def _child(env_extra: dict, load_torch: bool):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_extra)
    done = subprocess.run(
        # --bundle keeps the CLI itself from importing torch (it is never opened: match is faked).
        [sys.executable, "-c", _CHILD, *(["load-torch"] if load_torch else ["no-torch", "--bundle", "unused"])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_cli_sets_passive_waiting_before_torch_loads_and_libgomp_sees_it():
    # OMP_DISPLAY_ENV makes libgomp print the settings it read when it loaded (with torch): the policy really held.
    seen, stderr = _child({"OMP_DISPLAY_ENV": "VERBOSE"}, load_torch=True)
    assert seen["OMP_WAIT_POLICY"] == "PASSIVE" and seen["OMP_NUM_THREADS"] == "1" and seen["torch_threads"] == 1
    # The CLI imports torch before it calls match (config resolution), so only libgomp's own report shows that the
    # policy was in place when torch loaded: spin count 0 (libgomp is torch's OpenMP on its CPU wheels).
    if "OPENMP DISPLAY ENVIRONMENT" in stderr:
        assert "OMP_WAIT_POLICY = 'PASSIVE'" in stderr and "GOMP_SPINCOUNT = '0'" in stderr
    else:
        pytest.skip("this torch's OpenMP runtime does not print OMP_DISPLAY_ENV (not libgomp)")


def test_cli_respects_a_users_explicit_wait_policy():
    seen, _ = _child({"OMP_WAIT_POLICY": "ACTIVE"}, load_torch=False)
    assert seen["OMP_WAIT_POLICY"] == "ACTIVE" and seen["OMP_NUM_THREADS"] == "1"


# -- the library (issue 31 item 3): `import dsdkit` waits passively as the CLI does ---------------------------------

_LIBRARY = r"""
import logging, os, sys
if sys.argv[1] == "torch-first":
    import torch
import dsdkit
import dsdkit.runtime.threads as threads
threads.use_passive_waiting(hint=True)  # again, as a second `import dsdkit` elsewhere would: still one hint
import torch
print("POLICY", os.environ.get("OMP_WAIT_POLICY"), flush=True)
"""


def _library_child(order: str, env_extra: dict) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_DISPLAY_ENV")}
    env.update({"OMP_DISPLAY_ENV": "VERBOSE", **env_extra})  # libgomp prints the settings it read as it loaded
    done = subprocess.run(
        [sys.executable, "-c", _LIBRARY, order], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def _libgomp_saw(stderr: str) -> str | None:
    """The wait policy libgomp read when torch loaded (None where the OpenMP runtime does not report it)."""
    import re

    found = re.search(r"OMP_WAIT_POLICY = '(\w+)'", stderr)
    return found.group(1) if found else None


HINT = "torch was imported before dsdkit"


def test_import_dsdkit_leaves_passive_waiting_for_torch():
    stdout, stderr = _library_child("dsdkit-first", {})
    assert "POLICY PASSIVE" in stdout and HINT not in stderr
    assert _libgomp_saw(stderr) in ("PASSIVE", None), stderr[-2000:]
    if "OPENMP DISPLAY ENVIRONMENT" in stderr:
        assert "GOMP_SPINCOUNT = '0'" in stderr  # libgomp's spin count under the passive policy


def test_import_dsdkit_respects_a_users_wait_policy():
    stdout, stderr = _library_child("dsdkit-first", {"OMP_WAIT_POLICY": "ACTIVE"})
    assert "POLICY ACTIVE" in stdout and HINT not in stderr
    assert _libgomp_saw(stderr) in ("ACTIVE", None)
    # Torch first with the user's policy set: nothing to say either.
    stdout, stderr = _library_child("torch-first", {"OMP_WAIT_POLICY": "ACTIVE"})
    assert "POLICY ACTIVE" in stdout and HINT not in stderr


def test_torch_imported_first_gets_one_logged_hint_and_nothing_is_pretended():
    stdout, stderr = _library_child("torch-first", {})
    assert "POLICY None" in stdout  # too late to matter for this process's torch, so not set
    assert stderr.count(HINT) == 1 and "OMP_WAIT_POLICY=PASSIVE" in stderr
    assert _libgomp_saw(stderr) in ("ACTIVE", "PASSIVE", None) and "Traceback" not in stderr


def test_configure_threads_is_offered_at_the_top_level_lazily(tmp_path):
    import dsdkit

    assert dsdkit.configure_threads is threads.configure_threads and "configure_threads" in dsdkit.__all__
    code = "import sys, dsdkit; dsdkit.configure_threads; print([m for m in ('torch', 'ray') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_ort_session_options_do_not_spin():
    pytest.importorskip("onnxruntime")
    options = threads.ort_session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_ort_runner_sessions_carry_the_thread_count_and_no_spinning(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    monkeypatch.setattr(threads, "_configured", 1)  # what the CLI's --threads 1 leaves behind
    for runner, expected in ((OrtRunner(path, ["CPUExecutionProvider"]), 1), (OrtRunner(path, None, 2), 2)):
        with runner:
            options = runner.session.get_session_options()
            assert options.intra_op_num_threads == expected
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
            assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_make_runners_passes_threads_to_every_ort_runner(tmp_path):
    pytest.importorskip("onnxruntime")
    bundle = SimpleNamespace(
        path=tmp_path, manifest={"graphs": {"a": {}, "b": {}}}, graph_path=lambda name: tmp_path / f"{name}.onnx"
    )
    runners = make_runners(bundle, "onnxruntime", "cpu", threads=3)
    assert {name: r.threads for name, r in runners.items()} == {"a": 3, "b": 3}
