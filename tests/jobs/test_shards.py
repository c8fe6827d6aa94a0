"""Sharded jobs (issue 17): `dsdkit plan`, `match --job --shard`, `merge`, in real processes.

Three shards run as separate processes and merged equal the single-run matrix bit for bit; a shard killed with
SIGKILL after its first chunk and rerun gives the same result; two processes on one shard leave one valid part; a
changed input is refused. The demo model at S = 2 on examples/demo (8 images x 8 captions, chunks of 3) keeps each
process at a few seconds, most of it importing torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import ConfigError, JobError
from dsdkit.runtime.results import read_result
from typer.testing import CliRunner

from dsdkit.cli import app
from tests.conftest import one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
CHUNK = 3
TIMESTEPS = 2

#: Kills itself (SIGKILL, no cleanup of any kind) right after the first chunk's resume state is saved.
KILLED_SHARD = """
import os, signal, sys
import dsdkit.runtime.resume as jobs
from dsdkit.runtime.threads import configure_threads
from dsdkit.jobs.shards import run_shard

configure_threads(1)
save = jobs._save

def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

jobs._save = save_then_die
run_shard(sys.argv[1], sys.argv[2])
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    return env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _dsdkit(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "dsdkit", *map(str, args)]


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(_dsdkit(*args), capture_output=True, text=True, env=_env(), timeout=300)


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(_dsdkit(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _config():
    from dsdkit.runtime.config import resolve_scoring

    return resolve_scoring(None, None, {"num_timesteps": TIMESTEPS})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A private copy of examples/demo (images and captions), so that no test can touch the checkout's."""
    root = tmp_path_factory.mktemp("inputs")
    images = root / "images"
    images.mkdir()
    for path in sorted(DEMO.glob("*.png")):
        shutil.copy2(path, images / path.name)
    shutil.copy2(DEMO / "captions.txt", root / "captions.txt")
    return images, root / "captions.txt"


def _plan(images: Path, captions: Path, out: Path, shards: int):
    from dsdkit.jobs.shards import plan_job

    return plan_job(images, captions, out, shards, model="demo", config=_config(), chunk_size=CHUNK)


@pytest.fixture(scope="module")
def planned(inputs, tmp_path_factory):
    """``plan(shards) -> fresh job folder``: planned once per shard count (in this process), copied per test."""
    made: dict[int, Path] = {}
    root = tmp_path_factory.mktemp("planned")

    def plan(shards: int, where: Path) -> Path:
        if shards not in made:
            made[shards] = _plan(*inputs, root / f"job-{shards}", shards).folder
        shutil.copytree(made[shards], where)
        return where

    return plan


@pytest.fixture(scope="module")
def single(inputs):
    """The single-run matrix the shards must reproduce: one `match` over the whole job, same chunks."""
    from dsdkit.jobs.match import match

    with one_torch_thread():
        return match(*inputs, model="demo", config=_config(), chunk_size=CHUNK)


def _job_files(job: Path) -> list[str]:
    return sorted(p.name for p in (job / "scores").iterdir())


def test_three_shard_processes_merge_to_the_single_run(planned, single, tmp_path):
    job = planned(3, tmp_path / "job")
    workers = [_start("match", "--job", job, "--shard", f"{i}/3") for i in range(3)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
    assert _job_files(job) == [f"part-0000{i}.{kind}" for i in range(3) for kind in ("done.json", "parquet")]
    markers = [json.loads((job / "scores" / f"part-0000{i}.done.json").read_text()) for i in range(3)]
    assert [m["images"] for m in markers] == [[0, 3], [3, 6], [6, 8]]  # whole chunks of 3
    assert sum(m["rows"] for m in markers) == 8 and all(m["skipped"] == [] for m in markers)

    again = _run("match", "--job", job, "--shard", "1/3")  # a finished shard is skipped (no model is loaded)
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr

    merged = _run("merge", job, "-o", tmp_path / "merged.parquet")
    assert merged.returncode == 0, merged.stderr[-2000:]
    result = read_result(tmp_path / "merged.parquet")
    assert result.images == single.images and result.captions == single.captions
    np.testing.assert_array_equal(result.scores, single.scores)  # the same chunks and batches: bit for bit
    assert result.meta["evaluations"] == single.meta["evaluations"]
    assert result.meta["unet_evaluations"] == single.meta["unet_evaluations"]
    assert result.meta["job"]["shards"] == 3

    # Per caption, the best images come from every shard (per image, each shard has its own rows whole).
    from dsdkit.jobs.shards import merge_job

    merge_job(job, tmp_path / "merged.json", top_k=3)
    document = json.loads((tmp_path / "merged.json").read_text())
    per_caption = [[entry["index"] for entry in c["top_k"]] for c in document["top_k"]["per_caption"]]
    assert per_caption == [list(order) for order in single.top(3, axis=0)]
    assert any(len({i // CHUNK for i in top}) > 1 for top in per_caption)  # lists that span shards


def test_a_shard_killed_with_sigkill_is_rerun_to_the_same_result(planned, single, tmp_path):
    job = planned(1, tmp_path / "job")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_SHARD, str(job), "0/1"], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    scores = job / "scores"
    state = json.loads((scores / "part-00000.parquet.partial" / "state.json").read_text())
    assert state["done_rows"] == CHUNK  # one chunk of three saved before the kill
    assert (scores / "part-00000.lock").exists()  # left behind by the dead worker
    assert not (scores / "part-00000.parquet").exists() and not (scores / "part-00000.done.json").exists()
    with pytest.raises(JobError, match="1 of 1 shard"):
        from dsdkit.jobs.shards import merge_job

        merge_job(job, tmp_path / "early.parquet")

    rerun = _run("match", "--job", job, "--shard", "0/1")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "taking over the lock of pid" in rerun.stderr  # its pid is dead on this host
    assert f"{CHUNK} of 8 image rows already scored" in rerun.stderr  # the kept chunk is not scored again
    assert _job_files(job) == ["part-00000.done.json", "part-00000.parquet"]
    marker = json.loads((scores / "part-00000.done.json").read_text())
    assert marker["evaluations"] == single.meta["evaluations"]  # the killed run's chunk counted once

    merged = _run("merge", job, "-o", tmp_path / "merged.parquet")
    assert merged.returncode == 0, merged.stderr[-2000:]
    np.testing.assert_array_equal(read_result(tmp_path / "merged.parquet").scores, single.scores)


def test_two_processes_on_one_shard_leave_one_valid_part(planned, single, tmp_path):
    job = planned(3, tmp_path / "job")
    workers = [_start("match", "--job", job, "--shard", "1/3") for _ in range(2)]
    outcomes = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        outcomes.append((worker.returncode, out + err))
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 11]), outcomes
    for code, text in outcomes:
        if code == 11:  # the loser says who holds the shard, in one line
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "shard 1/3" in errors[0] and "is being scored by pid" in errors[0], text
    if codes == [0, 0]:  # the second came after the first had finished
        assert any("already done" in text for _, text in outcomes)
    assert _job_files(job) == ["part-00001.done.json", "part-00001.parquet"]  # no lock, temp file or resume state
    part = read_result(job / "scores" / "part-00001.parquet")
    np.testing.assert_array_equal(part.scores, single.scores[3:6])


def test_a_changed_input_is_refused(inputs, tmp_path):
    images, captions = inputs
    mine = tmp_path / "images"
    shutil.copytree(images, mine)
    shutil.copy2(captions, tmp_path / "captions.txt")
    job = _plan(mine, tmp_path / "captions.txt", tmp_path / "job", 3).folder
    changed = mine / "04-a-purple-square.png"
    changed.write_bytes(changed.read_bytes() + b"\0")  # shard 1 = images 3..5

    refused = _run("match", "--job", job, "--shard", "1/3")
    assert refused.returncode == 11, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "04-a-purple-square.png changed since" in refused.stderr and "plan a new job" in refused.stderr
    assert not (job / "scores" / "part-00001.lock").exists()  # refused before claiming the shard

    import hashlib

    from dsdkit.jobs.shards import DONE_FORMAT, JobManifest, merge_job, run_shard

    manifest = JobManifest.read(job)
    for i in range(3):  # pretend every shard is done: merge still checks every input before reading a part
        (job / "scores" / f"part-0000{i}.parquet").write_bytes(b"x")
        start, stop = manifest.shards[i]
        marker = {  # a well-formed marker (runtime/schemas.py checks each) of a part that is never read
            "format": DONE_FORMAT,
            "job": manifest.fingerprint,
            "shard": i,
            "shards": 3,
            "images": [start, stop],
            "rows": stop - start,
            "image_ids": list(range(start, stop)),
            "unet_evaluations": 0,
            "evaluations": {},
            "skipped": [],
            "image_warnings": [],
            "part": f"part-0000{i}.parquet",
            "part_bytes": 1,
            "part_sha256": hashlib.sha256(b"x").hexdigest(),
        }
        (job / "scores" / f"part-0000{i}.done.json").write_text(json.dumps(marker))
    with pytest.raises(JobError, match="04-a-purple-square.png changed since"):
        merge_job(job, tmp_path / "merged.parquet")
    assert not (tmp_path / "merged.parquet").exists()
    shutil.rmtree(job / "scores")
    (job / "scores").mkdir()
    planned_bytes = (tmp_path / "captions.txt").stat().st_size
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\n")
    expected = rf"captions\.txt changed since .* \(size {planned_bytes} -> 27 bytes\);.*plan a new job"
    with pytest.raises(JobError, match=expected):
        run_shard(job, "0/3")


def test_plan_merge_and_shard_errors_are_one_actionable_line(planned, tmp_path, monkeypatch):
    from dsdkit.jobs.shards import JobManifest, _claim, _release, merge_job, parse_shard, shard_ranges

    job = planned(3, tmp_path / "job")
    runner = CliRunner()

    (job / "scores" / "part-00002.lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    # a lock held elsewhere is not taken over; a lock of a dead pid on this host is
    with pytest.raises(JobError, match="is being scored by pid .* on elsewhere .*delete .*part-00002.lock"):
        _claim(job / "scores" / "part-00002.lock", "shard 2/3")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")  # the same array task, requeued on another node: taken over
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    requeued = job / "scores" / "part-00000.lock"
    requeued.write_text(json.dumps({"pid": 1, "host": "elsewhere", "slurm_task": "77_0", "token": "old"}))
    _release(_claim(requeued, "shard 0/3"))
    assert not requeued.exists()
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    stale = job / "scores" / "part-00001.lock"
    stale.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "token": "old"}))
    lock = _claim(stale, "shard 1/3")
    assert json.loads(stale.read_text())["token"] == lock.token
    with pytest.raises(JobError, match="shard 1/3 is being scored by pid"):  # now ours, and alive
        _claim(stale, "shard 1/3")

    # merge names every missing shard, and says which are running
    with pytest.raises(JobError, match=r"3 of 3 shard\(s\) not done: 0, 1, 2; running now: 1, 2; run `dsdkit match"):
        merge_job(job, tmp_path / "out.csv")
    result = runner.invoke(app, ["merge", str(job), "-o", str(tmp_path / "out.csv")])
    assert result.exit_code == 11 and result.output.count("error:") == 1, result.output
    assert not (tmp_path / "out.csv").exists()

    # bad --shard specs
    assert parse_shard("2/3", 3) == 2
    for spec, message in [
        ("3/3", "i runs from 0 to 2"),
        ("1/4", "the job has 3 shard"),
        ("one", "expected i/N"),
        ("1", "expected i/N"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_shard(spec, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard("auto", 3, slurm) == 2
    assert parse_shard("auto", 3, {"RANK": "1", "WORLD_SIZE": "3"}) == 1
    with pytest.raises(ConfigError, match="WORLD_SIZE is not set"):
        parse_shard("auto", 3, {"RANK": "1"})
    with pytest.raises(ConfigError, match="neither SLURM_ARRAY_TASK_ID"):
        parse_shard("auto", 3, {})
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    result = runner.invoke(app, ["match", "--job", str(job), "--shard", "auto"])
    assert result.exit_code == 2 and "the job has 3 shard(s), not 4" in result.output, result.output

    # match --job takes nothing but where it runs; --shard needs --job
    result = runner.invoke(app, ["match", "--job", str(job), "--shard", "0/3", "--timesteps", "4", "-o", "x.csv"])
    assert result.exit_code == 2 and "--output, --timesteps: match --job takes its inputs" in result.output
    result = runner.invoke(app, ["match", str(DEMO), str(DEMO / "captions.txt"), "--job", str(job), "--shard", "0/3"])
    assert result.exit_code == 2 and "IMAGES, CAPTIONS: match --job" in result.output, result.output
    result = runner.invoke(app, ["match", "--shard", "0/3"])
    assert result.exit_code == 2 and "--job and --shard go together" in result.output

    # shards are whole chunks; a manifest edited after planning, or a different engine, is refused
    assert shard_ranges(8, 3, 2) == [[0, 3], [3, 8]]
    with pytest.raises(ConfigError, match="8 images make 3 chunk"):
        shard_ranges(8, 3, 4)
    manifest = JobManifest.read(job)
    with pytest.raises(JobError, match="the scoring config differ from the job's"):
        manifest.check_identity({**manifest.identity, "scoring": {**manifest.identity["scoring"], "lse_lambda": 2}})
    edited = json.loads((job / "job.json").read_text())
    edited["engine"]["batch_size"] = 64
    (job / "job.json").write_text(json.dumps(edited))
    with pytest.raises(JobError, match="was changed after it was planned"):
        JobManifest.read(job)
    with pytest.raises(JobError, match="is not a job folder"):
        JobManifest.read(tmp_path)


def test_a_shard_of_unusable_images_is_done_with_no_rows(inputs, single, tmp_path):
    """A shard may hold only bad files: it completes empty (a single run would go on past them too), and the merged
    result lists them with their job index."""
    from dsdkit.jobs.shards import merge_job, run_shard

    images, captions = inputs
    mine = tmp_path / "images"
    mine.mkdir()
    for path in sorted(images.iterdir())[:3]:
        shutil.copy2(path, mine / path.name)
    for i in range(3):
        (mine / f"bad-{i}.png").write_bytes(b"")  # sorted after the good ones: shard 1 is all bad
    job = _plan(mine, captions, tmp_path / "job", 2).folder
    with one_torch_thread():
        empty = run_shard(job, "1/2")
    assert empty.marker["rows"] == 0 and [s["index"] for s in empty.marker["skipped"]] == [3, 4, 5]
    with pytest.raises(JobError, match=r"1 of 2 shard\(s\) not done: 0;"):
        merge_job(job)
    with one_torch_thread():
        run_shard(job, 0)
    result = merge_job(job, tmp_path / "merged.json")
    np.testing.assert_array_equal(result.scores, single.scores[:3])
    assert [s["image"] for s in result.meta["skipped"]["images"]] == [str(mine / f"bad-{i}.png") for i in range(3)]
    report = json.loads((tmp_path / "merged.skipped.json").read_text())
    assert [s["index"] for s in report["images"]] == [3, 4, 5]
