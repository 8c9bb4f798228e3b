"""Tests of benchmarks/ann_real.py: its pure functions against independent references, its
output hygiene, and a tiny end-to-end run with the faiss engines (the other engines' libraries
are not requirements of the project, so they are not imported here)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from sklearn.decomposition import PCA

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_script(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ann_real():
    return _load_script("ann_real")


# ------------------------------------------------------------------------------- recall and CI

def _set_recall(found, truth):
    """Independent reference: Python sets, row by row."""
    return np.array([len({int(f) for f in row_f if f >= 0} & {int(t) for t in row_t})
                     / len(row_t) for row_f, row_t in zip(found, truth, strict=True)])


def test_recall_with_ci_on_a_hand_computed_case(ann_real):
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [0, 1, 2, 3]])
    found = np.array([[4, 3, 2, 1], [5, 6, 7, -1], [9, 10, 0, 13], [0, 1, 2, 9]])
    result = ann_real.recall_with_ci(found, truth)  # recalls 1, 0.75, 0.5, 0.75
    assert result["recall"] == pytest.approx(0.75)
    std = np.sqrt((0.25**2 + 0 + 0.25**2 + 0) / 3)  # sample standard deviation
    assert result["std"] == pytest.approx(std)
    half = 1.959964 * std / 2
    assert result["ci95"] == pytest.approx([0.75 - half, 0.75 + half])
    assert result["queries"] == 4
    # Recalls 1, 0.5, 0: the interval is clipped to [0, 1].
    clipped = ann_real.recall_with_ci(found[[0, 2, 2]] * [[1], [1], [0]] - [[0], [0], [1]],
                                      truth[[0, 2, 2]])
    assert clipped["recall"] == pytest.approx(0.5) and clipped["ci95"] == [0.0, 1.0]


def test_recall_matches_sets_with_duplicates_and_padding(ann_real):
    rng = np.random.default_rng(3)
    truth = np.stack([rng.choice(60, 10, replace=False) for _ in range(300)])
    found = rng.integers(-1, 60, size=(300, 10))  # repeats, -1 pads, keys beyond the truth
    found[:50] = truth[:50]  # some exact rows
    result = ann_real.recall_with_ci(found, truth)
    assert result["recall"] == pytest.approx(_set_recall(found, truth).mean(), abs=1e-12)


def test_recall_interval_covers_the_true_recall_about_95_percent_of_the_time(ann_real):
    rng = np.random.default_rng(0)
    truth = np.tile(np.arange(10), (1000, 1))
    misses = np.arange(100, 110)
    covered = 0
    trials = 400
    for _ in range(trials):
        hits = rng.binomial(10, 0.93, size=1000)  # true mean recall 0.93
        found = np.where(np.arange(10)[None, :] < hits[:, None], truth, misses[None, :])
        low, high = ann_real.recall_with_ci(found, truth)["ci95"]
        covered += low <= 0.93 <= high
    assert 0.92 <= covered / trials <= 0.975


def test_recall_rejects_mismatched_shapes(ann_real):
    with pytest.raises(ValueError, match="same Q"):
        ann_real.recall_with_ci(np.zeros((3, 10)), np.zeros((4, 10)))


# ---------------------------------------------------------------------------------- spectrum

def test_pca_spectrum_equals_scikit_learn(ann_real):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 24)) * np.linspace(3, 0.1, 24) @ np.linalg.qr(
        rng.standard_normal((24, 24)))[0]
    expected = PCA(n_components=24).fit(x).explained_variance_ratio_
    np.testing.assert_allclose(ann_real.pca_spectrum(x), expected, rtol=1e-6, atol=1e-12)


def test_components_and_spectrum_distance_on_hand_computed_cases(ann_real):
    spectrum = np.array([0.5, 0.3, 0.15, 0.05])
    assert [ann_real.components_for(spectrum, f) for f in (0.5, 0.8, 0.9, 0.99)] == [1, 2, 3, 4]
    assert ann_real.spectrum_distance(spectrum, spectrum) == 0.0
    # Cumulative curves (1, 1) and (0.5, 1): mean gap 0.25; a shorter curve stays at 1.
    assert ann_real.spectrum_distance([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.25)
    assert ann_real.spectrum_distance([1.0], [0.5, 0.5]) == pytest.approx(0.25)


@pytest.mark.parametrize("latent", [8, 32])
def test_match_latent_dim_recovers_the_generating_dimension(ann_real, latent):
    x, _ = ann_real.synthetic_vectors(4000, 64, latent, seed=1)
    candidates = {d: ann_real.pca_spectrum(ann_real.synthetic_vectors(4000, 64, d, seed=2)[0])
                  for d in (4, 8, 16, 32, 64)}
    best, distances = ann_real.match_latent_dim(ann_real.pca_spectrum(x), candidates)
    assert best == latent
    assert distances[latent] < min(v for d, v in distances.items() if d != latent)


def test_smallest_setting_needs_the_whole_interval_above_the_target(ann_real):
    def point(ef, recall, low):
        return {"setting": {"ef_search": ef}, "recall@10": {"recall": recall, "ci95": [low, 1]}}

    curve = [point(128, 0.99, 0.985), point(16, 0.90, 0.88), point(32, 0.955, 0.945),
             point(64, 0.97, 0.96)]
    assert ann_real.smallest_setting(curve, 10)["setting"] == {"ef_search": 64}
    assert ann_real.smallest_setting(curve[1:3], 10) is None


# ------------------------------------------------------------------------------------ hygiene

def test_default_output_is_a_scratch_file_named_after_the_run(ann_real):
    key = ann_real.run_key("synthetic", 20000, 128, 32)
    assert key == "synthetic_20000x128_latent32"
    assert ann_real.run_key("omniglot", 31460, 128) == "omniglot_31460x128"
    path = ann_real.default_output(key)
    assert path.startswith(tempfile.gettempdir() + os.sep) and key in os.path.basename(path)
    assert str(ROOT) not in path


def test_merge_record_never_replaces_a_run_without_replace(ann_real, tmp_path):
    path = tmp_path / "results.json"
    ann_real.merge_record(str(path), "a", {"x": 1}, replace=False)
    ann_real.merge_record(str(path), "b", {"x": 2}, replace=False)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already holds the run 'a'"):
        ann_real.merge_record(str(path), "a", {"x": 3}, replace=False)
    assert path.read_bytes() == before
    ann_real.merge_record(str(path), "a", {"x": 3}, replace=True)
    assert json.loads(path.read_text())["runs"] == {"a": {"x": 3}, "b": {"x": 2}}
    other = tmp_path / "other.json"
    other.write_text('{"backends": {}}')
    with pytest.raises(ValueError, match="not an ann_real results file"):
        ann_real.merge_record(str(other), "a", {}, replace=True)
    assert other.read_text() == '{"backends": {}}'


def test_concurrent_merges_keep_every_run(tmp_path):
    path = tmp_path / "results.json"
    code = ("import sys; sys.path.insert(0, {bench!r}); import ann_real\n"
            "for i in range(15): ann_real.merge_record({path!r}, f'{{sys.argv[1]}}{{i}}', {{}}, "
            "False)").format(bench=str(ROOT / "benchmarks"), path=str(path))
    procs = [subprocess.Popen([sys.executable, "-c", code, tag]) for tag in ("a", "b")]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    runs = json.loads(path.read_text())["runs"]
    assert sorted(runs) == sorted(f"{tag}{i}" for tag in "ab" for i in range(15))
    assert sorted(os.listdir(tmp_path)) == [".results.json.lock", "results.json"]


def test_bad_flags_and_bad_vector_files_are_named(ann_real, tmp_path, capsys):
    for flags in (["--engines=annoy"], ["--dim=64", "--latent_dim=65"], ["--latent_dim=many"],
                  ["--engine_options=[1]"], ['--engine_options={"annoy": {}}'], ["--repeats=0"]):
        with pytest.raises(SystemExit):
            ann_real.main(flags)
    assert "--repeats must be >= 1" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such file"):
        ann_real.load_vectors(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", vectors=np.ones((3, 4)))
    with pytest.raises(ValueError, match="no 'embeddings' array"):
        ann_real.load_vectors(str(tmp_path / "bad.npz"))
    np.save(tmp_path / "zero.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="zero rows"):
        ann_real.load_vectors(str(tmp_path / "zero.npy"))


# ------------------------------------------------------------------------ the faiss adapters

@pytest.mark.parametrize("name", ["faiss_hnsw_f16", "faiss_hnsw_f32", "faiss_ivf_pq"])
def test_faiss_adapters_find_each_row_save_load_and_delete(name, tmp_path):
    engines = _load_script("ann_engines")
    x, _ = _load_script("ann_real").synthetic_vectors(3000, 32, 16, seed=0)
    engine = engines.ENGINES[name](32, None)
    engine.build(x, threads=1)
    engine.set_search(engine.SWEEP[-1])  # the widest search
    assert (engine.search(x[:200], 5, 1)[:, 0] == np.arange(200)).mean() >= 0.97
    engine.save(str(tmp_path))
    loaded = engines.ENGINES[name].load(str(tmp_path), 32, None)
    loaded.set_search(engine.SWEEP[-1])
    np.testing.assert_array_equal(loaded.search(x[:50], 5, 1), engine.search(x[:50], 5, 1))
    if name.startswith("faiss_hnsw"):
        loaded.remove(np.arange(10))
        assert not np.isin(loaded.search(x[:10], 5, 1), np.arange(10)).any()


@pytest.mark.slow
def test_small_run_records_every_measure_and_refuses_to_overwrite(ann_real, tmp_path, capsys):
    output = tmp_path / "engines.json"
    flags = ["--num=1500", "--dim=32", "--latent_dim=8", "--queries=100",
             "--latency_queries=20", "--repeats=2", "--sweep",
             "--engines=faiss_hnsw_f16,faiss_ivf_pq", f"--work_dir={tmp_path / 'work'}",
             f"--output={output}"]
    ann_real.main(flags)
    record = json.loads(output.read_text())["runs"]["synthetic_1500x32_latent8"]
    assert record["command"].startswith("python benchmarks/ann_real.py --num=1500")
    machine = record["machine"]
    assert machine["packages"]["faiss-cpu"] and len(machine["load_average_1_5_15_before"]) == 3
    assert record["spectrum"]["components_90"] <= 8
    # The exact neighbours are knn.py's; check them against a numpy brute force.
    work = tmp_path / "work"
    gallery, queries = np.load(work / "gallery.npy"), np.load(work / "queries.npy")
    expected = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(np.sort(np.load(work / "truth.npy")), np.sort(expected))
    hnsw = record["engines"]["faiss_hnsw_f16"]
    curve = hnsw["serve"]["curve"]
    efs = [point["setting"]["ef_search"] for point in curve]
    assert efs[0] == 128 and sorted(efs) == [16, 32, 64, 96, 128, 192, 256, 384]
    for point in curve:
        assert len(point["repeats"]) == 2 and point["repeats"][0]["timed_queries"] == 20
        assert point["p50_ms"] <= point["p99_ms"] and point["queries_per_s"] > 0
        low, high = point["recall@10"]["ci95"]
        assert low <= point["recall@10"]["recall"] <= high
    assert curve[0]["recall@10"]["recall"] >= 0.95
    assert hnsw["build"]["delete"]["removed_rows_returned"] == 0
    assert hnsw["serve"]["rss_gb"] >= hnsw["serve"]["rss_before_load_gb"] > 0
    assert hnsw["serve"]["tensorflow_loaded"] is False
    ivf = record["engines"]["faiss_ivf_pq"]
    assert len(ivf["serve"]["curve"]) == 10 and ivf["build"]["delete"]["supported"] is False
    assert "| faiss_hnsw_f16 ef_search 128 |" in capsys.readouterr().out
    before = output.read_bytes()
    with pytest.raises(SystemExit):  # the same run again: refused before any engine is built
        ann_real.main(flags)
    assert output.read_bytes() == before
    # --work_dir: the same settings reuse the data and the build; other data rebuild it.
    rerun = [f for f in flags if f not in ("--sweep", "--engines=faiss_hnsw_f16,faiss_ivf_pq")]
    ann_real.main([*rerun, "--engines=faiss_hnsw_f16", "--replace"])
    printed = capsys.readouterr().out
    assert "Reusing the data" in printed and "faiss_hnsw_f16: reusing the index" in printed
    ann_real.main([*rerun, "--engines=faiss_hnsw_f16", "--num=1400"])
    printed = capsys.readouterr().out
    assert "Reusing" not in printed and "faiss_hnsw_f16: built in" in printed
    # --tables reprints the run's tables and the summary; --plot draws the curves.
    ann_real.main([f"--tables={output}", f"--plot={tmp_path / 'curves.png'}"])
    printed = capsys.readouterr().out
    assert "| synthetic_1500x32_latent8 | faiss_hnsw_f16 ef_search 128 |" in printed
    assert "| synthetic_1400x32_latent8 | faiss_hnsw_f16 ef_search 128 |" in printed
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_real_vectors_are_held_out_and_matched_to_a_latent_dimension(ann_real, tmp_path):
    x, labels = ann_real.synthetic_vectors(1200, 32, 16, seed=5)
    np.savez(tmp_path / "real.npz", embeddings=x * 3.0, labels=labels)  # unnormalised on disk
    ann_real.main([f"--vectors={tmp_path / 'real.npz'}", "--queries=100",
                   "--latency_queries=10", "--repeats=1", "--engines=faiss_hnsw_f16",
                   f"--work_dir={tmp_path / 'work'}", f"--output={tmp_path / 'out.json'}"])
    record = json.loads((tmp_path / "out.json").read_text())["runs"]["real_1100x32"]
    assert record["gallery"] == 1100 and record["queries"] == 100
    assert record["spectrum"]["match"]["best_latent_dim"] == 16
    gallery, queries = np.load(tmp_path / "work" / "gallery.npy"), np.load(
        tmp_path / "work" / "queries.npy")
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    # Held out: no query row is a gallery row.
    assert not (np.abs(queries @ gallery.T - 1.0) < 1e-6).any()
