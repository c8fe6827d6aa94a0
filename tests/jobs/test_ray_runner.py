"""The Ray Data runner (issue 17): `dsdkit match ... --ray`, on one module-scoped local cluster.

The cluster has logical resources only (`num_cpus=2, num_gpus=2`: Ray hands out GPU ids without GPUs, and the
workers score on the CPU). The demo model at S = 2 on examples/demo (8 images x 8 captions, chunks of 3, 3 shards)
keeps each run to starting the actors (importing torch, loading the model) plus a few seconds of scoring. The
reference is the single-process run in this process with one torch thread, as each worker has: the merged result
equals it bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import ConfigError, JobError
from typer.testing import CliRunner

from dsdkit.cli import app
from tests.conftest import one_torch_thread

pytestmark = pytest.mark.ray

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
CHUNK = 3
TIMESTEPS = 2


@pytest.fixture(scope="module")
def cluster():
    import ray

    if ray.is_initialized():  # another module's cluster: this one's resources are its own
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _config():
    """The config the command line resolves for ``--model demo --timesteps 2`` (the model's declared score)."""
    from dsdkit.runtime.config import resolve_scoring

    from dsdkit.pytorch.models import declared_model

    return resolve_scoring(None, None, {"num_timesteps": TIMESTEPS}, model=declared_model("demo"))


def _plan_options() -> dict:
    return dict(model="demo", config=_config(), chunk_size=CHUNK)


@pytest.fixture(scope="module")
def single():
    """The single-process result, with one torch thread like each worker."""
    from dsdkit.jobs.match import match

    with one_torch_thread():
        return match(DEMO, DEMO / "captions.txt", model="demo", config=_config(), chunk_size=CHUNK)


def test_two_actors_get_distinct_gpus_and_give_the_single_process_result(cluster, single, tmp_path):
    from dsdkit.runtime.results import read_result

    from dsdkit.jobs.ray_runner import RayOptions, ShardWorker, match_on_ray, run_job_on_ray
    from dsdkit.jobs.shards import plan_job

    started = tmp_path / "started"
    started.mkdir()

    # The pool hands out shards as soon as its first actor is up; a barrier on both actors' start makes sure both
    # score (one shard in flight per actor: the first holds shard 0 until the second has started).
    class BothScore(ShardWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            (started / str(os.getpid())).touch()

        def score_shard(self, index):
            import time

            deadline = time.monotonic() + 120
            while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().score_shard(index)

    options = RayOptions(address=None, workers=2, gpus_per_worker=1)
    manifest = plan_job(DEMO, DEMO / "captions.txt", tmp_path / "out.parquet.job", 3, **_plan_options())
    report = run_job_on_ray(manifest, options, BothScore)
    result, _ = match_on_ray(DEMO, DEMO / "captions.txt", tmp_path / "out.parquet", options=options, **_plan_options())
    assert report.used_workers == 2 and [s["shard"] for s in report.shards] == [0, 1, 2]
    # Each actor saw its own GPU (Ray's id and the CUDA_VISIBLE_DEVICES it set), and both actors scored.
    gpus = {w["pid"]: (w["gpu_ids"], w["cuda_visible_devices"]) for w in report.workers}
    assert len(gpus) == 2, report.workers
    ids = [json.loads(g) for g, _ in gpus.values()]
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    assert sorted(v for _, v in gpus.values()) == sorted(i[0] for i in ids)
    assert sum(s["rows"] for s in report.shards) == len(single.images)
    np.testing.assert_array_equal(result.scores, single.scores)
    written = read_result(tmp_path / "out.parquet")
    np.testing.assert_array_equal(written.scores, single.scores)
    assert written.images == single.images and written.captions == single.captions
    # A rerun finds every shard done and scores nothing.
    again, rerun = match_on_ray(
        DEMO, DEMO / "captions.txt", tmp_path / "out.parquet", options=options, **_plan_options()
    )
    assert rerun.shards == [] and rerun.already_done == [0, 1, 2]
    np.testing.assert_array_equal(again.scores, single.scores)


def test_an_actor_that_dies_mid_shard_is_restarted_and_nothing_is_lost(cluster, single, tmp_path):
    from dsdkit.jobs.ray_runner import RayOptions, ShardWorker, run_job_on_ray
    from dsdkit.jobs.shards import merge_job, plan_job

    marker = tmp_path / "died-once"

    # A local class travels to the workers by value (cloudpickle), instrumentation and all.
    class DiesOnceMidShard(ShardWorker):
        def score_shard(self, index):
            import dsdkit.runtime.resume as jobs

            save = jobs._save

            def save_then_die(*args, **kwargs):
                save(*args, **kwargs)  # the shard's first chunk is saved: the restarted worker continues from it
                if not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os._exit(1)

            jobs._save = save_then_die
            try:
                return super().score_shard(index)
            finally:
                jobs._save = save

    manifest = plan_job(DEMO, DEMO / "captions.txt", tmp_path / "job", 2, **_plan_options())
    report = run_job_on_ray(
        manifest, RayOptions(address=None, workers=1, max_restarts=2, max_task_retries=2), DiesOnceMidShard
    )
    died = int(marker.read_text())
    assert died not in {w["pid"] for w in report.workers}  # the process that died reported nothing
    assert [s["shard"] for s in report.shards] == [0, 1] and any(w["restarted"] for w in report.workers)
    # The dead attempt's lock was taken over, its saved chunk reused, and the result is the single run's.
    assert not list((tmp_path / "job" / "scores").glob("*.lock"))
    np.testing.assert_array_equal(merge_job(manifest).scores, single.scores)


def test_cli_runs_the_job_on_ray_and_a_planned_job_too(cluster, single, tmp_path):
    from dsdkit.runtime.results import read_result

    runner = CliRunner()
    out = tmp_path / "cli.parquet"
    args = ["match", str(DEMO), str(DEMO / "captions.txt"), "--model", "demo", "--timesteps", str(TIMESTEPS)]
    args += ["--chunk-size", str(CHUNK), "-o", str(out), "--ray", "local", "--workers", "2"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "Ray: 3 shard(s)" in done.output and f"merged into {out}" in done.output
    np.testing.assert_array_equal(read_result(out).scores, single.scores)
    assert json.loads((tmp_path / "cli.parquet.job" / "job.json").read_text())["shards"] == [[0, 3], [3, 6], [6, 8]]

    planned = tmp_path / "planned"
    plan = ["plan", str(DEMO), str(DEMO / "captions.txt"), "--model", "demo", "--timesteps", str(TIMESTEPS)]
    assert (
        runner.invoke(app, [*plan, "--chunk-size", str(CHUNK), "--shards", "2", "--out", str(planned)]).exit_code == 0
    )
    merged = tmp_path / "planned.parquet"
    done = runner.invoke(app, ["match", "--job", str(planned), "--ray", "local", "-o", str(merged)])
    assert done.exit_code == 0, done.output
    np.testing.assert_array_equal(read_result(merged).scores, single.scores)


def test_bad_ray_options_are_one_line_errors(cluster, tmp_path):
    runner = CliRunner()
    base = ["match", str(DEMO), str(DEMO / "captions.txt"), "--model", "demo", "--timesteps", "2"]
    cases = {
        "--gpus-per-worker 4: the Ray cluster has 2 GPU(s)": [
            "-o",
            str(tmp_path / "a.parquet"),
            "--ray",
            "local",
            "--gpus-per-worker",
            "4",
        ],
        "a run on Ray needs an --output": ["--ray", "local"],
        "--workers go with --ray": ["-o", str(tmp_path / "b.parquet"), "--workers", "2"],
        "--resume: not with --ray": ["-o", str(tmp_path / "c.parquet"), "--ray", "local", "--resume"],
    }
    for expected, extra in cases.items():
        done = runner.invoke(app, [*base, *extra])
        assert done.exit_code == ConfigError.exit_code, (expected, done.output)
        assert expected in done.output and "Traceback" not in done.output, done.output
    with pytest.raises(ConfigError, match="`workers` must be >= 1"):
        from dsdkit.jobs.ray_runner import RayOptions

        RayOptions(workers=0)


def test_a_changed_input_is_refused_by_the_workers_in_one_line(cluster, tmp_path):
    import shutil

    from dsdkit.jobs.ray_runner import RayOptions, run_job_on_ray
    from dsdkit.jobs.shards import plan_job

    images = tmp_path / "images"
    shutil.copytree(DEMO, images)
    manifest = plan_job(images, images / "captions.txt", tmp_path / "job", 3, **_plan_options())
    changed = Path(manifest.images[7]["path"])
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(JobError) as refused:
        run_job_on_ray(manifest, RayOptions(address=None, workers=1))
    message = str(refused.value)
    assert changed.name in message and "\n" not in message


def test_serve_command_refuses_a_missing_bundle_in_one_line(tmp_path):
    """`dsdkit serve` checks its bundle before Ray or any replica starts (the app itself:
    tests/serving/test_serve.py)."""
    done = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing.bundle"), "--port", "8123"])
    assert done.exit_code != 0 and "nothing.bundle" in done.output, done.output
    assert "Traceback" not in done.output and len(done.output.strip().splitlines()) == 1, done.output


def test_a_gallery_search_on_ray_is_the_single_process_search(cluster, tmp_path):
    """A shortlist job (`match --shortlist demo --shortlist-k 3`) on Ray: planning computes the shortlist once; the
    actors rerank their shards' part of the stored one (an actor that embeds or shortlists fails the job), and the
    merged result is the single-process search bit for bit."""

    from dsdkit.jobs.match import match
    from dsdkit.jobs.ray_runner import RayOptions, ShardWorker, run_job_on_ray
    from dsdkit.jobs.shards import merge_job, plan_job
    from dsdkit.jobs.specs import EngineSpec, MatchOptions, ShortlistSpec

    class NeverShortlists(ShardWorker):
        def score_shard(self, index):
            import dsdkit.jobs.match as matching
            import dsdkit.jobs.shortlists as shortlists
            import dsdkit.pytorch.clip as clip

            def refuse(*args, **kwargs):
                raise AssertionError("a Ray worker computed the shortlist again")

            matching.compute_shortlist = shortlists.compute_shortlist = clip.TorchClip = refuse
            return super().score_shard(index)

    spec = EngineSpec(model="demo", knobs={"num_timesteps": TIMESTEPS}, chunk_size=CHUNK)
    options = MatchOptions(shortlist=ShortlistSpec(model="demo", k=3))
    with one_torch_thread():
        single = match(DEMO, DEMO / "captions.txt", spec, options)
        manifest = plan_job(DEMO, DEMO / "captions.txt", tmp_path / "job", 3, spec, options)
    report = run_job_on_ray(manifest, RayOptions(address=None, workers=1), NeverShortlists)
    assert [s["shard"] for s in report.shards] == [0, 1, 2]
    merged = merge_job(manifest, tmp_path / "out.parquet")
    assert np.isfinite(single.scores).sum() == 8 * 3
    np.testing.assert_array_equal(merged.scores, single.scores)
    np.testing.assert_array_equal(merged.shortlist_rank, single.shortlist_rank)
    np.testing.assert_array_equal(merged.shortlist_similarity, single.shortlist_similarity)
    assert merged.meta["shortlist"]["pairs"] == single.meta["shortlist"]["pairs"] == 8 * 3
    assert merged.meta["shortlist"]["unet_evaluations"] == single.meta["shortlist"]["unet_evaluations"]
