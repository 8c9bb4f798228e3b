"""The index builder on a tiny generated catalogue and a tiny export: what it indexes, exactness of
`flat` against a numpy brute force and against the exact evaluation, bad images, shards and
merging, checkpoints and resuming, the output and lock rules."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from dvml_tf import data as data_lib
from dvml_tf.evaluation import metrics as metrics_lib
from dvml_tf.evaluation import runner
from dvml_tf.export import layout
from dvml_tf.index import GalleryIndex
from dvml_tf.index import builder
from dvml_tf.index import evaluation
from dvml_tf.utils import write_errors
from tests.index.catalogue import PER_CLASS


def reference_embeddings(export, split="test"):
    """The split's embeddings through embed_bytes, without the builder (batch of everything)."""
    report = layout.read_version_report(export.version_dir)
    catalog, _ = runner.saved_model_catalog(report, split, data_dir=str(export.manifest))
    signature = runner.load_embed_bytes(export.version_dir)
    embeddings, labels = runner.saved_model_embeddings(signature, catalog, batch_size=1000)
    return embeddings, labels, catalog


def build(export, output, **kwargs):
    kwargs.setdefault("data_dir", str(export.manifest))
    kwargs.setdefault("progress", False)
    return builder.build_index(export.version_dir, output, **kwargs)


def test_flat_index_holds_the_split_and_searches_exactly(catalogue_export, tmp_path):
    result = build(catalogue_export, tmp_path / "I", batch_size=4, chunk_images=6)
    assert result.kind == "index" and result.indexed == 3 * PER_CLASS and not result.failures
    index = GalleryIndex.load(tmp_path / "I")
    embeddings, labels, catalog = reference_embeddings(catalogue_export)
    assert index.ids.tolist() == list(range(len(labels)))  # ids are the split's row numbers
    assert index.get_labels(index.ids).tolist() == labels.tolist()
    info = index.info
    assert info["dataset"] == "csv" and info["split"] == "test"
    assert info["class_names"] == {str(c): f"glyph_{c}" for c in (6, 7, 8)}
    assert [m["path"] for m in index.get_metadata(index.ids)] == catalog.paths.tolist()
    assert index.contract["saved_model"] == os.path.abspath(catalogue_export.version_dir)
    # Exact search: the numpy brute force of cosine similarity, ties to the smaller row.
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    expected = np.lexsort((np.tile(np.arange(len(unit)), (len(unit), 1)), -similarity), axis=1)
    found, scores = index.search(embeddings, k=len(unit))
    assert (found == expected).all()
    np.testing.assert_allclose(scores, np.take_along_axis(similarity, expected, 1), atol=1e-5)


def test_metrics_through_flat_equal_the_exact_evaluation(catalogue_export, tmp_path):
    build(catalogue_export, tmp_path / "I")
    embeddings, labels, _ = reference_embeddings(catalogue_export)
    exact = metrics_lib.evaluate_embeddings(embeddings, labels, recall_ks=(1, 2, 4),
                                            metric="cosine", compute_clustering=False)
    through = evaluation.index_retrieval_metrics(GalleryIndex.load(tmp_path / "I"), embeddings,
                                                 labels, recall_ks=(1, 2, 4))
    assert through == pytest.approx(exact, abs=1e-12)


def test_an_image_that_does_not_decode_is_isolated_and_reported(catalogue_export, tmp_path):
    embeddings, _, catalog = reference_embeddings(catalogue_export)
    sources = [pathlib.Path(p).read_bytes() for p in catalog.paths]
    sources[3] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50  # a PNG header, then garbage
    sources[7] = b"not an image"
    broken = data_lib.ImageCatalog(catalog.labels, sources=sources, source_is_path=False,
                                   name="test", paths=catalog.paths)
    missing = catalog.paths[9] + ".gone"  # a file that disappeared after loading
    broken.source_is_path[9] = True
    broken.sources = data_lib.catalog.host_tensor(
        np.array([*sources[:9], missing.encode(), *sources[10:]], dtype=object))
    plan = {"test": True}
    staging = builder._Staging(str(tmp_path / "staging"), plan, restart=False)
    signature = runner.load_embed_bytes(catalogue_export.version_dir)
    vectors, failures, embedded_now, _ = builder.embed_rows(
        signature, broken, np.arange(len(sources)), staging, 8, batch_size=4, chunk_images=8,
        progress=False)
    assert embedded_now == len(sources)
    assert [f["id"] for f in failures] == [3, 7, 9]
    assert failures[2]["error"].startswith("file disappeared since the dataset was loaded")
    assert failures[2]["path"] == catalog.paths[9]
    assert all(f["error"] for f in failures)
    bad = np.isnan(vectors).any(axis=1)
    assert np.flatnonzero(bad).tolist() == [3, 7, 9]
    # The other images of the failing batches are embedded as they are alone.
    np.testing.assert_allclose(vectors[~bad], embeddings[~bad], atol=1e-5)


def test_files_the_loader_cannot_decode_are_skipped_and_listed(catalogue_export, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(os.path.dirname(catalogue_export.manifest), root)
    (root / "img" / "c7_2.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
    result = build(catalogue_export, tmp_path / "I", data_dir=str(root / "manifest.csv"))
    assert result.indexed == 3 * PER_CLASS - 1
    assert result.unreadable == (str(root / "img" / "c7_2.png"),)
    info = GalleryIndex.load(tmp_path / "I").info
    assert info["unreadable"] == {"count": 1, "first": [str(root / "img" / "c7_2.png")]}


@pytest.mark.parametrize("shard_by", ["range", "modulo"])
def test_shards_merge_into_the_index_of_one_build(catalogue_export, tmp_path, shard_by):
    build(catalogue_export, tmp_path / "whole", backend="flat")
    shards = []
    for i in (2, 0, 1):
        result = build(catalogue_export, tmp_path / f"part{i}", num_shards=3, shard_index=i,
                       shard_by=shard_by)
        assert result.kind == "shard"
        shards.append(tmp_path / f"part{i}")
    _, arrays = builder.read_shard(tmp_path / "part1")
    rows = np.arange(3 * PER_CLASS)
    expected = rows[1::3] if shard_by == "modulo" else np.array_split(rows, 3)[1]
    assert arrays["ids"].tolist() == expected.tolist()
    merged = builder.merge_shards(shards, tmp_path / "merged")
    assert merged.indexed == 3 * PER_CLASS
    whole, joined = GalleryIndex.load(tmp_path / "whole"), GalleryIndex.load(tmp_path / "merged")
    assert joined.ids.tolist() == whole.ids.tolist()
    assert joined.contract == whole.contract
    embeddings, _, _ = reference_embeddings(catalogue_export)
    (ids_a, scores_a), (ids_b, scores_b) = whole.search(embeddings, 5), joined.search(embeddings,
                                                                                        5)
    # The shards embed in other batches, which moves the last float bit of some embeddings.
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-6)
    assert joined.info["shards"] == 3


def test_merge_refuses_incomplete_repeated_or_foreign_shards(catalogue_export, tmp_path):
    for i in range(2):
        build(catalogue_export, tmp_path / f"p{i}", num_shards=2, shard_index=i)
    with pytest.raises(ValueError, match=r"Shard\(s\) \[1\] of 2 are missing"):
        builder.merge_shards([tmp_path / "p0"], tmp_path / "I")
    with pytest.raises(ValueError, match="Shard 0 of 2 is given twice"):
        builder.merge_shards([tmp_path / "p0", tmp_path / "p0", tmp_path / "p1"], tmp_path / "I")
    build(catalogue_export, tmp_path / "v1", num_shards=2, shard_index=1, split="validation")
    with pytest.raises(ValueError, match=r"come from different builds.*split"):
        builder.merge_shards([tmp_path / "p0", tmp_path / "v1"], tmp_path / "I")
    with pytest.raises(FileNotFoundError, match="not a shard"):
        builder.merge_shards([tmp_path / "p0", tmp_path / "nothing"], tmp_path / "I")
    assert not (tmp_path / "I").exists()


def test_an_interrupted_build_resumes_after_its_last_checkpoint(catalogue_export, tmp_path,
                                                                  monkeypatch):
    original = runner.run_embed_bytes
    calls = []

    def interrupted(signature, encoded):
        calls.append(len(encoded))
        if len(calls) == 4:  # in the third chunk: two chunks of 4 images are checkpointed
            raise KeyboardInterrupt
        return original(signature, encoded)

    monkeypatch.setattr(runner, "run_embed_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(catalogue_export, tmp_path / "I", batch_size=2, chunk_images=4)
    staging = builder.staging_path(tmp_path / "I")
    progress = json.loads(pathlib.Path(staging, builder.PROGRESS_FILE).read_text())
    assert [c["count"] for c in progress["chunks"]] == [4]  # the 2nd chunk's 2nd batch failed
    assert not (tmp_path / "I").exists()
    monkeypatch.setattr(runner, "run_embed_bytes", original)
    result = build(catalogue_export, tmp_path / "I", batch_size=2, chunk_images=4)
    assert result.embedded_now == 3 * PER_CLASS - 4
    assert not os.path.exists(staging)  # removed once the index is in place
    build(catalogue_export, tmp_path / "fresh")
    resumed, fresh = GalleryIndex.load(tmp_path / "I"), GalleryIndex.load(tmp_path / "fresh")
    embeddings, _, _ = reference_embeddings(catalogue_export)
    for a, b in zip(resumed.search(embeddings, 4), fresh.search(embeddings, 4), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_checkpoints_of_other_settings_are_refused_unless_restarted(catalogue_export, tmp_path):
    staging = builder.staging_path(tmp_path / "I")
    os.makedirs(staging)
    progress = os.path.join(staging, builder.PROGRESS_FILE)
    with open(progress, "w") as f:  # written by an older index.py: no format, no checksums
        json.dump({"plan": {"split": "train"}, "chunks": []}, f)
    with pytest.raises(ValueError, match=r"by an older index.py, without checksums.*--restart"):
        build(catalogue_export, tmp_path / "I")
    fingerprint = builder.load_model(catalogue_export.version_dir)[2]["fingerprint"]
    with open(progress, "w") as f:
        json.dump({"format": builder.STAGING_FORMAT, "chunks": [],
                   "plan": {"split": "train", "fingerprint": fingerprint}}, f)
    with pytest.raises(ValueError, match=r"interrupted build with other settings.*--restart"):
        build(catalogue_export, tmp_path / "I")
    result = build(catalogue_export, tmp_path / "I", restart=True)
    assert result.indexed == 3 * PER_CLASS
    # A folder that is not ours is never deleted, even with restart.
    stranger = builder.staging_path(tmp_path / "J")
    os.makedirs(stranger)
    (tmp_path / ".J.staging" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="left untouched"):
        build(catalogue_export, tmp_path / "J", restart=True)
    assert (tmp_path / ".J.staging" / "keep.txt").read_text() == "mine"


def test_outputs_are_replaced_only_when_asked_and_foreign_folders_never(catalogue_export,
                                                                        tmp_path):
    build(catalogue_export, tmp_path / "I")
    before = (tmp_path / "I" / "index.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(catalogue_export, tmp_path / "I", backend="hnsw")
    assert (tmp_path / "I" / "index.json").read_bytes() == before
    build(catalogue_export, tmp_path / "I", backend="hnsw", overwrite=True)
    assert GalleryIndex.load(tmp_path / "I").backend == "hnsw"
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not a gallery index or shard; it is left untouched"):
        build(catalogue_export, tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"
    with pytest.raises(ValueError, match="holds an index, not a shard"):
        build(catalogue_export, tmp_path / "I", num_shards=2, overwrite=True)
    with pytest.raises(ValueError, match=r"--shard_index must be in \[0, 2\)"):
        build(catalogue_export, tmp_path / "K", num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="Unknown backend_options"):
        build(catalogue_export, tmp_path / "K", backend="hnsw", backend_options={"nprobe": 3})
    assert not (tmp_path / "K").exists()


def test_the_build_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    # flock locks belong to open file descriptions: a second open in this process conflicts
    # exactly as another process's would (tests/test_index_cli.py does it with processes).
    with builder.build_lock(tmp_path / "I"), pytest.raises(
            builder.BuildLockedError, match=f"pid {os.getpid()}"), builder.build_lock(
            tmp_path / "I"):
        pass
    with builder.build_lock(tmp_path / "I"):  # released
        pass


def test_in_shop_catalogues_index_the_gallery_and_queries_search_it(catalogue_export, tmp_path):
    from tests.index.catalogue import write_catalogue

    manifest, _ = write_catalogue(tmp_path / "shop", roles=lambda split, c, i: (int(i < 2),
                                                                                int(i >= 1)))
    build(catalogue_export, tmp_path / "I", data_dir=str(manifest))
    index = GalleryIndex.load(tmp_path / "I")
    report = layout.read_version_report(catalogue_export.version_dir)
    catalog, _ = runner.saved_model_catalog(report, "test", data_dir=str(manifest))
    assert index.ids.tolist() == np.flatnonzero(catalog.is_gallery).tolist()
    signature = runner.load_embed_bytes(catalogue_export.version_dir)
    embeddings, labels = runner.saved_model_embeddings(signature, catalog)
    exact = metrics_lib.evaluate_embeddings(embeddings, labels, recall_ks=(1, 3),
                                            metric="cosine", compute_clustering=False,
                                            is_query=catalog.is_query,
                                            is_gallery=catalog.is_gallery)
    through = evaluation.index_retrieval_metrics(index, embeddings, labels, (1, 3),
                                                 is_query=catalog.is_query)
    assert through == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="other labels than the split's rows"):
        evaluation.index_retrieval_metrics(index, embeddings, labels[::-1], (1,))


# ------------------------------------------------------------------ checksums, models, overwrite

def flip_byte(path, offset=-3):
    data = bytearray(pathlib.Path(path).read_bytes())
    data[offset] ^= 0x40
    pathlib.Path(path).write_bytes(bytes(data))


def test_a_corrupt_shard_is_refused_before_merging(catalogue_export, tmp_path):
    shards = [tmp_path / f"p{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        build(catalogue_export, shard, num_shards=2, shard_index=i)
    # One flipped bit in an embedding: still a valid .npy file of the right shape.
    flip_byte(shards[1] / "embeddings.npy")
    with pytest.raises(ValueError, match=(
            f"Shard {shards[1]} is corrupt: embeddings.npy differs from the SHA-256 and size "
            r"shard.json recorded when it was written; rebuild it \(index.py build")):
        builder.merge_shards(shards, tmp_path / "I")
    assert not (tmp_path / "I").exists()


def test_shards_of_two_models_are_not_merged(catalogue_export, tmp_path):
    from tests.index.catalogue import export_catalogue_model

    _, other = export_catalogue_model(catalogue_export.manifest, tmp_path / "E2", seed=1)
    build(catalogue_export, tmp_path / "p0", num_shards=2, shard_index=0)
    builder.build_index(other.saved_model_dir, tmp_path / "p1", num_shards=2, shard_index=1,
                        data_dir=str(catalogue_export.manifest), progress=False)
    first = builder.load_model(catalogue_export.version_dir)[2]["fingerprint"]
    second = builder.load_model(other.saved_model_dir)[2]["fingerprint"]
    with pytest.raises(ValueError) as refused:
        builder.merge_shards([tmp_path / "p0", tmp_path / "p1"], tmp_path / "I")
    assert str(refused.value).startswith(
        f"Shards {tmp_path / 'p0'} and {tmp_path / 'p1'} were embedded by different models: "
        f"fingerprint {first} ({os.path.abspath(catalogue_export.version_dir)}) vs {second} "
        f"({other.saved_model_dir}); other weights")
    assert not (tmp_path / "I").exists()


def interrupt_after_first_chunk(monkeypatch, build_call):
    """Runs a build (batches of 2, checkpoints of 4 images) that is interrupted in its second
    chunk, as Ctrl-C would."""
    original, calls = runner.run_embed_bytes, []

    def interrupted(signature, encoded):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(signature, encoded)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "run_embed_bytes", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_call()


def test_a_corrupt_checkpoint_is_embedded_again_when_resuming(catalogue_export, tmp_path,
                                                              monkeypatch, caplog):
    def build_call():
        return build(catalogue_export, tmp_path / "I", batch_size=2, chunk_images=4)

    interrupt_after_first_chunk(monkeypatch, build_call)
    chunk = pathlib.Path(builder.staging_path(tmp_path / "I"), "chunk-000000.npy")
    flip_byte(chunk)
    with caplog.at_level("WARNING"):
        result = build_call()
    assert f"Checkpoint {chunk} is corrupt: its SHA-256 differs" in caplog.text
    assert result.embedded_now == 3 * PER_CLASS  # the corrupt chunk, and everything after it
    build(catalogue_export, tmp_path / "fresh")
    embeddings, _, _ = reference_embeddings(catalogue_export)
    resumed, fresh = GalleryIndex.load(tmp_path / "I"), GalleryIndex.load(tmp_path / "fresh")
    for a, b in zip(resumed.search(embeddings, 4), fresh.search(embeddings, 4), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_image_changed_since_its_checkpoint_is_embedded_again(catalogue_export, tmp_path,
                                                                 monkeypatch, caplog):
    root = tmp_path / "data"
    shutil.copytree(os.path.dirname(catalogue_export.manifest), root)
    manifest = root / "manifest.csv"

    def build_call():
        return build(catalogue_export, tmp_path / "I", batch_size=2, chunk_images=4,
                     data_dir=str(manifest))

    interrupt_after_first_chunk(monkeypatch, build_call)
    # Test row 1 (in the checkpointed first chunk) now holds another class's image.
    shutil.copyfile(root / "img" / "c8_3.png", root / "img" / "c6_1.png")
    with caplog.at_level("WARNING"):
        result = build_call()
    assert "Images of checkpoint" in caplog.text and "(rows 0-3) changed" in caplog.text
    assert result.embedded_now == 3 * PER_CLASS  # the changed chunk again, then the rest
    index = GalleryIndex.load(tmp_path / "I")
    report = layout.read_version_report(catalogue_export.version_dir)
    catalog, _ = runner.saved_model_catalog(report, "test", data_dir=str(manifest))
    signature = runner.load_embed_bytes(catalogue_export.version_dir)
    now, _ = runner.saved_model_embeddings(signature, catalog, batch_size=1000)
    # Row 1 is the new image's embedding (the one of c8_3.png, row 13), not the old one.
    np.testing.assert_allclose(index.search(now[13:14], 2)[1][0], [1.0, 1.0], atol=1e-5)
    assert sorted(index.search(now[13:14], 2)[0][0].tolist()) == [1, 13]


def test_overwrite_replaces_only_what_the_build_wrote(catalogue_export, tmp_path):
    build(catalogue_export, tmp_path / "I")
    (tmp_path / "I" / "README.txt").write_text("how we built this index")
    (tmp_path / "I" / "eval").mkdir()
    (tmp_path / "I" / "eval" / "metrics.json").write_text('{"recall@1": 0.9}')
    build(catalogue_export, tmp_path / "I", backend="hnsw", overwrite=True)
    assert (tmp_path / "I" / "README.txt").read_text() == "how we built this index"
    assert (tmp_path / "I" / "eval" / "metrics.json").read_text() == '{"recall@1": 0.9}'
    index = GalleryIndex.load(tmp_path / "I")
    assert index.backend == "hnsw"
    assert not (tmp_path / "I" / "flat_vectors.npy").exists()  # the old index's own file
    # The same for a shard.
    build(catalogue_export, tmp_path / "S", num_shards=2)
    (tmp_path / "S" / "notes.md").write_text("shard 0 of 2")
    build(catalogue_export, tmp_path / "S", num_shards=2, shard_by="modulo", overwrite=True)
    assert (tmp_path / "S" / "notes.md").read_text() == "shard 0 of 2"
    assert builder.read_shard(tmp_path / "S")[0]["plan"]["shard_by"] == "modulo"
    # No lock, staging or temporary file is left beside the outputs.
    assert sorted(os.listdir(tmp_path)) == ["I", "S"]


def test_a_full_disk_is_a_clear_error_and_the_build_resumes_once_there_is_space(
        catalogue_export, tmp_path, monkeypatch):
    from tests import faults

    with faults.full_disk(tmp_path / "disk") as disk:
        output = os.path.join(disk.path, "I")
        original = GalleryIndex.save

        def save_on_a_full_disk(index, directory, *args, **kwargs):
            disk.fill()  # every image is embedded and checkpointed: now the disk is full
            return original(index, directory, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(GalleryIndex, "save", save_on_a_full_disk)
            with pytest.raises(write_errors.WriteFailedError) as failed:
                build(catalogue_export, output, batch_size=4, chunk_images=8)
        staging = builder.staging_path(output)
        reason = ("no space left on device" if disk.mounted
                  else "file too large for the file system")
        message = str(failed.value)
        assert message.startswith(f"Cannot write the index in {disk.path}: {reason}"), message
        assert message.endswith(f"The images embedded so far stay checkpointed in {staging}: "
                                "run the same command again to resume.")
        # Nothing half-written: no output, no temporary folder, no lock; the checkpoints stay.
        assert sorted(os.listdir(disk.path)) == sorted([".filler", os.path.basename(staging)]
                                                       if disk.mounted
                                                       else [os.path.basename(staging)])
        assert sorted(os.listdir(staging)) == ["chunk-000000.npy", "chunk-000001.npy",
                                               builder.PROGRESS_FILE]
        disk.free()
        result = build(catalogue_export, output, batch_size=4, chunk_images=8)
        assert result.embedded_now == 0 and result.indexed == 3 * PER_CLASS
        assert sorted(os.listdir(disk.path)) == ["I"]


def test_a_read_only_output_folder_is_a_clear_error(catalogue_export, tmp_path, monkeypatch):
    from tests import faults

    folder = tmp_path / "indexes"
    folder.mkdir()
    expected = f"Cannot write the build lock of I in {folder}: "
    with faults.read_only(folder, monkeypatch), pytest.raises(write_errors.WriteFailedError,
                                                              match=expected):
        build(catalogue_export, folder / "I")
    assert os.listdir(folder) == []
