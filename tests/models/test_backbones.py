import keras
import numpy as np
import pytest

from dvml_tf import models


@pytest.mark.parametrize(
    "name, size, feature_dim",
    [
        ("convnet_small", 28, 128),
        ("convnet_wide", 28, 512),  # F > J = 128: z_I is a bottleneck of f(x)
        ("googlenet", 64, 1024),
        ("resnet50", 32, 2048),
        ("inception_v3", 75, 2048),
        ("mobilenet_v2", 32, 1280),
        ("efficientnet_b0", 32, 1280),
    ],
)
def test_every_backbone_maps_pixels_to_a_pooled_feature(name, size, feature_dim):
    backbone = models.build_backbone(name, input_shape=(size, size, 3))
    assert backbone.output_shape == (None, feature_dim)
    features = backbone(np.full((2, size, size, 3), 128.0, np.float32))
    assert features.shape == (2, feature_dim)
    assert np.all(np.isfinite(features))


def test_googlenet_has_the_inception_v1_layout():
    backbone = models.build_backbone("googlenet")
    names = {layer.name for layer in backbone.layers}
    for module in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"):
        assert f"inception{module}_concat" in names
    assert backbone.get_layer("inception5b_concat").output.shape[-1] == 1024
    assert backbone.get_layer("inception3a_concat").output.shape[-1] == 256


def test_pretrained_googlenet_explains_there_are_no_keras_weights():
    with pytest.raises(ValueError, match="no ImageNet weights for GoogLeNet"):
        models.build_backbone("googlenet", pretrained=True)


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ValueError,
                       match="valid backbones: convnet_small, convnet_wide, googlenet, resnet50"):
        models.build_backbone("vgg16")


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(height, width, 3\)"):
        models.build_backbone("convnet_small", input_shape=(28, 28, 1))


def test_pixel_normalization_matches_the_caffe_convention():
    layer = models.PixelNormalization(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 2.0), bgr=True)
    out = np.asarray(layer(np.array([[[[11.0, 12.0, 13.0]]]], np.float32)))
    np.testing.assert_allclose(out[0, 0, 0], [5.0, 10.0, 10.0])
    clone = models.PixelNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_backbone_weights_file_is_loaded(tmp_path):
    keras.utils.set_random_seed(0)
    source = models.build_backbone("convnet_small")
    path = tmp_path / "convnet.weights.h5"
    source.save_weights(path)
    keras.utils.set_random_seed(1)
    loaded = models.build_backbone("convnet_small", weights_path=str(path))
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), source(x), rtol=1e-6)


@pytest.mark.parametrize("name", ["convnet_small", "mobilenet_v2"])
def test_synchronized_batch_norm_keeps_weights_and_outputs(name):
    keras.utils.set_random_seed(0)
    backbone = models.build_backbone(name, input_shape=(32, 32, 3))
    synced = models.backbones.synchronize_batch_norm(backbone)
    norms = [layer for layer in synced._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.synchronized for layer in norms)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(synced(x, training=False), backbone(x, training=False), rtol=1e-5)
    if name == "convnet_small":
        # Training mode uses batch statistics. Synchronized batch norm computes the variance as
        # E[x^2] - E[x]^2, which cancels badly on MobileNet's 1x1 maps of a 4-image batch, so
        # the tight training-mode comparison is made on the shallow network only.
        np.testing.assert_allclose(synced(x, training=True), backbone(x, training=True),
                                   rtol=1e-4, atol=1e-5)


def offline(monkeypatch, cache):
    """What keras.applications meets without network: urlretrieve fails to resolve the host,
    and nothing is in the (empty) Keras cache."""
    import socket
    import urllib.error

    from keras.src.backend import config
    from keras.src.utils import file_utils

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    monkeypatch.setattr(config, "_KERAS_DIR", str(cache))
    monkeypatch.setenv("KERAS_HOME", str(cache))


def test_pretrained_weights_that_cannot_be_downloaded_say_what_to_do(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path / "keras")
    with pytest.raises(FileNotFoundError) as error:
        models.build_backbone("mobilenet_v2", input_shape=(32, 32, 3), pretrained=True)
    message = str(error.value)
    assert message.startswith("Could not download the ImageNet weights of --backbone="
                              "mobilenet_v2 (keras.applications.MobileNetV2) from https://")
    assert "Temporary failure in name resolution" in message
    assert "--nopretrained" in message and "--backbone_weights=FILE.weights.h5" in message
    file_name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert f"copy {file_name} (downloaded on a machine with network access) into " \
           f"{tmp_path / 'keras' / 'models'}/" in message
    # Not a download problem: Keras's own error passes through.
    with pytest.raises(ValueError, match="input_shape"):
        models.build_backbone("mobilenet_v2", input_shape=(8, 8, 3), pretrained=True)
