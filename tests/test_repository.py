"""The repository's own contracts: README and CI agree, requirements are pinned, lint is clean."""

import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n.*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md needs a '## Set up' section with a fenced command block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_exactly_two_setup_commands():
    commands = readme_setup_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("python train.py")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    install_and_test = readme_setup_commands()[1].split("&& ", 2)[-1]
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci_script.splitlines(), (install_and_test, ci_script)


def test_requirements_are_pinned():
    for name in ("requirements.txt", "requirements-tfsim.txt", "requirements-serving.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                assert "==" in line, f"{name}: {line!r} is not pinned"


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# A repository path named in code or docs, e.g. `benchmarks/<name>.py`
# (module paths such as `dvml_tf/__init__` may leave out `.py`; `<...>` marks a placeholder).
NAMED_PATH = re.compile(
    r"(?<![\w/.])((?:benchmarks|research|docs|dvml_tf|tests|\.ci)/[\w./<>-]*\w)")


def test_paths_named_in_code_and_docs_exist():
    """Files move (the restructuring moved the studies to research/); their mentions must follow."""
    # The project's own folders only: hidden ones and virtual environments are not walked.
    folders = [folder for folder in ROOT.iterdir() if folder.is_dir()
               and not folder.name.startswith(".") and not (folder / "pyvenv.cfg").exists()]
    files = [*ROOT.glob("*.md"), *ROOT.glob("*.py"),
             *(path for folder in folders for pattern in ("*.md", "*.py")
               for path in folder.rglob(pattern))]
    stale = []
    for path in sorted(files):
        relative = path.relative_to(ROOT)
        for named in NAMED_PATH.findall(path.read_text()):
            if "<" in named or (ROOT / named).exists() or (ROOT / f"{named}.py").exists():
                continue
            stale.append(f"{relative}: {named}")
    assert not stale, "named paths that do not exist:\n" + "\n".join(stale)
