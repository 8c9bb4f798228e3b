"""The recipe shared by the glyph calibration, the premise measurement and the study: one
baseline network and schedule (so that the glyph and Omniglot baselines differ only in their
data), and a folder's build arguments as the builder's `BuildSpec`."""

# The budget's steps (calibration.json `method_cost`, measured before any calibration run): a
# run of at most 12 CPU minutes, single-threaded, of the dearest study method of its loss,
# minus 90 s for start-up, tracing and evaluation, by 50s. N-pair and triplet2 + DWS: DVML
# (dvml_paper) 0.93-0.96 CPU s per step -> 650; triplet: DVML (dvml_transfer) 1.93 s -> 300 (its
# loss on 20 synthesized points per image costs nearly three times the baseline's step).
STEPS = 650
STEPS_BY_LOSS = {"npair": 650, "triplet2_dws": 650, "triplet": 300}
NETWORK = ["--nodvml", "--backbone=convnet_wide", "--embedding_dim=128", "--loss=npair",
           "--classes_per_batch=64", "--images_per_class=2", "--learning_rate=1e-3",
           f"--steps={STEPS}", "--seed=0", "--eval_every=325", "--log_every=50",
           "--checkpoint_every=325"]
# Crop of the training recipe per image size: Omniglot's 32 -> 28, the same 7/8 for the others.
CROPS = {28: 24, 32: 28, 48: 42}


def size_flags(image_size):
    """The resize and crop flags of an image size."""
    return [f"--resize_size={image_size}", f"--image_size={CROPS[image_size]}"]


def build_spec(build, fonts):
    """The builder's `BuildSpec` of a setting's build arguments (calibration.py's `setting()`
    ["build"]: characters, max_characters, image_size, min/max_designs, copies, augmentation,
    splits, seed) and font files or folders."""
    from dvml_tf.data import glyph_builder
    from dvml_tf.data import glyph_render

    return glyph_builder.BuildSpec(
        fonts=tuple(fonts), characters=glyph_builder.parse_characters(build["characters"]),
        characters_text=build["characters"], image_size=build["image_size"],
        min_designs=build["min_designs"], max_designs=build["max_designs"],
        max_characters=build["max_characters"], copies=build["copies"],
        augmentation=glyph_render.AugmentationRange(**build["augmentation"]),
        splits=glyph_builder.SplitSizes(**build["splits"]), seed=build["seed"])
