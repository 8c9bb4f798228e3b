"""The methods of the Omniglot synthesis study as `train.py` flags (research/dvml_omniglot/
synthesis.py): its DVML variants, reference synthesis methods, triplet reductions and the
post-hoc `decoded` variants. A module of its own so that the glyph study
(research/glyphs/study.py) runs the same methods without importing synthesis.py's flags.
"""

# The variance branch made informative, step by step (each adds to the previous one).
GAUSSIAN = ["--dvml", "--variance_scale=1", "--reconstruction=standardized_squares",
            "--detach_variance_heads"]
FREE_BITS = [*GAUSSIAN, "--kl_free_bits=0.1", "--kl_warmup"]
CENTRE = [*FREE_BITS, "--decoder_centre=class_mean"]
TRANSFER = [*CENTRE, "--variance_transfer"]
DVML_VARIANTS = {
    "dvml_paper": ["--dvml", "--variance_scale=1"],
    "dvml_preset": ["--dvml", "--variance_scale=0.1"],
    "dvml_gaussian": GAUSSIAN,
    "dvml_free_bits": FREE_BITS,
    "dvml_centre": CENTRE,
    "dvml_transfer": TRANSFER,
    "dvml_transfer_scaled": [*TRANSFER, "--scale_to_intra_class"],
}
REFERENCE_VARIANTS = {
    "ref_embedding_expansion": ["--nodvml", "--synthesis=embedding_expansion"],
    "ref_symmetrical": ["--nodvml", "--synthesis=symmetrical"],
    "ref_deviation_transfer": ["--nodvml", "--synthesis=deviation_transfer"],
}
VARIANTS = {"baseline": ["--nodvml"], **DVML_VARIANTS, **REFERENCE_VARIANTS}
TRIPLET_REDUCTIONS = {"baseline": ["--nodvml"],
                      "baseline_active": ["--nodvml", "--loss_options=reduction=active"]}

# The post-hoc stage's variants (synthesis.py, `EXPLORATORY`).
EXPLORATORY_VARIANTS = {
    "dvml_decoded": [*CENTRE, "--research_variant=decoded"],
    "dvml_decoded_transfer": [*TRANSFER, "--research_variant=decoded"],
}
