"""The transfer regime's backbone (issue 21, part 3): `convnet_wide` trained by softmax
classification on a glyph folder's `pretrain` split, saved as a `.weights.h5` file that
`train.py --backbone_weights=FILE` loads into the same backbone.

This is the analogue of the paper's ImageNet-pretrained GoogLeNet: a network that has learned
to read glyphs on characters it will never see again (the pretraining pool is disjoint from the
folder's train / validation / test classes by construction, and `load_dataset` never loads it),
then fine-tuned by a metric loss on a small training set.

    python research/glyphs/pretrain.py --data_dir=GLYPHS --output=RUNS/pretrained.weights.h5

The batches are the project's own (class-balanced P x K, the training augmentation of
`dvml_tf.data.preprocessing`: resize, random crop, no flips), so the pretrained backbone sees
images exactly as the metric runs will. Single-threaded like the study's runs. Writes the
weights atomically and a JSON record next to them (`<output>.json`: steps, final loss and
accuracy, held-out accuracy, CPU and wall seconds). A finished output is never overwritten.
"""

import json
import os
import pathlib
import resource
import sys
import time

import numpy as np
from absl import app
from absl import flags

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "A glyph folder with a pretrain split.")
flags.DEFINE_string("output", None, "The backbone's weights, a .weights.h5 file.")
flags.DEFINE_string("backbone", "convnet_wide", "The backbone (the study's F > J network).")
flags.DEFINE_integer("image_size", 28, "Crop side (the model's input).")
flags.DEFINE_integer("resize_size", 32, "Resize side before the crop.")
flags.DEFINE_integer("steps", 3000, "Training steps.")
flags.DEFINE_integer("classes_per_batch", 64, "P of the P x K batches.")
flags.DEFINE_integer("images_per_class", 2, "K of the P x K batches.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.")
flags.DEFINE_integer("held_out_designs", 1,
                     "Designs (all their copies) of every pretrain class kept out of training "
                     "to measure the classifier's accuracy on unseen instances of seen classes.")
flags.DEFINE_integer("seed", 0, "Initialization, batches and augmentation.")
flags.DEFINE_integer("log_every", 250, "Steps between log lines.")


def pretrain_catalog(data_dir, held_out_designs):
    """The pretrain split as (training catalog, held-out catalog, number of classes).

    Labels are renumbered 0..C-1 (the softmax's classes). The held-out catalog holds, in every
    class, the images of the `held_out_designs` highest design ids (seen classes, unseen
    instances).
    """
    from dvml_tf.data import catalog as catalog_lib
    from dvml_tf.data import glyphs

    arrays = glyphs.read_arrays(data_dir)
    classes = glyphs.split_classes(arrays["manifest"])["pretrain"]
    if len(classes) < 2:
        raise ValueError(f"The glyph folder {data_dir!r} has {len(classes)} pretrain classes; "
                         "build it with --pretrain_classes >= 2.")
    rows = np.flatnonzero(np.isin(arrays["labels"], classes))
    labels = np.searchsorted(classes, arrays["labels"][rows])
    designs = np.asarray(arrays["designs"][rows])
    design_ids = np.unique(designs)
    if held_out_designs >= len(design_ids) - 1:
        raise ValueError(f"--held_out_designs={held_out_designs} leaves fewer than 2 of the "
                         f"{len(design_ids)} designs to train on.")
    held = np.isin(designs, design_ids[len(design_ids) - held_out_designs:]) \
        if held_out_designs else np.zeros(len(rows), bool)
    images = np.asarray(arrays["images"][rows])[..., None]
    train = catalog_lib.ImageCatalog(labels[~held], images=images[~held], num_channels=1,
                                     name="pretrain")
    test = catalog_lib.ImageCatalog(labels[held], images=images[held], num_channels=1,
                                    name="pretrain_held_out") if held.any() else None
    return train, test, len(classes)


def manifest_digest(data_dir):
    """SHA-256 of the folder's manifest: which glyph folder (fonts, characters, splits)."""
    import hashlib

    from dvml_tf.data import glyphs

    return hashlib.sha256(pathlib.Path(data_dir, glyphs.MANIFEST).read_bytes()).hexdigest()


def build_classifier(backbone_name, image_size, num_classes, seed):
    """The backbone (as `train.py` builds it) with a linear softmax head."""
    import keras

    from dvml_tf.models import backbones

    keras.utils.set_random_seed(seed)
    backbone = backbones.build_backbone(backbone_name, input_shape=(image_size, image_size, 3))
    logits = keras.layers.Dense(num_classes, name="softmax_head")(backbone.output)
    return backbone, keras.Model(backbone.input, logits, name="pretrain_classifier")


def accuracy(model, catalog, preprocess, batch_size=256):
    """Top-1 accuracy of the classifier on a catalog (test-time preprocessing)."""
    from dvml_tf.data import pipeline

    correct = 0
    for images, labels in pipeline.make_eval_dataset(catalog, preprocess, batch_size):
        predicted = np.argmax(model(images, training=False).numpy(), axis=1)
        correct += int(np.sum(predicted == labels.numpy()))
    return correct / catalog.num_images


def pretrain(data_dir, output, steps, seed=0, log=print):
    """Trains and saves the backbone; returns the record written next to it."""
    import keras
    import tensorflow as tf

    from dvml_tf.data import pipeline
    from dvml_tf.data import preprocessing
    from dvml_tf.data.sampler import ClassBalancedSampler
    from dvml_tf.utils import atomic

    if not output.endswith(".weights.h5"):
        raise ValueError(f"--output={output!r} must end with .weights.h5 (what Keras's "
                         "load_weights and train.py's --backbone_weights read).")
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; a finished backbone is never overwritten.")
    started, cpu_started = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    train, held_out, num_classes = pretrain_catalog(data_dir, FLAGS.held_out_designs)
    preprocess = preprocessing.PreprocessConfig(resize_size=FLAGS.resize_size,
                                                crop_size=FLAGS.image_size, random_flip=False)
    sampler = ClassBalancedSampler(train.labels, FLAGS.classes_per_batch,
                                   FLAGS.images_per_class, seed=seed)
    dataset = pipeline.make_train_dataset(train, sampler, preprocess, num_steps=steps)
    backbone, model = build_classifier(FLAGS.backbone, FLAGS.image_size, num_classes, seed)
    optimizer = keras.optimizers.Adam(FLAGS.learning_rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables, strict=True))
        hits = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), labels), tf.float32))
        return loss, hits

    window = []
    for index, (images, labels) in enumerate(dataset, start=1):
        loss, hits = step(images, labels)
        window.append((float(loss), float(hits)))
        if index % FLAGS.log_every == 0 or index == steps:
            mean = np.mean(window, axis=0)
            log(f"step {index}/{steps} loss={mean[0]:.4f} batch_accuracy={mean[1]:.4f}")
            last = mean
            window = []
    with atomic.replacing(output, suffix=".weights.h5") as tmp:
        backbone.save_weights(tmp)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "manifest_sha256": manifest_digest(data_dir),
        "classes": num_classes, "train_images": int(train.num_images),
        "held_out_images": int(held_out.num_images) if held_out else 0,
        "backbone": FLAGS.backbone, "image_size": FLAGS.image_size,
        "resize_size": FLAGS.resize_size, "steps": steps,
        "batch": [FLAGS.classes_per_batch, FLAGS.images_per_class],
        "learning_rate": FLAGS.learning_rate, "seed": seed,
        "final_loss": float(last[0]), "final_batch_accuracy": float(last[1]),
        "held_out_accuracy": accuracy(model, held_out, preprocess) if held_out else None,
        "cpu_seconds": round(cpu.ru_utime + cpu.ru_stime
                             - cpu_started.ru_utime - cpu_started.ru_stime, 1),
        "wall_seconds": round(time.time() - started, 1),
    }
    atomic.write_json(output + ".json", record)
    return record


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.data_dir or not FLAGS.output:
        raise app.UsageError("--data_dir and --output are required.")
    if FLAGS.steps < 1:
        raise app.UsageError(f"--steps must be >= 1, got {FLAGS.steps}.")
    import tensorflow as tf

    # Single-threaded, like the study's runs (two side by side on a 2-core machine).
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    record = pretrain(FLAGS.data_dir, FLAGS.output, FLAGS.steps, FLAGS.seed)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    app.run(main)
