"""A gallery search as a sharded job (`dsdkit plan --shortlist`, `match --job --shard`, `merge`): planning computes
the shortlist once and stores it (``shortlist.npz``, its sha256 in job.json); shards rerank their images' part of it
without computing it again, and the merge equals the single-process search. The stored shortlist is covered by the
job's tampering checks: an edited similarity or candidate, a missing file or a re-recorded hash are refused in one
line (exit code 11) naming the file. (The Ray runner's case is in test_ray_runner.py.)

The demo model and the shipped mini-CLIP at S = 2 on examples/demo (8 images x 8 captions, chunks of 3, 3 shards),
in this process: one torch thread, as the shard workers of test_shards.py have.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import JobError
from typer.testing import CliRunner

from dsdkit.cli import app
from dsdkit.jobs.specs import EngineSpec, MatchOptions, ShortlistSpec
from tests.conftest import one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
CAPTIONS = DEMO / "captions.txt"
CHUNK = 3
K = 3
SPEC = EngineSpec(model="demo", knobs={"num_timesteps": 2}, chunk_size=CHUNK)


def _options(per: str) -> MatchOptions:
    return MatchOptions(shortlist=ShortlistSpec(model="demo", k=K), per=per, top_k=2)


@pytest.fixture(scope="module")
def singles():
    """``per -> the single-process search`` (computed once per direction)."""
    from dsdkit.jobs.match import match

    made = {}

    def get(per: str):
        if per not in made:
            with one_torch_thread():
                made[per] = match(DEMO, CAPTIONS, SPEC, _options(per))
        return made[per]

    return get


def _forbid_shortlisting(monkeypatch) -> None:
    """From now on, anything that embeds or shortlists fails the test (after planning, nothing may)."""
    import dsdkit.jobs.match as matching
    import dsdkit.jobs.shortlists as shortlists
    import dsdkit.pytorch.clip as clip

    def refuse(*args, **kwargs):
        raise AssertionError("the shortlist was computed again after planning")

    for module, name in ((shortlists, "compute_shortlist"), (matching, "compute_shortlist"), (clip, "TorchClip")):
        monkeypatch.setattr(module, name, refuse)


def _score_all_shards(job: Path) -> None:
    from dsdkit.jobs.shards import load_job, open_job_engine, run_shard

    manifest = load_job(job)
    with one_torch_thread(), open_job_engine(manifest) as engine:
        for index in range(manifest.num_shards):
            run_shard(manifest, index, engine=engine)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """``per -> job folder``: the search planned in 3 shards and every shard scored (in this process, with one torch
    thread), with anything that embeds or shortlists failing the test once planning is over."""
    from dsdkit.jobs.shards import plan_job

    made = {}

    def get(per: str) -> Path:
        if per not in made:
            folder = tmp_path_factory.mktemp(f"search-{per}") / "job"
            with one_torch_thread():
                plan_job(DEMO, CAPTIONS, folder, 3, SPEC, _options(per))
            with pytest.MonkeyPatch.context() as patch:
                _forbid_shortlisting(patch)  # the workers rerank the stored pairs
                _score_all_shards(folder)
            made[per] = folder
        return made[per]

    return get


@pytest.mark.parametrize("per", ["image", "caption"])
def test_shards_rerank_the_stored_shortlist_and_merge_to_the_single_search(per, singles, jobs, tmp_path):
    from dsdkit.runtime.results import write_result
    from dsdkit.runtime.shortlist import Shortlist

    from dsdkit.jobs.shards import SHORTLIST_FILE, merge_job

    single = singles(per)
    job = jobs(per)
    stored = job / SHORTLIST_FILE
    record = json.loads((job / "job.json").read_text())["shortlist"]
    assert record["file"] == SHORTLIST_FILE and record["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert record["spec"] == {"model": "demo", "k": K, "block_rows": 1024} and record["stage"]["per"] == per
    with np.load(stored, allow_pickle=False) as arrays:
        shortlist = Shortlist.from_arrays({key: arrays[key] for key in arrays.files}, per)
    np.testing.assert_array_equal(shortlist.rank_matrix(), single.shortlist_rank)

    merged = merge_job(job, tmp_path / "merged.json")
    assert merged.images == single.images and merged.captions == single.captions
    np.testing.assert_array_equal(merged.scores, single.scores)  # NaN where not shortlisted, in both
    np.testing.assert_array_equal(merged.held, single.held)
    np.testing.assert_array_equal(merged.shortlist_rank, single.shortlist_rank)
    np.testing.assert_array_equal(merged.shortlist_similarity, single.shortlist_similarity)
    assert np.isfinite(single.scores).sum() == 8 * K
    for key in ("model", "k", "per", "pairs", "unet_evaluations", "exhaustive_unet_evaluations"):
        assert merged.meta["shortlist"][key] == single.meta["shortlist"][key], key
    # The files: the merged result file holds what the single run's does (its meta aside).
    write_result(single, tmp_path / "single.json", k=2)
    ours, theirs = (json.loads((tmp_path / name).read_text()) for name in ("merged.json", "single.json"))
    for key in ("scores", "shortlist", "top_k"):
        assert ours[key] == theirs[key], key


@pytest.fixture(scope="module")
def done_job(jobs):
    """The per-image search, planned and scored (copied by each test that changes it)."""
    return jobs("image")


def _npz(arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _rewrite_shortlist(change, record: str = ""):
    """Rewrite shortlist.npz as ``change(arrays)`` (edits the arrays in place, or returns the file's new bytes).

    ``record``: ``"hash"`` also records the new sha256 in job.json; ``"fingerprint"`` also recomputes the job's
    fingerprint, as a careful writer would (the job is then another one, and the file itself must be refused)."""

    def tamper(job: Path) -> None:
        from dsdkit.runtime.resume import job_fingerprint

        from dsdkit.jobs.shards import JobManifest

        path = job / "shortlist.npz"
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: np.array(stored[key]) for key in stored.files}
        data = change(arrays) or _npz(arrays)
        path.write_bytes(data)
        if record:
            document = json.loads((job / "job.json").read_text())
            document["shortlist"]["sha256"] = hashlib.sha256(data).hexdigest()
            if record == "fingerprint":
                covered = {k: document.get(k) for k in JobManifest._COVERED}
                document["fingerprint"] = job_fingerprint({**covered, "shortlist": document["shortlist"]})
            (job / "job.json").write_text(json.dumps(document))

    return tamper


def _similarity_raised(arrays):
    arrays["similarities"][2, 1] += np.float32(0.25)


def _candidates_swapped(arrays):
    arrays["candidates"][0, [0, 2]] = arrays["candidates"][0, [2, 0]]


def _candidate_out_of_range(arrays):
    arrays["candidates"][1, 0] = 8  # the job has captions 0..7


def _object_array(arrays):
    return _npz({**arrays, "candidates": arrays["candidates"].astype(object)})


def _record_edited(change):
    """Edit job.json's shortlist record and recompute the fingerprint: the manifest's schema must refuse it."""

    def tamper(job: Path) -> None:
        from dsdkit.runtime.resume import job_fingerprint

        from dsdkit.jobs.shards import JobManifest

        document = json.loads((job / "job.json").read_text())
        change(document["shortlist"])
        covered = {k: document.get(k) for k in JobManifest._COVERED}
        document["fingerprint"] = job_fingerprint({**covered, "shortlist": document["shortlist"]})
        (job / "job.json").write_text(json.dumps(document))

    return tamper


#: case -> (tamper, what merge's one line names, what a shard's one line names). A re-fingerprinted job is another
#: job: merge refuses its done markers first; a shard still to score refuses the stored file itself.
ANOTHER_JOB = "belongs to another job"
SHORTLIST_CASES = {
    "a stored similarity edited": (_rewrite_shortlist(_similarity_raised), "shortlist.npz", "shortlist.npz"),
    "stored candidates swapped": (_rewrite_shortlist(_candidates_swapped), "shortlist.npz", "shortlist.npz"),
    "the shortlist removed": (lambda job: (job / "shortlist.npz").unlink(), "shortlist.npz", "shortlist.npz"),
    "an edited shortlist, its hash re-recorded": (
        _rewrite_shortlist(_similarity_raised, record="hash"),
        "was changed after it was planned",
        "was changed after it was planned",
    ),
    "a candidate out of range, the job re-fingerprinted": (
        _rewrite_shortlist(_candidate_out_of_range, record="fingerprint"),
        ANOTHER_JOB,
        "shortlist.npz: the stored shortlist names candidates out of range",
    ),
    "not an npz, the job re-fingerprinted": (
        _rewrite_shortlist(lambda arrays: b"not a zip file", record="fingerprint"),
        ANOTHER_JOB,
        "shortlist.npz: not a stored shortlist",
    ),
    "the shortlist file outside the job, the job re-fingerprinted": (
        _record_edited(lambda record: record.update(file="../shortlist.npz")),
        "shortlist.file",
        "shortlist.file",
    ),
    "an object array, the job re-fingerprinted": (
        _rewrite_shortlist(_object_array, record="fingerprint"),
        ANOTHER_JOB,
        "shortlist.npz: not a stored shortlist",
    ),
}


def _one_line_error(result, code: int, words: str) -> None:
    assert "Traceback" not in result.output, result.output[-2000:]
    assert result.exit_code == code, result.output[-2000:]
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output[-2000:]
    assert words in errors[0], errors[0]


@pytest.mark.parametrize("case", list(SHORTLIST_CASES))
def test_a_tampered_shortlist_is_refused_by_merge_and_by_a_shard(case, done_job, tmp_path):
    tamper, at_merge, at_shard = SHORTLIST_CASES[case]
    job = tmp_path / "job"
    shutil.copytree(done_job, job)
    tamper(job)
    runner = CliRunner()
    out = tmp_path / "merged.csv"
    _one_line_error(runner.invoke(app, ["merge", str(job), "-o", str(out)]), JobError.exit_code, at_merge)
    assert not out.exists()
    # A shard still to score reads the stored shortlist too, and refuses it before writing anything.
    for name in ("part-00001.parquet", "part-00001.done.json"):
        (job / "scores" / name).unlink()
    ran = runner.invoke(app, ["match", "--job", str(job), "--shard", "1/3", "--threads", "1"])
    _one_line_error(ran, JobError.exit_code, at_shard)
    assert not (job / "scores" / "part-00001.parquet").exists()
    assert not (job / "scores" / "part-00001.done.json").exists()


def test_an_untouched_search_job_merges(done_job, singles, tmp_path):
    """The control: the copied job merges, and equals the single-process search."""
    from dsdkit.runtime.results import read_result

    job = tmp_path / "job"
    shutil.copytree(done_job, job)
    ran = CliRunner().invoke(app, ["merge", str(job), "-o", str(tmp_path / "merged.parquet")])
    assert ran.exit_code == 0, ran.output
    merged = read_result(tmp_path / "merged.parquet")
    np.testing.assert_array_equal(merged.scores, singles("image").scores)
    np.testing.assert_array_equal(merged.shortlist_rank, singles("image").shortlist_rank)


def test_dsdkit_plan_stores_the_shortlist_the_library_plans(done_job, tmp_path):
    """`dsdkit plan --shortlist demo --shortlist-k K`: the same stored shortlist as the library's plan."""
    from dsdkit.runtime.shortlist import Shortlist

    args = ["plan", str(DEMO), str(CAPTIONS), "--model", "demo", "--timesteps", "2", "--chunk-size", str(CHUNK)]
    args += ["--shards", "3", "--out", str(tmp_path / "job"), "--shortlist", "demo", "--shortlist-k", str(K)]
    ran = CliRunner().invoke(app, [*args, "--top-k", "2"])
    assert ran.exit_code == 0, ran.output
    ours, theirs = (json.loads((job / "job.json").read_text()) for job in (tmp_path / "job", done_job))
    assert ours["shortlist"]["spec"] == theirs["shortlist"]["spec"] == {"model": "demo", "k": K, "block_rows": 1024}
    assert ours["shortlist"]["stage"]["per"] == "image" and ours["scoring"] == theirs["scoring"]
    stored = []
    for job in (tmp_path / "job", done_job):
        with np.load(job / "shortlist.npz", allow_pickle=False) as arrays:
            stored.append(Shortlist.from_arrays({key: arrays[key] for key in arrays.files}, "image"))
    np.testing.assert_array_equal(stored[0].candidates, stored[1].candidates)
    np.testing.assert_allclose(stored[0].similarities, stored[1].similarities, atol=1e-6, rtol=0)


def test_a_fused_search_job_merges_to_the_single_fused_search(singles, tmp_path):
    """`shortlist.fuse` is stored with the job's shortlist; the shards score DSD only and `merge` ranks the whole
    job by the fused score, as the single process does (its plain search, fused)."""
    from dsdkit.jobs.shards import merge_job, plan_job

    options = MatchOptions(shortlist=ShortlistSpec(model="demo", k=K, fuse=0.4), per="image", top_k=2)
    folder = tmp_path / "job"
    with one_torch_thread():
        plan_job(DEMO, CAPTIONS, folder, 3, SPEC, options)
    assert json.loads((folder / "job.json").read_text())["shortlist"]["spec"]["fuse"] == 0.4
    _score_all_shards(folder)
    merged = merge_job(folder, tmp_path / "merged.json")
    expected = singles("image").fused(0.4, "image")
    np.testing.assert_allclose(merged.scores, expected.scores, rtol=1e-12, atol=1e-12)  # NaN where not listed
    assert merged.meta["fusion"] == expected.meta["fusion"]
