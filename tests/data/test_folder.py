"""The folder loader on generated files: every image mode, corrupt files, layouts, bad input."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dvml_tf.data import load_dataset
from dvml_tf.data import make_eval_dataset
from dvml_tf.data.folder import load_folder
from dvml_tf.data.preprocessing import PreprocessConfig

H, W = 24, 40


def pattern(seed):
    """A blocky RGB image (flat 8 x 8 blocks on the JPEG grid keep JPEG errors small)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (H // 8, W // 8, 3), np.uint8)
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1)


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def jpeg(image):
    # 4:4:4 so that colour edges stay sharp and the tolerance can be tight.
    return encode(image, "JPEG", quality=95, subsampling=0)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def gray3(gray):
    return np.repeat(np.asarray(gray)[..., None], 3, -1)


def png16(gray16):
    """A 16-bit grayscale PNG written with PIL's I;16 mode."""
    return encode(Image.fromarray(gray16.astype(np.uint16)), "PNG")


def make_folder(root):
    """Writes six classes of mixed files; returns [(class, file, expected RGB, tolerance)] of the
    decodable ones in catalog order (classes sorted, files sorted) and the list of bad files."""
    expected, bad = [], []

    def add(cls, name, data, reference=None, tol=0):
        path = os.path.join(root, cls, name)
        write(path, data)
        if reference is None:
            bad.append(path)
        else:
            expected.append((cls, name, np.asarray(reference, np.uint8), tol))

    rgb = [Image.fromarray(pattern(s)) for s in range(20)]
    # Train classes (first 3 of 6 sorted): a singleton, JPEG photos, PNG modes.
    add("a_single", "only.png", encode(rgb[0], "PNG"), pattern(0))
    for i in range(3):
        add("b_rgb", f"{i}.jpg", jpeg(rgb[1 + i]), pattern(1 + i), tol=12)
    add("c_png", "1_rgba.png", encode(rgb[4].convert("RGBA"), "PNG"), pattern(4))
    palette = rgb[5].convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    add("c_png", "2_palette.png", encode(palette, "PNG"), palette.convert("RGB"))
    add("c_png", "3_gray.png", encode(rgb[6].convert("L"), "PNG"), gray3(rgb[6].convert("L")))
    gray16 = np.random.default_rng(7).integers(0, 65536, (H, W))
    add("c_png", "4_gray16.png", png16(gray16), gray3(gray16 >> 8))
    add("c_png", "5_la.png", encode(rgb[8].convert("LA"), "PNG"), gray3(rgb[8].convert("L")))
    # Test classes: GIF and BMP variants, JPEG colour modes, and a class with bad files.
    gif = rgb[9].convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    add("d_gif_bmp", "1.gif", encode(gif, "GIF"), gif.convert("RGB"))
    add("d_gif_bmp", "2_24bit.bmp", encode(rgb[10], "BMP"), pattern(10))
    pal_bmp = rgb[11].convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    add("d_gif_bmp", "3_palette.bmp", encode(pal_bmp, "BMP"), pal_bmp.convert("RGB"))
    mono = rgb[12].convert("1")
    add("d_gif_bmp", "4_1bit.bmp", encode(mono, "BMP"), mono.convert("RGB"))
    frames = [rgb[19].convert("P", palette=Image.Palette.ADAPTIVE, colors=32), gif]
    add("d_gif_bmp", "5_animated.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        frames[0].convert("RGB"))
    # TF 2.21 decodes (Adobe) CMYK JPEGs itself; the reference is the RGB the file was made from.
    add("e_jpeg_modes", "1_cmyk.jpg", jpeg(rgb[13].convert("CMYK")), pattern(13), tol=16)
    add("e_jpeg_modes", "2_gray.jpeg", jpeg(rgb[14].convert("L")), gray3(rgb[14].convert("L")),
        tol=12)
    add("e_jpeg_modes", "3_upper.JPG", jpeg(rgb[15]), pattern(15), tol=12)
    full_jpeg = jpeg(rgb[16])
    full_png = encode(rgb[17], "PNG")
    add("f_bad", "1_ok.png", full_png, pattern(17))
    add("f_bad", "2_random.jpg", np.random.default_rng(0).bytes(500))
    add("f_bad", "3_truncated.jpg", full_jpeg[:len(full_jpeg) // 2])
    add("f_bad", "4_truncated.png", full_png[:len(full_png) // 2])
    add("f_bad", "5_empty.png", b"")
    add("f_bad", "6_text.gif", b"GIF89a? not really")
    add("f_bad", "7_ok.bmp", encode(rgb[18], "BMP"), pattern(18))
    write(os.path.join(root, "f_bad", "notes.txt"), b"not an image")
    write(os.path.join(root, "f_bad", "Thumbs.db"), b"\x00" * 10)
    write(os.path.join(root, "b_rgb", ".hidden.jpg"), b"junk")
    return expected, bad


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder"))
    expected, bad = make_folder(root)
    return root, expected, bad


@pytest.fixture(scope="module")
def loaded(mixed_folder):
    return load_folder(mixed_folder[0])


def test_split_and_counts(loaded, mixed_folder):
    _, expected, _ = mixed_folder
    names = ["a_single", "b_rgb", "c_png", "d_gif_bmp", "e_jpeg_modes", "f_bad"]
    assert loaded.train.class_names == tuple(names)
    assert loaded.train.classes.tolist() == [0, 1, 2]
    assert loaded.test.classes.tolist() == [3, 4, 5]
    want = [names.index(cls) for cls, *_ in expected]
    np.testing.assert_array_equal(np.concatenate([loaded.train.labels, loaded.test.labels]), want)
    assert loaded.num_channels == 3 and not loaded.grayscale


def test_every_decodable_mode_gives_the_right_pixels(loaded, mixed_folder):
    _, expected, _ = mixed_folder
    images = [loaded.train.image(i) for i in range(loaded.train.num_images)]
    images += [loaded.test.image(i) for i in range(loaded.test.num_images)]
    assert len(images) == len(expected)
    for image, (cls, name, reference, tol) in zip(images, expected, strict=True):
        assert image.shape == reference.shape, (cls, name)
        error = np.abs(image.astype(int) - reference.astype(int)).max()
        assert error <= tol, f"{cls}/{name}: max error {error} > {tol}"


def test_only_tf_unreadable_files_are_held_as_converted_bytes(loaded):
    test = loaded.test
    assert loaded.train.storage == "files"
    assert test.storage == "mixed"
    paths = [s.decode() for s, p in zip(test.sources.numpy(), test.source_is_path, strict=True)
             if p]
    names = sorted(os.path.basename(p) for p in paths)
    # The palette and 1-bit BMPs went through PIL; everything else is read from disk.
    assert "3_palette.bmp" not in names and "4_1bit.bmp" not in names
    assert "1_cmyk.jpg" in names and "1.gif" in names
    assert (~test.source_is_path).sum() == 2


def test_bad_files_are_skipped_and_logged(mixed_folder, caplog):
    root, expected, bad = mixed_folder
    with caplog.at_level("INFO", logger="absl"):
        splits = load_folder(root)
    assert f"Skipped {len(bad)} unreadable or corrupt image file(s)" in caplog.text
    assert os.path.basename(bad[0]) in caplog.text
    assert "ignored 2 files without an image extension" in caplog.text
    # The skipped files are listed, and every kept image knows its file (also those whose PNG
    # conversion took the place of the path in `sources`).
    assert sorted(splits.unreadable) == sorted(bad)
    paths = [*splits.train.paths.tolist(), *splits.test.paths.tolist()]
    assert paths == [os.path.join(root, cls, name) for cls, name, *_ in expected]


def test_converted_images_flow_through_the_pipeline(loaded):
    config = PreprocessConfig(resize_size=32, crop_size=32, random_flip=False)
    batches = list(make_eval_dataset(loaded.test, config, batch_size=4))
    images = np.concatenate([b[0].numpy() for b in batches])
    assert images.shape == (loaded.test.num_images, 32, 32, 3)
    labels = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(labels, loaded.test.labels)


def test_single_image_class_warns_with_its_name(mixed_folder, caplog):
    with caplog.at_level("WARNING"):
        splits = load_dataset("folder", data_dir=mixed_folder[0])
    assert "'a_single'" in caplog.text and "single image" in caplog.text
    assert splits.train.num_classes == 3


def test_explicit_train_test_layout(tmp_path):
    for split, classes in (("train", ["x", "y"]), ("test", ["z", "a"])):
        for c in classes:
            for i in range(2):
                write(str(tmp_path / split / c / f"{i}.png"),
                      encode(Image.fromarray(pattern(i)), "PNG"))
    splits = load_folder(tmp_path)
    assert splits.train.class_names == ("x", "y", "a", "z")
    assert splits.train.classes.tolist() == [0, 1]
    assert splits.test.classes.tolist() == [2, 3]


def test_validation_classes_come_from_training_classes(tmp_path):
    for c in range(8):
        for i in range(2):
            write(str(tmp_path / f"class{c}" / f"{i}.png"),
                  encode(Image.fromarray(pattern(c * 2 + i)), "PNG"))
    splits = load_dataset("folder", data_dir=str(tmp_path), validation_classes=2, seed=1)
    val, train, test = (set(s.classes.tolist()) for s in (splits.validation, splits.train,
                                                            splits.test))
    assert len(val) == 2 and val <= {0, 1, 2, 3} and not val & train
    assert test == {4, 5, 6, 7}
    again = load_dataset("folder", data_dir=str(tmp_path), validation_classes=2, seed=1)
    assert set(again.validation.classes.tolist()) == val


def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        load_folder(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="is empty"):
        load_folder(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_folder(tmp_path / "file.txt")


def test_fewer_than_two_classes(tmp_path):
    write(str(tmp_path / "only" / "0.png"), encode(Image.fromarray(pattern(0)), "PNG"))
    with pytest.raises(ValueError, match="1 class folder"):
        load_folder(tmp_path)


def test_half_explicit_layout_and_overlapping_splits(tmp_path):
    png = encode(Image.fromarray(pattern(0)), "PNG")
    write(str(tmp_path / "a" / "train" / "x" / "0.png"), png)
    with pytest.raises(ValueError, match="no test/ folder"):
        load_folder(tmp_path / "a")
    write(str(tmp_path / "b" / "train" / "x" / "0.png"), png)
    write(str(tmp_path / "b" / "test" / "x" / "0.png"), png)
    with pytest.raises(ValueError, match="class-disjoint"):
        load_folder(tmp_path / "b")


def test_no_decodable_image(tmp_path):
    for c in ("a", "b"):
        write(str(tmp_path / c / "broken.jpg"), b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="no decodable image"):
        load_folder(tmp_path)


def test_training_split_without_two_usable_classes(tmp_path):
    png = encode(Image.fromarray(pattern(0)), "PNG")
    for c in ("a", "b", "c", "d"):
        write(str(tmp_path / c / "0.png"), png)
    write(str(tmp_path / "c" / "1.png"), png)
    with pytest.raises(ValueError, match=r"only 0 class\(es\) have at least 2 images"):
        load_dataset("folder", data_dir=str(tmp_path))


def test_check_uses_the_pipeline_decoder(tmp_path):
    # A file that passes the check decodes in tf.data (here: every accepted path).
    _, bad = make_folder(str(tmp_path))
    splits = load_folder(tmp_path)
    for catalog in (splits.train, splits.test):
        fetch = catalog.fetch_fn()
        dataset = tf.data.Dataset.range(catalog.num_images).map(
            lambda i, fetch=fetch: tf.shape(fetch(i)))
        assert len(list(dataset)) == catalog.num_images
    assert len(bad) == 5


@pytest.mark.parametrize("image_size", [None, 16])
def test_raw_folder_splits_align_row_by_row_with_the_converted_splits(mixed_folder, image_size):
    root, expected, _ = mixed_folder
    converted = load_dataset("folder", data_dir=root, image_size=image_size)
    raw = load_dataset("folder", data_dir=root, image_size=image_size, raw=True)
    assert raw.raw and raw.raw_form == converted.raw_form
    assert raw.raw_form.resized == (image_size is not None)
    assert raw.raw_form.conversion == "none" and raw.raw_form.raw_size is None
    assert raw.train.storage == "files" and raw.test.storage == "mixed"
    rows = []
    for split in ("train", "test"):
        raw_catalog, catalog = raw.splits()[split], converted.splits()[split]
        np.testing.assert_array_equal(raw_catalog.labels, catalog.labels)
        for i in range(raw_catalog.num_images):
            image = raw_catalog.image(i)
            rows.append(image)
            stored = raw.raw_form.to_stored(image).numpy()
            np.testing.assert_array_equal(stored, catalog.image(i), err_msg=f"{split} row {i}")
    # Raw: the decoded files at their original size, in catalog order.
    assert len(rows) == len(expected)
    for image, (cls, name, reference, tol) in zip(rows, expected, strict=True):
        assert image.shape == reference.shape, (cls, name)
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= tol, (cls, name)


# ------------------------------------------------------------------------- symbolic links


def _tiny_catalogue(root, num_classes=8, per_class=5):
    """Class folders of small PNGs; returns {class: [file names]}."""
    files = {}
    for c in range(num_classes):
        name = f"class_{c:02d}"
        files[name] = [f"{i}.png" for i in range(per_class)]
        for i in range(per_class):
            write(str(root / name / f"{i}.png"),
                  encode(Image.fromarray(pattern(c * per_class + i)), "PNG"))
    return files


def _listed(splits):
    """(class name, decoded image bytes) of every image of the splits, in catalog order."""
    rows = []
    for catalog in (splits.train, splits.test):
        for i in range(catalog.num_images):
            rows.append((catalog.class_name(int(catalog.labels[i])),
                         catalog.image(i).tobytes()))
    return rows


def test_a_link_loop_back_to_the_dataset_folder_lists_every_file_once_under_its_class(
        tmp_path, caplog):
    files = _tiny_catalogue(tmp_path / "data")
    (tmp_path / "data" / "class_03" / "loop").symlink_to("..")
    with caplog.at_level("WARNING"):
        splits = load_folder(tmp_path / "data")
    # Independently: each class's own files, decoded from disk, in sorted order.
    expected = [(name, np.asarray(Image.open(tmp_path / "data" / name / f).convert("RGB"))
                 .tobytes()) for name in sorted(files) for f in files[name]]
    assert splits.train.num_images + splits.test.num_images == 40
    assert _listed(splits) == expected
    # class_03 is a training class (first half) and holds exactly its 5 images.
    assert splits.train.class_counts()[1].tolist() == [5, 5, 5, 5]
    assert "skipped 1 symbolic link" in caplog.text and "class_03/loop" in caplog.text
    assert "leads back to its class folder or above it" in caplog.text
    # The identity of the dataset does not see the link either.
    (tmp_path / "data" / "class_03" / "loop").unlink()
    assert load_folder(tmp_path / "data").identity == splits.identity


def test_two_self_links_in_one_folder_finish_quickly(tmp_path, caplog):
    import threading

    _tiny_catalogue(tmp_path / "data", num_classes=4, per_class=2)
    for link in ("a", "b"):
        (tmp_path / "data" / "class_01" / link).symlink_to(".")
    (tmp_path / "data" / "class_02" / "sub").mkdir()
    (tmp_path / "data" / "class_02" / "sub" / "up").symlink_to("..")
    result = {}

    def load():
        result["splits"] = load_folder(tmp_path / "data")

    with caplog.at_level("WARNING"):
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive(), "listing a folder with self-links did not finish"
    splits = result["splits"]
    assert splits.train.class_counts()[1].tolist() == [2, 2]
    assert splits.test.class_counts()[1].tolist() == [2, 2]
    assert "skipped 3 symbolic link" in caplog.text


def test_links_that_stay_in_their_class_or_come_from_outside_count(tmp_path, caplog):
    files = _tiny_catalogue(tmp_path / "data", num_classes=4, per_class=2)
    store = tmp_path / "store"
    write(str(store / "more" / "x.png"), encode(Image.fromarray(pattern(50)), "PNG"))
    write(str(store / "single.png"), encode(Image.fromarray(pattern(51)), "PNG"))
    data = tmp_path / "data"
    (data / "class_00" / "more").symlink_to(store / "more")          # an external folder
    (data / "class_00" / "z_single.png").symlink_to(store / "single.png")  # an external file
    (data / "class_01" / "nested").mkdir()
    (data / "class_01" / "nested" / "0_copy.png").symlink_to("../1.png")  # same class, same file
    (data / "class_01" / "theirs.png").symlink_to("../class_02/0.png")  # another class's image
    (data / "class_02" / "other").symlink_to("../class_03")  # another class's folder
    (data / "class_03" / "gone.png").symlink_to(tmp_path / "missing.png")  # broken
    (store / "more" / "back").symlink_to(store)  # a loop outside the dataset
    with caplog.at_level("WARNING"):
        splits = load_folder(data)
    counts = dict(zip(splits.train.class_names, np.bincount(
        np.concatenate([splits.train.labels, splits.test.labels])).tolist(), strict=True))
    assert counts == {"class_00": 4, "class_01": 2, "class_02": 2, "class_03": 2}
    rows = _listed(splits)
    pixels = lambda path: np.asarray(Image.open(path).convert("RGB")).tobytes()
    # A folder's files (sorted) come before its sub-folders, as with os.walk.
    assert rows[:4] == [("class_00", pixels(data / "class_00" / f)) for f in files["class_00"]] + [
        ("class_00", pixels(store / "single.png")), ("class_00", pixels(store / "more" / "x.png"))]
    # The image of class_02 linked into class_01 is listed once, under class_02.
    assert [name for name, image in rows if image == pixels(data / "class_02" / "0.png")] == [
        "class_02"]
    # 6: back/single.png and back/more (the loop), theirs.png, 0_copy.png, other, gone.png; the
    # log shows the first 5.
    assert "skipped 6 symbolic link" in caplog.text
    for reason in ("theirs.png -> ", "leads into another class folder", "other -> ",
                   "more is a folder already listed", "0_copy.png is ", "already listed"):
        assert reason in caplog.text, reason


def test_a_class_folder_link_to_the_dataset_folder_is_not_a_class(tmp_path, caplog):
    _tiny_catalogue(tmp_path / "data", num_classes=4, per_class=2)
    (tmp_path / "data" / "0_everything").symlink_to(".")
    (tmp_path / "data" / "class_00_again").symlink_to("class_00")
    with caplog.at_level("WARNING"):
        splits = load_folder(tmp_path / "data")
    assert splits.train.class_names == ("class_00", "class_01", "class_02", "class_03")
    assert "0_everything" in caplog.text and "same folder as class 'class_00'" in caplog.text


def test_images_above_the_pixel_limit_are_skipped_unread(tmp_path, caplog):
    from tests.data.oversized import png_bomb

    for c in ("a", "b", "c"):
        for i in range(2):
            write(str(tmp_path / c / f"{i}.png"),
                  encode(Image.fromarray(pattern(i)[:8, :8]), "PNG"))  # 64 pixels
    write(str(tmp_path / "a" / "bomb.png"), png_bomb())  # 20000 x 20000 in 49 kB
    # 40 x 24 = 960 pixels: a palette BMP (decoded by PIL) and a GIF (decoded by TF).
    small = Image.fromarray(pattern(3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    write(str(tmp_path / "c" / "palette.bmp"), encode(small, "BMP"))
    write(str(tmp_path / "c" / "small.gif"), encode(small, "GIF"))
    with caplog.at_level("INFO", logger="absl"):
        splits = load_folder(tmp_path)
    assert sorted(os.path.basename(p) for p in splits.unreadable) == ["bomb.png"]
    assert ("Skipped 1 image file(s) above the limit of 67108864 pixels (--max_image_pixels; "
            f"they are not decoded): {tmp_path / 'a' / 'bomb.png'} (20000 x 20000)") in caplog.text
    assert splits.train.num_images == 4 and splits.test.num_images == 4
    # A lower limit refuses the 960-pixel files on both decoding paths, and the pipeline's
    # decoder of the catalogs enforces it too.
    splits = load_folder(tmp_path, max_pixels=959)
    assert sorted(os.path.basename(p) for p in splits.unreadable) == [
        "bomb.png", "palette.bmp", "small.gif"]
    assert splits.test.num_images == 2 and splits.test.max_pixels == 959


def test_names_that_are_not_utf8_are_kept_as_their_bytes(tmp_path):
    root = os.fsencode(tmp_path)
    for c, cls in enumerate((b"caf\xe9", b"plain", b"\xff\xfeodd", b"zeta")):
        for i in range(2):
            path = os.path.join(root, cls, b"img\xe9%d.png" % i)
            write(path, encode(Image.fromarray(pattern(2 * c + i)), "PNG"))
    splits = load_dataset("folder", data_dir=str(tmp_path), raw=True)
    # os lists such names with surrogateescape: the original bytes come back with fsencode.
    names = [os.fsencode(name) for name in splits.train.class_names]
    assert names == [b"caf\xe9", b"plain", b"zeta", b"\xff\xfeodd"]
    assert os.fsencode(splits.test.paths[0]) == os.path.join(root, b"zeta", b"img\xe90.png")
    np.testing.assert_array_equal(splits.test.image(0), pattern(6))  # zeta: class 3
    identity = json.loads(json.dumps(splits.identity))  # dataset.json is valid JSON
    assert identity["train"]["caf\udce9"]["images"] == 2
