"""The user documentation agrees with the code: README's library snippet runs, the flag table of
docs/training.md is the one generated from TrainConfig, every relative link resolves, and no
page names a path of the project's own machines."""

import pathlib
import re

import numpy as np
import pytest

from dvml_tf.training import flags as flags_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL_DOCS = [*USER_DOCS, ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
            *sorted((ROOT / "research").glob("*/README.md"))]


def readme_library_snippet():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Use it as a library\n+```python\n(.*?)```", text, re.S)
    assert block, "README.md needs a '## Use it as a library' section with a python block"
    return block.group(1)


def test_readme_library_snippet_trains_and_the_loss_falls():
    snippet = readme_library_snippet()
    assert "steps_per_epoch=5000" in snippet
    # The same code on a tiny learnable dataset: fewer steps, a few epochs to see the loss.
    snippet = snippet.replace("steps_per_epoch=5000", "steps_per_epoch=12, epochs=4, verbose=0")
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0, 255, (40, 28, 28, 3))

    def batches():
        step = 0
        while True:
            classes = np.random.default_rng(step).choice(40, 16, replace=False)
            labels = np.repeat(classes, 2)
            noise = np.random.default_rng(1000 + step).normal(0, 20, (32, 28, 28, 3))
            yield (np.clip(prototypes[labels] + noise, 0, 255).astype("float32"), labels)
            step += 1

    namespace = {"train_batches": batches(),
                 "test_images": prototypes[:10].astype("float32")}
    exec(snippet, namespace)
    losses = namespace["model"].history.history["loss"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert namespace["embeddings"].shape == (10, 128)


def test_the_flag_table_is_generated_from_train_config():
    text = (ROOT / "docs" / "training.md").read_text()
    table = re.search(r"<!-- flags:start -->\n(.*?)\n<!-- flags:end -->", text, re.S)
    assert table, "docs/training.md needs the <!-- flags:start/end --> markers"
    assert table.group(1) == flags_lib.flags_markdown(), (
        "docs/training.md's flag table is out of date: replace it with the output of "
        "`python -m dvml_tf.training.flags`.")


def _anchors(path):
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: broken link {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: no anchor #{anchor} in {path}"


@pytest.mark.parametrize("page", USER_DOCS, ids=lambda p: p.name)
def test_user_docs_name_no_paths_of_our_machines(page):
    text = page.read_text()
    for pattern in ("../shared", "/work/", "/tmp/", "stack.md"):
        assert pattern not in text, f"{page.name} mentions {pattern}"
