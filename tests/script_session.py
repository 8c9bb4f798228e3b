"""Several command lines of one absl script in one Python process: `ScriptSession`.

Every `python <script>.py` that imports dvml_tf pays TensorFlow's import (7-8 CPU s on the test
machine) before it does anything, though most of the scripts' commands only read and write JSON.
A session imports the script once, in a child process, and then runs each command line as
`python <script>.py ...` would (`app.run(main, argv)`: the flags parsed anew from their defaults,
usage errors, `SystemExit` messages and exit codes as the interpreter gives them), capturing what
the command wrote to its stdout and stderr file descriptors. It can also evaluate an expression
in the script's namespace (its functions and constants, which the tests cannot import into the
test process when the script defines absl flags that other scripts define too).

A session is not a fresh process per command: a script's tests keep at least one plain
`python <script>.py` run somewhere, for what only a real process shows (`__main__`, an exit
code that is not emulated).
"""

import dataclasses
import json
import os
import pathlib
import selectors
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The child: imports the script (defining its flags as running it does), then answers one JSON
# request per line of its stdin on a private copy of its stdout. While a request runs, file
# descriptors 1 and 2 point at temporary files, so that Python's prints, absl's log lines and
# anything a child process writes are captured alike; in between they point at stderr.
_DRIVER = r"""
import importlib.util, json, os, sys, tempfile, traceback
from absl import app, flags

script = sys.argv[1]
spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
if callable(getattr(module, "define_flags", None)):  # scripts that define flags when run
    module.define_flags()
requests = os.fdopen(os.dup(0), "r")
answers = os.fdopen(os.dup(1), "w")
between = os.dup(2)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the commands' child processes read nothing
os.dup2(between, 1)


def exit_code(error):
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)  # as the interpreter does with SystemExit("message")
    return 1


def answer_to(request, stdout, stderr):  # with file descriptors 1 and 2 on stdout, stderr
    answer = {"value": None}
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(stdout.fileno(), 1), os.dup2(stderr.fileno(), 2)
    try:
        if "argv" in request:
            flags.FLAGS.unparse_flags()  # every flag back to its default
            app.run(module.main, argv=[script, *request["argv"]])
        else:
            answer["value"] = eval(request["eval"], {**vars(module), **request["values"]})
        answer["code"] = 0
    except SystemExit as error:
        answer["code"] = exit_code(error)
    except BaseException:
        traceback.print_exc()
        answer["code"] = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(between, 1), os.dup2(between, 2)
    for key, output in (("stdout", stdout), ("stderr", stderr)):
        output.seek(0)
        answer[key] = output.read().decode(errors="replace")
    try:
        return json.dumps(answer)
    except TypeError as error:  # a value that is not JSON
        return json.dumps({**answer, "value": None, "code": 1,
                           "stderr": answer["stderr"] + f"{error}\n"})


for line in requests:
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        answers.write(answer_to(json.loads(line), stdout, stderr) + "\n")
    answers.flush()
"""


@dataclasses.dataclass
class Result:
    """What one command or expression gave: as `subprocess.run`'s, plus the expression's
    value (JSON-decoded)."""

    returncode: int
    stdout: str
    stderr: str
    value: object = None


class ScriptSession:
    """A child process that has imported `script` and runs its command lines on request.

    Args:
        script: the script's path.
        cwd: the child's working directory (the repository's root by default).
        env: the child's environment (this process's by default).
    """

    def __init__(self, script, cwd=ROOT, env=None):
        self.script = str(script)
        # The child's output outside the requests; lives as long as the session.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, self.script], cwd=cwd, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._pending = b""

    def run(self, *argv, timeout=300):
        """Runs `python script *argv` in the session; returns its exit code and output."""
        return self._request({"argv": [str(arg) for arg in argv]}, timeout)

    def evaluate(self, expression, timeout=300, **values):
        """Evaluates `expression` in the script's namespace, with `values` (JSON) as further
        names; its value must be JSON. A `SystemExit` it raises gives the exit code."""
        return self._request({"eval": expression, "values": values}, timeout)

    def close(self):
        """Ends the session: the child exits when its stdin closes."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self._log.close()

    def _request(self, request, timeout):
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    # Its answer would come late, as the next request's: the session ends.
                    self.process.kill()
                    raise TimeoutError(f"{self.script}: no answer to {request} in {timeout} s")
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
                if not chunk:
                    self._log.seek(0)
                    raise RuntimeError(f"{self.script}: the session ended (exit code "
                                       f"{self.process.wait()}):\n"
                                       f"{self._log.read().decode(errors='replace')[-3000:]}")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        answer = json.loads(line)
        return Result(answer["code"], answer["stdout"], answer["stderr"], answer["value"])
