"""One pipeline shared by several threads: calls are serialised (a run loads and releases components, which a
second run must not see half done), and each thread gets the image a call alone gives; two pipelines in two
threads run side by side."""

import threading

import numpy as np

import mlximg

SETTINGS = dict(width=32, height=32, steps=3)


def run_in_threads(pipelines, seeds):
    results, errors = {}, []

    def work(pipeline, seed):
        try:
            results[seed] = np.asarray(pipeline.generate("a handwritten seven", seed=seed, **SETTINGS))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(p, s)) for p, s in zip(pipelines, seeds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_one_pipeline_from_several_threads():
    pipeline = mlximg.load("z-image-digits")
    alone = {seed: np.asarray(pipeline.generate("a handwritten seven", seed=seed, **SETTINGS)) for seed in (1, 2, 3)}
    for _ in range(3):
        shared = run_in_threads([pipeline] * 3, [1, 2, 3])
        for seed, image in alone.items():
            assert np.array_equal(shared[seed], image), f"seed {seed} differs when run beside others"
    assert set(pipeline.tracker.owners()) == {"transformer", "vae"}


def test_two_pipelines_in_two_threads():
    pipelines = [mlximg.load("z-image-digits") for _ in range(2)]
    results = run_in_threads(pipelines, [4, 5])
    assert np.array_equal(results[4], np.asarray(pipelines[0].generate("a handwritten seven", seed=4, **SETTINGS)))
