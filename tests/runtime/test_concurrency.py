"""Engines called from many threads at once give their sequential results and compute shared work once.

Every stress test starts its 16 threads on a :class:`threading.Barrier`, so the calls really overlap, and gives them
different shapes (image and caption counts, timestep subsets, configs, batch sizes). Results are compared with the
same jobs run one after another, within the scoring contract's batch-invariance tolerance (fp32 on CPU: 1e-6
relative; a thread's batches are packed differently from a sequential run's). Small images on the micro model keep
the file fast.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from dsdkit.runtime.config import ScoringConfig

from dsdkit.pytorch.scorer import Scorer

THREADS = 16
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square on the grass"]
# The scoring contract's batch invariance, fp32 on CPU: 1e-6 relative (DESIGN.md, "Per-pair and batch-invariant"),
# of the terms a score is made of: LogSumExps and noise errors ‖ε − ε̂‖ ≈ ‖ε‖ = sqrt(C·h·w) (16 at 64 px, 32 at
# 128 px). The denoising term and `uncond` normalisation make a score a small difference of such terms, so scores are
# compared within 1e-6 of the terms' size too: re-batching alone (batch size 1 against 7, one thread) moves this
# file's normalised scores by up to 2.1e-6, i.e. 1.5e-3 relative to a score of 2e-4.
RTOL = 1e-6
ATOL = RTOL * 32


@pytest.fixture(scope="module")
def images(image_factory):
    specs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("red", "square")]
    return [image_factory(color, shape, seed=i) for i, (color, shape) in enumerate(specs + [("blue", "triangle")])]


@pytest.fixture(scope="module")
def micro_model(micro_model_dir):
    from dsdkit.pytorch.models import load_model

    return load_model(micro_model_dir, device="cpu", dtype="fp32")


def in_threads(jobs, run):
    """``run(job)`` for every job, each in its own thread, all released at once; results in job order."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def target(index):
        try:
            barrier.wait()
            results[index] = run(jobs[index])
        except Exception as error:  # noqa: BLE001 - reported below, with every thread's error
            errors.append(f"job {index}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a scoring thread hung"
    assert not errors, f"{len(errors)} of {len(jobs)} concurrent calls failed:\n" + "\n".join(errors)
    return results


def assert_sequential(got, expected):
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"job {index}")


def engine_jobs(images, max_images=4, max_texts=3, step_sets=(None, [0], [2], [0, 2])):
    """Jobs of different shapes for one engine: 1 to ``max_images`` images (overlapping between jobs), 1 to
    ``max_texts`` captions, all timesteps or a subset, through score / score_matrix / score_pairs."""
    jobs = []
    for i in range(THREADS):
        chosen = [images[(i + j) % len(images)] for j in range(1 + i % max_images)]
        texts = [CAPTIONS[(2 * i + j) % len(CAPTIONS)] for j in range(1 + i % max_texts)]
        jobs.append((i % 3, chosen, texts, step_sets[i % len(step_sets)]))
    return jobs


def run_engine_job(engine, job):
    kind, chosen, texts, steps = job
    if kind == 0:
        return engine.score(chosen, texts)
    if kind == 1:
        return engine.score_matrix(chosen, texts, steps=steps).scores
    pairs = [(i, (i + 1) % len(texts)) for i in range(len(chosen))]
    return engine.score_pairs(chosen, texts, pairs, steps=steps).scores


class EvaluationCounter:
    """Counts an engine's primitive calls: work items evaluated, images and captions encoded (thread-safe)."""

    def __init__(self, engine):
        self.lock = threading.Lock()
        self.evaluated = self.images = self.texts = 0
        for name, counter in (
            ("_evaluate", "evaluated"),
            ("_encode_pixel_batch", "images"),
            ("_encode_token_batch", "texts"),
        ):
            self._wrap(engine, name, counter)

    def _wrap(self, engine, name, counter):
        original = getattr(engine, name)

        def counted(batch, *args):
            with self.lock:
                setattr(self, counter, getattr(self, counter) + len(batch))
            return original(batch, *args)

        setattr(engine, name, counted)


SHARED_CONFIG = ScoringConfig.from_preset("discffusion", num_timesteps=3, resolution=64, normalize="uncond")


@pytest.fixture(scope="module")
def sequential(micro_model, images):
    """The shared-scorer jobs run one after another on one scorer: their results and what the scorer computed."""
    scorer = Scorer(micro_model, SHARED_CONFIG, batch_size=3)
    counts = EvaluationCounter(scorer)
    return [run_engine_job(scorer, job) for job in engine_jobs(images)], counts


def test_one_scorer_from_16_threads(micro_model, images, sequential):
    """One scorer, 16 overlapping calls: the sequential scores, and each image, caption and unconditional term
    computed once however many threads need it at the same time."""
    expected, sequential_counts = sequential
    shared = Scorer(micro_model, SHARED_CONFIG, batch_size=3)
    counts = EvaluationCounter(shared)
    got = in_threads(engine_jobs(images), lambda job: run_engine_job(shared, job))
    assert_sequential(got, expected)
    # Pair work is each call's own; the cached work (encodings, the empty caption's terms per image and timestep) is
    # computed by one thread while the others wait for it, exactly as often as in the sequential run.
    assert (counts.images, counts.texts) == (sequential_counts.images, sequential_counts.texts) == (6, 6)
    assert counts.evaluated == sequential_counts.evaluated


def test_one_scorer_from_16_threads_while_evicting(micro_model, images, sequential):
    """A scorer whose image cache holds 2 images evicts what other threads are scoring: each call still gets its
    own encodings and unconditional terms (no KeyError, no half-filled terms)."""
    shared = Scorer(micro_model, SHARED_CONFIG, batch_size=2)
    shared.max_cached_images = 2
    got = in_threads(engine_jobs(images), lambda job: run_engine_job(shared, job))
    assert_sequential(got, sequential[0])
    assert len(shared._images) <= 4  # the last eviction ran after the last insertion


def test_scorers_sharing_a_model_from_16_threads(micro_model, micro_model_dir, images):
    """16 scorers built and called at once on two models, one of them freshly loaded (so installing the processors
    races too): different configs, resolutions, batch sizes and adapters, and scorers that share caches
    (``with_adapter``)."""
    from dsdkit.pytorch.models import load_model
    from tests.conftest import perturbed_adapter

    configs = [
        ScoringConfig.from_preset("discffusion", num_timesteps=2, resolution=64),
        ScoringConfig.from_preset("paper", noise_levels=(0.3, 0.7), resolution=64),
        ScoringConfig.from_preset("discffusion", num_timesteps=1, normalize="uncond", denoise_term=False),
        ScoringConfig.from_preset("discffusion", num_timesteps=2, resolution=128),
    ]

    def scorers(model):
        """Jobs 0, 4 and 12 share one cache of encodings (two with an adapter); job 8 has the adapter alone."""
        adapter = perturbed_adapter(model, configs[0], "kv-prompt")
        base = Scorer(model, configs[0], batch_size=2)

        def make(i):
            if i == 0:
                return base
            if i in (4, 12):
                return base.with_adapter(adapter)
            return Scorer(model, configs[i % 4], batch_size=1 + i % 3, adapter=adapter if i == 8 else None)

        return make

    jobs = [
        (i, [images[(i + j) % len(images)] for j in range(1 + i % 3)], CAPTIONS[i % 3 : i % 3 + 1 + i % 2])
        for i in range(THREADS)
    ]
    expected = [scorers(micro_model)(i).score(chosen, texts) for i, chosen, texts in jobs]

    # Even jobs share one model (and jobs 0, 4, 12 one scorer's caches); odd jobs build plain scorers on a second
    # model that has no processors yet, so eight threads install them at once.
    make = scorers(micro_model)
    bare = load_model(micro_model_dir, device="cpu", dtype="fp32")

    def run(job):
        i, chosen, texts = job
        scorer = make(i) if i % 2 == 0 else Scorer(bare, configs[i % 4], batch_size=1 + i % 3)
        return scorer.score(chosen, texts)

    got = in_threads(jobs, run)
    assert_sequential(got, expected)


def test_processors_are_installed_once_under_a_race(micro_model_dir):
    """16 threads installing dsdkit's processors on one fresh UNet at once replace its processors exactly once."""
    from dsdkit.pytorch.forward import DSDAttnProcessor, install_processors
    from dsdkit.pytorch.models import load_model

    unet = load_model(micro_model_dir, device="cpu", dtype="fp32").unet
    calls = []
    original = unet.set_attn_processor

    def counted(processors):
        calls.append(threading.get_ident())
        threading.Event().wait(0.01)  # widen the window in which a second installer could slip in
        return original(processors)

    unet.set_attn_processor = counted
    names = in_threads(list(range(THREADS)), lambda _: install_processors(unet))
    assert len(calls) == 1
    assert all(n == names[0] for n in names)
    assert all(isinstance(p, DSDAttnProcessor) for p in unet.attn_processors.values())


def test_a_failed_fill_does_not_strand_the_threads_waiting_for_it():
    """The thread computing a cache entry fails while another waits for that entry: the waiter computes it itself
    (no hang, and no error that is not its own), and nothing half-made is cached."""
    from dsdkit.runtime.engine import SharedCache

    cache = SharedCache()
    computing, waiter_registered = threading.Event(), threading.Event()
    outcome = {}

    def failing(keys):
        computing.set()
        waiter_registered.wait(10)
        raise RuntimeError("out of memory")

    def first():
        try:
            cache.fetch(["a"], failing)
        except RuntimeError as error:
            outcome["first"] = str(error)

    def upper(keys):
        # A caller computes its own keys before it waits for the others' (here "a", in flight in the first thread).
        waiter_registered.set()
        return [key.upper() for key in keys]

    thread = threading.Thread(target=first)
    thread.start()
    assert computing.wait(10)
    assert cache.fetch(["a", "b"], upper) == {"a": "A", "b": "B"}
    thread.join(10)
    assert not thread.is_alive()
    assert outcome == {"first": "out of memory"}
    assert dict(cache.items()) == {"a": "A", "b": "B"}


@pytest.fixture(scope="module")
def bundle(export_case):
    return export_case("discffusion")[0]


def test_one_matcher_from_16_threads(bundle, images):
    """One Matcher (ONNX Runtime sessions run concurrently), 16 overlapping calls while its image cache evicts: the
    sequential scores, and each graph's session created once although the first calls race for it."""
    from dsdkit.runtime import Matcher
    from dsdkit.runtime.backends import OrtRunner

    jobs = engine_jobs(images, max_images=3, max_texts=2, step_sets=(None, [0], [1]))
    with Matcher.from_bundle(bundle, backend="onnxruntime", device="cpu", num_timesteps=2, batch_size=3) as matcher:
        expected = [run_engine_job(matcher, job) for job in jobs]
    with Matcher.from_bundle(bundle, backend="onnxruntime", device="cpu", num_timesteps=2, batch_size=3) as matcher:
        matcher.max_cached_images = 2
        sessions = []
        for runner in matcher.runners.values():
            assert isinstance(runner, OrtRunner)
            original = runner._activate

            def counted(original=original, runner=runner):
                sessions.append(runner.path.name)
                threading.Event().wait(0.01)  # a slow session load, so that racing first calls overlap
                original()

            runner._activate = counted
        got = in_threads(jobs, lambda job: run_engine_job(matcher, job))
    assert_sequential(got, expected)
    assert sorted(sessions) == sorted({r.path.name for r in matcher.runners.values()})


def test_the_recompile_guard_survives_overlapping_calls():
    """Compiled calls of two threads overlap without nesting (thread 1's ends while thread 2's runs): the first to end
    must not switch thread 2's guard off, and the setting is as before once both have ended."""
    import torch._dynamo.config as dynamo_config

    from dsdkit.pytorch.acceleration import _no_silent_fallback

    if not hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        pytest.skip("this torch has no fail_on_recompile_limit_hit")
    before = dynamo_config.fail_on_recompile_limit_hit
    second_entered, first_exited = threading.Event(), threading.Event()
    seen = {}

    def first():
        with _no_silent_fallback():
            second_entered.wait(10)
        first_exited.set()

    def second():
        with _no_silent_fallback():
            second_entered.set()
            first_exited.wait(10)
            seen["during"] = dynamo_config.fail_on_recompile_limit_hit

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"during": True}
    assert dynamo_config.fail_on_recompile_limit_hit == before
