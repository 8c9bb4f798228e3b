"""Does a method beat its baseline over seeds? One rule, shared by the research and the benchmarks.

The rule is the success criterion the Omniglot study fixed before its first run
(research/dvml_omniglot/synthesis.py, `PROTOCOL["success"]`): the gain in the mean over seeds
must exceed twice the larger seed standard deviation of the two methods AND reach a stated
margin. It lives in the library, not in research/, because `benchmarks/default_run.py` applies
it too, and neither `dvml_tf` nor the benchmarks import research code.

The rule's standard deviation is the population one (`np.std`, ddof=0): the spread the study's
tables show next to each mean. The sample standard deviation (ddof=1, larger by sqrt(n / (n - 1)),
1.22 for three seeds) is reported beside it, so that a reader can see whether the choice changes
an outcome; it does not decide.
"""

import numpy as np

# Below two seeds there is no spread to compare a gain with: the rule does not decide.
MIN_SEEDS = 2


def _per_seed(values, name):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty list of per-seed values, got shape "
                         f"{values.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} holds a value that is not finite: {values.tolist()}.")
    return values


def compare_over_seeds(ours, baseline, min_gain):
    """Applies the rule to one metric (higher is better) measured once per seed.

    Args:
        ours: the method's values, one per seed.
        baseline: the baseline's values, one per seed (the counts may differ).
        min_gain: the margin the gain in the mean must reach, in the metric's units
            (the Omniglot study: 0.015, i.e. 1.5 points of Recall@1).

    Returns:
        {"gain": mean(ours) - mean(baseline),
         "twice_larger_std": 2 * max(np.std(ours), np.std(baseline)) (ddof=0),
         "clears_bars": gain > twice_larger_std and gain >= min_gain,
         "twice_larger_sample_std": the same with ddof=1,
         "clears_bars_with_sample_std": the rule with that std}.
        With fewer than MIN_SEEDS values on either side, the two "clears" keys and the sample
        std are None: one seed has no spread, so the rule cannot tell a gain from seed noise.

    Raises:
        ValueError: when a side is empty, not one-dimensional, or holds a non-finite value, or
            when min_gain is negative or not finite.
    """
    ours, baseline = _per_seed(ours, "ours"), _per_seed(baseline, "baseline")
    if not np.isfinite(min_gain) or min_gain < 0:
        raise ValueError(f"min_gain must be a finite margin >= 0, got {min_gain}.")
    gain = float(ours.mean() - baseline.mean())
    noise = 2 * max(float(ours.std()), float(baseline.std()))
    if min(ours.size, baseline.size) < MIN_SEEDS:
        return {"gain": gain, "twice_larger_std": noise, "clears_bars": None,
                "twice_larger_sample_std": None, "clears_bars_with_sample_std": None}
    sample_noise = 2 * max(float(ours.std(ddof=1)), float(baseline.std(ddof=1)))
    return {"gain": gain, "twice_larger_std": noise,
            "clears_bars": bool(gain > noise and gain >= min_gain),
            "twice_larger_sample_std": sample_noise,
            "clears_bars_with_sample_std": bool(gain > sample_noise and gain >= min_gain)}
