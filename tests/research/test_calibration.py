"""research/glyphs/calibration.py: the selection rule, the settings' bookkeeping and the
alternating step timer, on cases whose answer is known (the runs themselves: research/glyphs)."""

from research.glyphs import calibration
from research.glyphs import recipe


def results_with(runs):
    return {"settings": calibration.SETTINGS,
            "runs": {name: {"recall@1": recall, "cpu_seconds": cpu}
                     for name, (recall, cpu) in runs.items()}}


def test_the_rule_picks_the_setting_closest_to_80_within_the_target_and_the_budget():
    results = results_with({"s32_all": (0.964, 630), "s32_d12": (0.919, 576),
                            "s32_d12_a_moderate": (0.861, 576),
                            "s32_d12_a_strong": (0.568, 582)})
    assert calibration.select(results) == "s32_d12_a_moderate"
    # Closer to 80 % but over the 12-minute budget: not eligible.
    results["runs"]["s32_d12_t300"] = {"recall@1": 0.80, "cpu_seconds": 721}
    assert calibration.select(results) == "s32_d12_a_moderate"
    # A measurement-only setting is never selected, however close.
    results["runs"]["s28_d12"] = {"recall@1": 0.80, "cpu_seconds": 470}
    assert calibration.select(results) == "s32_d12_a_moderate"
    # Ties: the smaller images, then fewer training classes.
    results["runs"]["s32_d12_t300"] = {"recall@1": 0.861, "cpu_seconds": 560}
    assert calibration.select(results) == "s32_d12_t300"
    assert calibration.select(results_with({"s32_all": (0.964, 630)})) is None


def test_settings_render_at_32_px_and_share_folders_only_when_their_builds_agree():
    for name, values in calibration.SETTINGS.items():
        assert values["build"]["image_size"] == 32, name
        assert values["train"][-2:] == recipe.size_flags(values["image_size"]), name
        shared = values.get("folder")
        if shared:
            assert calibration.SETTINGS[shared]["build"] == values["build"], name
            assert values["eligible"] is False
    assert not set(calibration.DROPPED) & set(calibration.SETTINGS)
    assert f"--steps={recipe.STEPS}" in recipe.NETWORK
    assert recipe.STEPS_BY_LOSS["npair"] == recipe.STEPS


def test_steppers_alternate_and_the_median_is_per_stepper():
    calls = []

    def stepper(name):
        def step(iterator):
            calls.append(name)
            return {"loss": 0.0}
        return step, None

    # The clock: one unit per step taken so far.
    medians = calibration.median_step_seconds(
        {"a": stepper("a"), "b": stepper("b")}, repeats=3, steps=2, warmup=1,
        clock=lambda: len(calls))
    # Warm-up once each, then a, b alternating 3 times, 2 steps each.
    assert calls == ["a", "b"] + (["a"] * 2 + ["b"] * 2) * 3
    assert medians == {"a": 1.0, "b": 1.0}  # 2 clock units per 2 steps
