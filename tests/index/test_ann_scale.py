"""Smoke test of benchmarks/ann_scale.py at a tiny size (real worker processes)."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_ann_scale",
                                                  ROOT / "benchmarks" / "ann_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ann_scale_rejects_bad_flags():
    ann_scale = _load_script()
    for flags in (["--backends=annoy"], ["--hnsw_options=[1]"], ["--k=0"], ["--num=5", "--k=10"]):
        with pytest.raises(SystemExit):
            ann_scale.main(flags)


@pytest.mark.slow
def test_ann_scale_small_run(tmp_path, capsys):
    ann_scale = _load_script()
    output = tmp_path / "ann_scale.json"
    flags = ["--num=2000", "--queries=50", "--dim=32", '--hnsw_options={"M": 8}',
             f"--work_dir={tmp_path / 'work'}", "--reuse", f"--output={output}"]
    summary = ann_scale.main([*flags, "--sweep"])
    record = json.loads(output.read_text())
    assert record == json.loads(json.dumps(summary))
    assert (record["num"], record["dim"], record["queries"]) == (2000, 32, 50)
    assert record["command"].startswith("python benchmarks/ann_scale.py --num=2000")
    assert record["machine"]["cpu_count"] >= 1 and "faiss" in record["machine"]
    assert set(record["backends"]) == {"flat", "hnsw", "ivf_pq"}
    for name, result in record["backends"].items():
        for key in ("recall@10", "p50_ms", "p99_ms", "queries_per_s", "build_s", "rss_gb"):
            assert result[key] > 0, (name, key)
        assert result["p50_ms"] <= result["p99_ms"] and result["p99_cpu_ms"] > 0
        assert result["serve"]["latency_queries"] == 50
        # The serving process never loaded TensorFlow: its RSS is the index's and numpy/faiss's.
        assert result["serve"]["tensorflow_loaded"] is False
        assert result["rss_gb"] < 1.0
    assert record["backends"]["flat"]["recall@10"] == 1.0  # the exact backend is knn.py
    assert record["backends"]["hnsw"]["options"]["M"] == 8
    assert record["backends"]["hnsw"]["recall@10"] >= 0.9
    sweep = record["backends"]["ivf_pq"]["serve"]["sweep"]
    assert len(sweep) == len(ann_scale.SWEEPS["ivf_pq"])
    assert set(record["goal_met_by"]) <= {"hnsw", "ivf_pq"}
    printed = capsys.readouterr().out
    assert "| backend | recall@10 | p50 ms | p99 ms |" in printed and "| flat | 1.0000 |" in printed
    # --reuse: the next run with the same settings builds nothing and finds the same neighbours.
    again = ann_scale.main([*flags, "--backends=hnsw"])
    printed = capsys.readouterr().out
    assert "Reusing the data" in printed and "hnsw: reusing the index built in" in printed
    assert again["backends"]["hnsw"]["build_s"] == record["backends"]["hnsw"]["build_s"]
    assert again["backends"]["hnsw"]["recall@10"] == record["backends"]["hnsw"]["recall@10"]


def test_quick_runs_never_overwrite_the_committed_full_scale_results():
    ann_scale = _load_script()
    parser = ann_scale.make_parser()
    committed = ROOT / "benchmarks" / "results" / "ann_scale.json"
    assert pathlib.Path(ann_scale.default_output(parser.parse_args([]), parser)) == committed
    assert pathlib.Path(ann_scale.default_output(parser.parse_args(["--sweep"]),
                                                 parser)) == committed
    # The quick command of the script's docstring, exactly as written there.
    (quick,) = [line.split()[2:] for line in ann_scale.__doc__.splitlines()
                if "--num=20000" in line]
    output = ann_scale.default_output(parser.parse_args(quick), parser)
    assert pathlib.Path(output) == committed.with_name("ann_scale_20000x512_200q.json")
    explicit = parser.parse_args([*quick, "--output=elsewhere.json"])
    assert explicit.output == "elsewhere.json"  # main keeps a given --output
