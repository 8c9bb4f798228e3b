import json
import os
import pathlib
import shutil
import signal

import numpy as np
import pytest
import tensorflow as tf

from dvml_tf.training import trainer
from dvml_tf.training.config import TrainConfig
from tests.training import synthetic


def tiny_config(tmp_path, **changes):
    values = dict(
        dataset="omniglot",
        image_size=12,
        resize_size=12,
        embedding_dim=16,
        num_samples=2,
        classes_per_batch=8,
        images_per_class=2,
        steps=40,
        learning_rate=3e-3,
        log_every=10,
        checkpoint_every=20,
        eval_batch_size=32,
        model_dir=str(tmp_path / "run"),
    )
    values.update(changes)
    return TrainConfig(**values)


# Tests that start from a trained run share one: tracing the training step costs a few CPU
# seconds for each `train` call, far more than the steps of these tiny runs.
INTERRUPTED_STEPS, INTERRUPTED_AT = 8, 4


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run of `tiny_config(steps=8, checkpoint_every=2)` on `synthetic.splits()` stopped after
    step 4, as an interruption leaves it (checkpoints 2 and 4; phase 2 from step 2): its
    `model_dir`, `step`, `phase` and trainable `weights` then. Tests copy it (`copy_of`) before
    resuming, damaging or refusing it."""
    root = tmp_path_factory.mktemp("interrupted")
    config = tiny_config(root, steps=INTERRUPTED_STEPS, checkpoint_every=2)
    run = trainer.Trainer(config, splits=synthetic.splits(), verbose=False)
    run.train(stop_at=INTERRUPTED_AT)
    state = dict(model_dir=root / "run", step=run.step, phase=run.model.phase,
                 weights=[v.numpy() for v in run.model.trainable_variables])
    run.close()
    return state


def copy_of(interrupted_run, model_dir):
    """A copy of the shared interrupted run at `model_dir`."""
    shutil.copytree(interrupted_run["model_dir"], model_dir)
    return model_dir


def test_trains_saves_and_evaluates(tmp_path):
    config = tiny_config(tmp_path, validation_classes=4, eval_every=20)
    splits = synthetic.splits(validation_classes=4)
    handler = signal.getsignal(signal.SIGTERM)
    metrics = trainer.Trainer(config, splits=splits, verbose=False).run()
    assert signal.getsignal(signal.SIGTERM) == handler  # training's SIGTERM handler is gone
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    diagnostics = saved.pop(trainer.DIAGNOSTICS_KEY)
    assert saved.pop("excluded_queries") == 0  # every synthetic class has several images
    assert saved == pytest.approx(metrics)
    assert set(saved) >= {"nmi", "f1", "recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    assert set(diagnostics) >= {"active_units", "kl", "kl_per_dim", "recon", "recon_shuffled",
                                "metric_inv", "metric_syn", "syn_to_inv"}
    assert len(diagnostics["kl_per_dim"]) == config.embedding_dim
    assert sum(diagnostics["kl_per_dim"]) == pytest.approx(diagnostics["kl"], rel=1e-3, abs=1e-4)
    assert 0 <= diagnostics["active_units"] <= config.embedding_dim
    assert all(0.0 <= v <= 1.0 for v in saved.values())
    assert (run / "model.keras").exists()
    assert json.loads((run / "config.json").read_text())["steps"] == 40
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-40")
    event_dirs = {d for d in os.listdir(run / "logs")}
    assert event_dirs == {"train", "validation", "test"}
    # Learnable data: the embedding beats chance (1 / 8 test classes) by far.
    assert saved["recall@1"] > 0.5


def test_resume_continues_at_the_saved_step_and_phase(interrupted_run, tmp_path):
    assert interrupted_run["step"] == 4 and interrupted_run["phase"] == 2
    copy_of(interrupted_run, tmp_path / "run")
    # The same command with more steps: resumes at 4, in phase 2, with the same weights.
    longer = tiny_config(tmp_path, steps=12, checkpoint_every=2)
    resumed = trainer.Trainer(longer, splits=synthetic.splits(), verbose=False)
    assert resumed.step == 4 and resumed.model.phase == 2
    for a, b in zip(interrupted_run["weights"], resumed.model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    resumed.train()
    assert resumed.step == 12


def test_interrupted_run_matches_an_uninterrupted_one(interrupted_run, tmp_path):
    splits = synthetic.splits()
    straight = trainer.Trainer(
        tiny_config(tmp_path / "a", steps=8, checkpoint_every=2), splits=splits, verbose=False
    )
    straight.train()
    # The run stopped after 4 steps (a checkpoint), rerun with the same configuration.
    copy_of(interrupted_run, tmp_path / "b" / "run")
    rest = trainer.Trainer(
        tiny_config(tmp_path / "b", steps=8, checkpoint_every=2), splits=splits, verbose=False
    )
    assert rest.step == 4
    rest.train()
    for a, b in zip(
        straight.model.trainable_variables, rest.model.trainable_variables, strict=True
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_refuses_to_mix_two_configurations_in_one_model_dir(interrupted_run, tmp_path):
    copy_of(interrupted_run, tmp_path / "run")
    with pytest.raises(ValueError, match="different configuration:\n  loss: 'npair'"):
        trainer.Trainer(tiny_config(tmp_path, loss="triplet"), splits=synthetic.splits(),
                        verbose=False)


def test_a_run_that_never_trained_may_start_again_with_other_flags(tmp_path):
    splits = synthetic.splits()
    first = trainer.Trainer(tiny_config(tmp_path, steps=2), splits=splits, verbose=False)
    del first  # built, never trained: no checkpoint
    other = trainer.Trainer(tiny_config(tmp_path, loss="triplet"), splits=splits, verbose=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"] == "triplet"
    assert other.step == 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(interrupted_run, tmp_path):
    copy_of(interrupted_run, tmp_path / "run")
    # Resumed at step 4. Step 5's update makes the weights non-finite (no checkpoint step with
    # checkpoint_every=10); step 6's loss is then non-finite.
    config = tiny_config(tmp_path, steps=10, checkpoint_every=10)
    run = trainer.Trainer(config, splits=synthetic.splits(), verbose=False)
    good = run.manager.latest_checkpoint
    run.optimizer.learning_rate.assign(float("nan"))
    with pytest.raises(trainer.NonFiniteLossError,
                       match=r"Non-finite loss at step 6: .* the last good checkpoint"):
        run.train()
    assert run.manager.latest_checkpoint == good
    reader = tf.train.load_checkpoint(good)
    assert all(
        np.all(np.isfinite(reader.get_tensor(name)))
        for name, _ in tf.train.list_variables(good)
        if "model" in name
    )


def test_non_finite_weights_are_never_checkpointed(interrupted_run, tmp_path):
    copy_of(interrupted_run, tmp_path / "run")  # interrupted: checkpoints step 4
    run = trainer.Trainer(
        tiny_config(tmp_path, steps=10, checkpoint_every=5), splits=synthetic.splits(),
        verbose=False
    )
    good = run.manager.latest_checkpoint
    assert good.endswith("ckpt-4")
    run.optimizer.learning_rate.assign(float("nan"))
    # Step 5's loss is still finite (computed before the update), but its weights are not, and
    # step 5 is a checkpoint step.
    with pytest.raises(trainer.NonFiniteLossError, match="weights became non-finite"):
        run.train(stop_at=5)
    assert run.manager.latest_checkpoint == good
    assert not os.path.exists(good.replace("ckpt-4", "ckpt-5") + ".index")


def test_batch_larger_than_the_classes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        trainer.Trainer(
            tiny_config(tmp_path, classes_per_batch=64), splits=synthetic.splits(), verbose=False
        )


def test_null_control_dvml_with_only_the_invariant_loss_equals_the_baseline(tmp_path):
    """DVML's code path costs nothing by itself: with weights (0, 0, 0, 1) in both phases it
    trains exactly the baseline (same seed, same batches)."""
    splits = synthetic.splits()
    only_inv = (0.0, 0.0, 0.0, 1.0)
    embeddings = []
    for name, changes in (("baseline", {"dvml": False}),
                          ("dvml", {"dvml": True, "phase1_weights": only_inv,
                                    "phase2_weights": only_inv})):
        config = tiny_config(tmp_path / name, steps=12, checkpoint_every=12, **changes)
        run = trainer.Trainer(config, splits=splits, verbose=False)
        run.train()
        images = np.stack([splits.test.image(i) for i in range(8)]).astype(np.float32)
        images = np.repeat(images, 3, axis=-1)
        embeddings.append(run.model(images).numpy())
    np.testing.assert_array_equal(embeddings[0], embeddings[1])


def test_dvml_diagnostics_aggregate_over_the_images_of_the_first_batches(tmp_path):
    splits = synthetic.splits()
    config = tiny_config(tmp_path, steps=10, reconstruction="standardized_squares",
                         detach_variance_heads=True, decoder_centre="class_mean")
    run = trainer.Trainer(config, splits=splits, verbose=False)
    run.train()
    diagnostics = run.variance_diagnostics(num_batches=2)
    assert diagnostics["images"] == 2 * config.batch_size
    # Independently: the posterior means of the same images, in inference mode.
    from dvml_tf import data as data_lib
    from dvml_tf import losses

    dataset = data_lib.make_train_dataset(splits.train, run.sampler, run.preprocess,
                                          num_steps=2)
    images = np.concatenate([images.numpy() for images, _ in dataset])
    features = run.model.backbone(images, training=False)
    mean = run.model.mean_head(features).numpy()
    log_variance = run.model.log_variance_head(features).numpy()
    assert diagnostics["active_units"] == int(np.sum(np.var(mean, axis=0) > 0.01))
    np.testing.assert_allclose(
        diagnostics["kl_per_dim"],
        np.mean(losses.kl_per_dimension(mean, log_variance).numpy(), axis=0), atol=2e-5)


# ----------------------------------------------------------------------------- faults


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(interrupted_run,
                                                                        tmp_path, caplog):
    splits = synthetic.splits()
    config = tiny_config(tmp_path, steps=8, checkpoint_every=2)
    checkpoints = copy_of(interrupted_run, tmp_path / "run") / "checkpoints"  # ckpt-2, ckpt-4
    reader = tf.train.load_checkpoint(str(checkpoints / "ckpt-2"))
    at_step_2 = {name: reader.get_tensor(name) for name, _ in
                 tf.train.list_variables(str(checkpoints / "ckpt-2")) if name.startswith("model/")}
    (data_file,) = [p for p in os.listdir(checkpoints) if p.startswith("ckpt-4.data")]
    _truncate(checkpoints / data_file)
    bad_bytes = (checkpoints / data_file).read_bytes()

    with caplog.at_level("WARNING"):
        resumed = trainer.Trainer(config, splits=splits, verbose=False)
    assert resumed.step == 2
    assert f"{checkpoints}/ckpt-4 cannot be read" in caplog.text
    assert "falling back to the previous one" in caplog.text
    # The weights are step 2's (read back from a checkpoint of the resumed model).
    copy = resumed.checkpoint.write(str(tmp_path / "copy" / "now"))
    now = tf.train.load_checkpoint(copy)
    for name, value in at_step_2.items():
        np.testing.assert_array_equal(now.get_tensor(name), value, err_msg=name)
    # Kept, not deleted: moved out of the way, and out of the state file.
    aside = checkpoints / trainer.UNREADABLE_DIR
    assert (aside / data_file).read_bytes() == bad_bytes
    assert (aside / "ckpt-4.index").exists()
    assert tf.train.latest_checkpoint(str(checkpoints)) == str(checkpoints / "ckpt-2")
    state = (checkpoints / "checkpoint").read_text()
    assert "ckpt-4" not in state and str(tmp_path) not in state  # relative names, as TF writes
    # Training goes on; the new checkpoint of step 4 is a good one, and the old one stays aside.
    resumed.train()
    assert resumed.step == 8
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-8")
    tf.train.load_checkpoint(str(checkpoints / "ckpt-4")).get_tensor(
        "model/step_counter/.ATTRIBUTES/VARIABLE_VALUE")
    assert (aside / data_file).read_bytes() == bad_bytes


def test_no_readable_checkpoint_is_a_clear_error_that_changes_nothing(interrupted_run,
                                                                      tmp_path):
    splits = synthetic.splits()
    config = tiny_config(tmp_path, steps=8, checkpoint_every=2)
    checkpoints = copy_of(interrupted_run, tmp_path / "run") / "checkpoints"  # ckpt-2, ckpt-4
    for name in os.listdir(checkpoints):
        if ".index" in name:
            _truncate(checkpoints / name)
    before = {name: (checkpoints / name).read_bytes() for name in os.listdir(checkpoints)}
    with pytest.raises(ValueError, match=r"No checkpoint in .*checkpoints can be read: .*ckpt-4 "
                                         r"\(.*\); .*ckpt-2 \(.*\)\. Nothing was changed"):
        trainer.Trainer(config, splits=splits, verbose=False)
    assert {name: (checkpoints / name).read_bytes() for name in os.listdir(checkpoints)} == before


def test_resuming_with_fewer_steps_than_trained_is_refused(interrupted_run, tmp_path):
    config_json = (copy_of(interrupted_run, tmp_path / "run") / "config.json").read_text()
    with pytest.raises(ValueError, match=r"has trained 4 steps; --steps=3 would record fewer "
                                         r"steps than were trained\. Rerun with --steps=4"):
        trainer.Trainer(tiny_config(tmp_path, steps=3), splits=synthetic.splits(), verbose=False)
    assert (tmp_path / "run" / "config.json").read_text() == config_json
    assert json.loads(config_json)["steps"] == 8


def test_a_model_dir_that_is_a_file_or_not_writable_is_refused_before_loading(tmp_path,
                                                                           monkeypatch):
    def no_data(config):
        raise AssertionError("the data must not be loaded")

    monkeypatch.setattr(trainer.task, "load_splits", no_data)
    (tmp_path / "file").write_text("a user's file")
    for model_dir, message in ((tmp_path / "file", "is a file, not a folder"),
                               (tmp_path / "file" / "run", "is a file, not a folder")):
        with pytest.raises(ValueError, match=f"--model_dir: .*{message}"):
            trainer.Trainer(tiny_config(tmp_path, model_dir=str(model_dir)), verbose=False)
    assert (tmp_path / "file").read_text() == "a user's file"
    # Tests run as root, who may write anywhere: the permission answer is simulated.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: (
        False if str(path).startswith(str(tmp_path / "locked")) else real_access(path, mode)))
    (tmp_path / "locked").mkdir()
    with pytest.raises(PermissionError, match=r"--model_dir: .*locked is not writable"):
        trainer.Trainer(tiny_config(tmp_path, model_dir=str(tmp_path / "locked" / "run")),
                        verbose=False)
    assert os.listdir(tmp_path / "locked") == []


def test_a_preset_batch_adapts_to_a_small_training_split_and_an_explicit_one_does_not(
        tmp_path, caplog):
    splits = synthetic.splits(train_classes=5, test_classes=4)
    config = tiny_config(tmp_path, classes_per_batch=64, steps=2)
    with pytest.raises(ValueError, match="--classes_per_batch=64 exceeds the 5 training classes "
                                         "with at least 2 images"):
        trainer.Trainer(config, splits=splits, verbose=False)
    with caplog.at_level("WARNING"):
        run = trainer.Trainer(config, splits=splits, verbose=False, adapt_classes_per_batch=True)
    assert run.config.classes_per_batch == 5 and run.sampler.classes_per_batch == 5
    assert "classes_per_batch lowered from 64" in caplog.text and "to 5" in caplog.text
    run.train()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes_per_batch"] == 5
    # The same command resumes (the preset's 64 adapts the same way); a different explicit
    # value is a different configuration.
    assert trainer.Trainer(config, splits=splits, verbose=False,
                           adapt_classes_per_batch=True).step == 2
    with pytest.raises(ValueError, match="classes_per_batch: 5 in"):
        trainer.Trainer(config.replace(classes_per_batch=4), splits=splits, verbose=False)
    # Several replicas: a multiple of their number.
    assert trainer.fit_classes_per_batch(config, splits.train, num_replicas=2) \
        .classes_per_batch == 4


def test_a_resumed_folder_run_must_train_on_the_same_images_wherever_they_are(tmp_path):
    import shutil

    from tests.test_train_cli import write_folder

    data = write_folder(tmp_path / "data")
    config = tiny_config(tmp_path, dataset="folder", data_dir=str(data), image_size=16,
                         resize_size=18, embedding_dim=8, classes_per_batch=4, steps=2,
                         checkpoint_every=2)
    trainer.Trainer(config, verbose=False).train()
    run = tmp_path / "run"
    recorded = json.loads((run / "dataset.json").read_text())
    assert sorted(recorded["train"]) == ["class_0", "class_1", "class_2", "class_3"]
    assert recorded["train"]["class_0"]["images"] == 5
    before = {name: (run / name).read_bytes() for name in ("config.json", "dataset.json")}

    def refused(data_dir, *expected):
        with pytest.raises(ValueError) as error:
            trainer.Trainer(config.replace(data_dir=str(data_dir), steps=3), verbose=False)
        message = str(error.value)
        assert message.startswith(f"model_dir {run} was trained on other data than --data_dir "
                                  f"{str(data_dir)!r}"), message
        assert "start a new run with another --model_dir" in message
        for line in expected:
            assert f"\n  {line}" in message, message
        assert {name: (run / name).read_bytes() for name in before} == before

    renamed = shutil.copytree(data, tmp_path / "renamed")
    os.rename(renamed / "class_5", renamed / "class_9")
    refused(renamed, "test class 'class_5' was renamed to 'class_9'")
    other = shutil.copytree(data, tmp_path / "other")
    os.remove(other / "class_1" / "4.jpg")
    shutil.copy(other / "class_3" / "0.jpg", other / "class_2" / "0.jpg")  # same name, new file
    (other / "class_7" / "extra").mkdir()
    shutil.copy(other / "class_7" / "0.jpg", other / "class_7" / "extra" / "0.jpg")
    refused(other, "train class 'class_1' has 4 images instead of 5",
            "train class 'class_2' holds other files (names or sizes changed)",
            "test class 'class_7' has 6 images instead of 5")
    # The same images moved elsewhere: the run resumes there (the path is a resumable field).
    moved = shutil.move(data, tmp_path / "moved")
    resumed = trainer.Trainer(config.replace(data_dir=str(moved), steps=3), verbose=False)
    assert resumed.step == 2
    assert json.loads((run / "dataset.json").read_text()) == recorded


def folder_bytes(folder):
    """{name: bytes} of the files of a folder (a subfolder's name maps to None)."""
    return {name: pathlib.Path(folder, name).read_bytes()
            if os.path.isfile(os.path.join(folder, name)) else None
            for name in os.listdir(folder)}


def test_a_full_disk_is_a_clear_error_and_the_last_checkpoint_stays(interrupted_run, tmp_path,
                                                                    monkeypatch):
    from dvml_tf.utils import write_errors
    from tests import faults

    splits = synthetic.splits()
    with faults.full_disk(tmp_path / "disk") as disk:
        folder = os.path.join(disk.path, "run")
        copy_of(interrupted_run, folder)
        # Resumed at step 4; the next checkpoint is step 10's, the last.
        config = tiny_config(tmp_path, steps=10, checkpoint_every=10, model_dir=folder)
        run = trainer.Trainer(config, splits=splits, verbose=False)
        checkpoints = os.path.join(folder, "checkpoints")
        before = folder_bytes(checkpoints)
        reason = ("no space left on device" if disk.mounted
                  else "file too large for the file system")
        advice = ("free some space or choose another folder" if disk.mounted
                  else "choose another folder or raise the limit")
        kept = f"The last checkpoint ({checkpoints}/ckpt-4) is intact. To go on, {advice}."
        # Full before training goes on: TensorBoard's event file is refused first.
        disk.fill()
        with pytest.raises(write_errors.WriteFailedError) as failed:
            run.train()
        assert str(failed.value).startswith(f"Cannot write the run's files in {folder}: {reason}")
        assert str(failed.value).endswith(kept)
        disk.free()
        # Full when the checkpoint of step 10 is saved (TensorFlow's SaveV2 op).
        save = run._save_checkpoint

        def save_on_a_full_disk():
            if run.step == 10:
                disk.fill()
            save()

        monkeypatch.setattr(run, "_save_checkpoint", save_on_a_full_disk)
        with pytest.raises(write_errors.WriteFailedError) as failed:
            run.train()
        message = str(failed.value)
        assert message.startswith(f"Cannot write checkpoint ckpt-10 in {checkpoints}: {reason} "
                                  "("), message
        assert "needed). " in message and message.endswith(kept)
        # SaveV2's temporary ckpt-10_temp/ is gone; the checkpoints and the state file are as
        # they were.
        assert folder_bytes(checkpoints) == before
        disk.free()
        run.close()
        resumed = trainer.Trainer(config, splits=splits, verbose=False)
        assert resumed.step == 4
        resumed.run()
        assert resumed.step == 10
        assert not os.path.exists(os.path.join(folder, trainer.RUN_LOCK_FILE))
