"""The CSV manifest dataset on generated files: columns, labels, splits, query/gallery roles, the
errors for bad manifests, unreadable files, and training and evaluating on a manifest."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dvml_tf import data as data_lib
from dvml_tf.data import manifest
from dvml_tf.training.config import TrainConfig


def image(path, seed=0, size=12):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
    Image.fromarray(pixels).save(path)


def write_csv(path, text):
    path.write_text(text.lstrip())
    return path


@pytest.fixture
def files(tmp_path):
    """img/<class>_<i>.png for classes a..f, 3 images each."""
    for c in "abcdef":
        for i in range(3):
            image(tmp_path / "img" / f"{c}_{i}.png", seed=ord(c) * 10 + i)
    return tmp_path


def rows(classes, split=None, per_class=3, extra=""):
    lines = []
    for c in classes:
        for i in range(per_class):
            fields = [f"img/{c}_{i}.png", c] + ([split] if split else []) + ([extra] if extra
                                                                             else [])
            lines.append(",".join(fields))
    return "\n".join(lines)


def test_split_column_names_and_paths(files):
    path = write_csv(files / "m.csv", "path,label,split,comment\n"
                     + rows("ab", "train", extra="x") + "\n"
                     + rows("c", "validation", extra="y") + "\n"
                     + rows("fe", "TEST", extra="z") + "\n")
    splits = manifest.load_manifest(path)
    assert splits.name == "csv" and splits.unreadable == ()
    # Names are numbered train classes first, then validation, then test, each sorted.
    assert splits.train.class_names == ("a", "b", "c", "e", "f")
    assert splits.train.labels.tolist() == [0] * 3 + [1] * 3
    assert splits.validation.labels.tolist() == [2] * 3
    assert splits.test.labels.tolist() == [4] * 3 + [3] * 3  # manifest order: f then e
    assert splits.test.paths.tolist() == [str(files / "img" / f"{c}_{i}.png")
                                          for c in "fe" for i in range(3)]
    assert splits.test.class_name(4) == "f"
    assert not splits.test.has_query_gallery


def test_integer_labels_are_kept_and_without_a_split_column_half_the_classes_train(files):
    text = "path,label\n" + "\n".join(f"img/{c}_{i}.png,{10 * (ord(c) - 96)}"
                                       for c in "abcde" for i in range(3))
    splits = manifest.load_manifest(write_csv(files / "m.csv", text))
    assert splits.train.class_names is None
    # The folder layout's rule: the first half of the sorted classes (3 of 5) trains.
    assert np.unique(splits.train.labels).tolist() == [10, 20, 30]
    assert np.unique(splits.test.labels).tolist() == [40, 50]


def test_query_and_gallery_columns(files):
    text = ("path,label,split,is_query,is_gallery\n" + rows("ab", "train", extra=",")
            + "\n" + "\n".join(f"img/{c}_{i}.png,{c},test,{int(i == 0)},{'no' if i == 0 else 'yes'}"
                               for c in "cd" for i in range(3)))
    splits = manifest.load_manifest(write_csv(files / "m.csv", text))
    assert splits.test.is_query.tolist() == [True, False, False] * 2
    assert splits.test.is_gallery.tolist() == [False, True, True] * 2
    assert splits.train.is_query is None  # training rows have no role
    subset = splits.test.subset([1, 0])
    assert subset.is_query.tolist() == [False, True]
    assert subset.paths.tolist() == splits.test.paths[[1, 0]].tolist()


@pytest.mark.parametrize(("text", "error", "message"), [
    ("file,label\nimg/a_0.png,a\n", ValueError, r"lacks the column\(s\) \['path'\]"),
    ("path,label\nimg/a_0.png,\nimg/a_1.png,a,extra\n", ValueError,
     r"2 bad row\(s\): line 2: empty label, line 3: 3 fields, the header has 2"),
    ("path,label\nimg/a_0.png,1\nimg/a_1.png,2.5\n", ValueError,
     r"1 numeric label\(s\) are not integers: line 3: 2\.5"),
    ("path,label\nimg/a_0.png,a\nimg/b_0.png,b\n./img/a_0.png,c\n", ValueError,
     r"lists 1 path\(s\) twice: line 4: .*a_0\.png \(also line 2\)"),
    ("path,label\nimg/a_0.png,a\nimg/zz.png,b\nimg/yy.png,c\n", FileNotFoundError,
     r"lists 2 missing file\(s\).*line 3: .*zz\.png, line 4: .*yy\.png"),
    ("path,label,split\nimg/a_0.png,a,train\nimg/b_0.png,b,dev\n", ValueError,
     r"column split must be one of \['train', 'validation', 'test'\]; got line 3: 'dev'"),
    ("path,label,split\nimg/a_0.png,a,train\nimg/a_1.png,a,test\n", ValueError,
     r"classes \['a'\] appear in both the train and the test split"),
    ("path,label,split,is_query\nimg/a_0.png,a,train,\nimg/b_0.png,b,test,maybe\n", ValueError,
     r"column is_query must be 1/0.*line 3: 'maybe'"),
    ("path,label,split,is_query,is_gallery\nimg/a_0.png,a,train,,\nimg/b_0.png,b,test,0,0\n",
     ValueError, r"1 evaluation row\(s\) are neither a query nor in the gallery: line 3"),
    ("path,label,split,is_gallery\nimg/a_0.png,a,train,\nimg/b_0.png,b,test,0\n", ValueError,
     "the test split has 1 query and 0 gallery image"),
    ("path,label\n", ValueError, "has a header but no rows"),
])
def test_bad_manifests_are_clear_errors(files, text, error, message):
    with pytest.raises(error, match=message):
        manifest.load_manifest(write_csv(files / "m.csv", text))


def test_odd_text_is_a_clear_error_naming_the_line(files):
    # An unmatched quote on line 2 swallows the rest of the file into one field.
    text = "path,label\n\"img/a_0.png,a\n" + rows("bcdef") + "\n"
    with pytest.raises(ValueError, match=r"1 bad row\(s\): line 2: a quote \(\"\) opened here is "
                                         r"never closed: it swallows lines 2-17"):
        manifest.load_manifest(write_csv(files / "m.csv", text))
    # ... or, past the csv module's field limit, ends in its error: still named with the line.
    long_text = "path,label\nimg/a_0.png,a\n\"img/b_0.png,b\n" + "x" * 140_000 + "\n"
    with pytest.raises(ValueError, match=r"m2\.csv, line 3: field larger than field limit "
                                         r"\(131072\)\. A field that opens a quote"):
        manifest.load_manifest(write_csv(files / "m2.csv", long_text))
    # A path longer than the limit: the same error, naming its line.
    with pytest.raises(ValueError, match=r"m3\.csv, line 2: field larger than field limit"):
        manifest.load_manifest(write_csv(files / "m3.csv", "path,label\n"
                                         + "a" * 131_073 + ".png,a\n"))
    # Numeric labels beyond 64 bits.
    big = "path,label\nimg/a_0.png,1\nimg/b_0.png,99999999999999999999\nimg/c_0.png,-2\n"
    with pytest.raises(ValueError, match=r"class ids must fit in 64 bits \(\|id\| < 2\^63\); 1 "
                                         r"label\(s\) do not: line 3: 99999999999999999999\. Use "
                                         r"smaller ids, or class names"):
        manifest.load_manifest(write_csv(files / "m4.csv", big))


def test_a_latin1_manifest_is_refused_naming_the_line(files):
    text = ("path,label\n" + rows("abc") + "\nimg/d_0.png,caf\u00e9\n" + rows("ef")).encode(
        "latin-1")
    (files / "latin1.csv").write_bytes(text)
    with pytest.raises(ValueError, match=r"latin1\.csv is not UTF-8 text: line 11 holds the byte "
                                         r"0xe9 \(Latin-1 or another encoding\?\)\. Save it as "
                                         "UTF-8"):
        manifest.load_manifest(files / "latin1.csv")
    # The same text in UTF-8 (with or without a byte-order mark) is read, accents kept.
    (files / "utf8.csv").write_bytes(text.decode("latin-1").encode("utf-8-sig"))
    assert "caf\u00e9" in manifest.load_manifest(files / "utf8.csv").test.class_names


def test_unreadable_files_are_skipped_and_listed(files):
    (files / "img" / "e_1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    splits = manifest.load_manifest(write_csv(files / "m.csv", "path,label\n" + rows("abcdef")))
    assert splits.unreadable == (str(files / "img" / "e_1.png"),)
    assert splits.test.num_images == 3 * 3 - 1


def test_the_csv_dataset_is_registered_with_its_preset_and_checks(files):
    path = write_csv(files / "m.csv", "path,label\n" + rows("abcdef"))
    splits = data_lib.load_dataset("csv", data_dir=path, image_size=16, raw=True)
    assert splits.name == "csv" and splits.raw and splits.test.num_classes == 3
    assert "csv" in data_lib.DATASETS
    with pytest.raises(ValueError, match="dataset=csv needs --data_dir"):
        TrainConfig(dataset="csv").validate()
    with pytest.raises(ValueError, match="has validation rows; validation_classes must"):
        data_lib.load_dataset("csv", data_dir=write_csv(
            files / "v.csv", "path,label,split\n" + rows("ab", "train") + "\n"
            + rows("c", "validation") + "\n" + rows("d", "test")), validation_classes=1)


def test_train_and_evaluate_on_a_manifest_with_query_and_gallery_rows(files, tmp_path):
    from dvml_tf.training import trainer

    text = ("path,label,split,is_query,is_gallery\n" + rows("abcd", "train", extra=",")
            + "\n" + "\n".join(f"img/{c}_{i}.png,{c},test,{int(i < 2)},{int(i >= 1)}"
                               for c in "ef" for i in range(3)))
    path = write_csv(files / "m.csv", text)
    # Held decoded at the training size, the catalog keeps the roles and paths.
    stored = data_lib.load_dataset("csv", data_dir=path, image_size=10)
    assert stored.test.storage == "decoded"
    assert stored.test.is_query.tolist() == [True, True, False] * 2
    assert stored.test.is_gallery.tolist() == [False, True, True] * 2
    assert stored.test.paths.tolist() == [str(files / "img" / f"{c}_{i}.png")
                                          for c in "ef" for i in range(3)]
    config = TrainConfig(config="csv", dataset="csv", data_dir=str(path),
                         model_dir=str(tmp_path / "run"), image_size=8, resize_size=10,
                         embedding_dim=4, num_samples=2, loss="triplet", classes_per_batch=2,
                         images_per_class=2, steps=2, checkpoint_every=2, log_every=1,
                         eval_batch_size=8, recall_ks=(1, 2))
    trainer.Trainer(config, verbose=False).run()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics.pop("dvml_diagnostics", None)
    assert metrics.pop("excluded_queries") == 0  # every query has a same-class gallery image
    # 4 queries (two per test class) search a gallery of 4 (rows 1 and 2 of each class); row 1
    # is both and never finds itself, so every query has one or two same-class gallery images.
    assert set(metrics) == {"nmi", "f1", "recall@1", "recall@2", "map@r"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["recall@2"] >= 0.5  # R@2 of 4 gallery images, 2 of each of 2 classes
