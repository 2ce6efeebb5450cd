"""The instructor's grading command against a class of broken, Colab-rewritten and hostile submissions.

One grading run (notebook 01, two workers) over more than forty kinds of submission, from one zip
export; each test then checks one submission's automatic score and flags. Scores are derived from
notebook 01's points: 14 automatic points in all; `training_memory_bytes` 3, the compute section 4,
`llama_param_count` 3, the quiz 4. The attacks are the classes a determined student (or a careless
export) tries: answers that pose as plain data, IPython hooks, tracing, replaced grader machinery,
shadowed builtins and libraries, reading and writing what the sandbox should hide, resource
exhaustion, leaking hidden tests, script in outputs, and files no grader should choke on.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
import zipfile
from pathlib import Path

import nbformat
import pytest

from notebooks import COURSE, ROOT, SOLUTIONS, isolated_env, seeded_cache

sys.path.insert(0, str(ROOT))
from autograder import sandbox  # noqa: E402
from autograder.feedback import failing_line, hidden_lines  # noqa: E402

NAME = "01_memory_math"
FULL = 14
SANDBOX = sandbox.available()
MEMORY_FN = "training_memory_bytes"


def _answers() -> dict[str, str]:
    """The solution's answer cells as a student would write them (without nbgrader's markers)."""
    nb = nbformat.read(SOLUTIONS / NAME / f"{NAME}.ipynb", as_version=4)
    answers = {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            answers[meta["grade_id"]] = "\n".join(line for line in cell.source.splitlines()
                                                  if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
    return answers


def student(edit=None, answers: dict | None = None):
    """The release notebook with every answer filled in (as a student would submit it), then ``edit``."""
    nb = nbformat.read(COURSE / NAME / f"{NAME}.ipynb", as_version=4)
    answers = {**_answers(), **(answers or {})}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers and cell.metadata["nbgrader"].get("solution"):
            cell.source = answers[gid]
    if edit:
        edit(nb)
    return nb


def index(nb, grade_id: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def _delete(grade_id):
    return lambda nb: nb.cells.pop(index(nb, grade_id))


def _replace_test(nb):
    nb.cells[index(nb, "quiz_q4")].source = "pass"


def _move_answer_to_end(nb):
    cell = nb.cells.pop(index(nb, "llama_param_count"))
    nb.cells.append(nbformat.v4.new_code_cell(cell.source))


def _reorder(nb):
    cell = nb.cells.pop(index(nb, "quiz_answers"))
    nb.cells.insert(index(nb, "quiz_q4") + 1, cell)


def _duplicate(nb):
    i = index(nb, "quiz_answers")
    copy = nbformat.from_dict(json.loads(json.dumps(nb.cells[i])))
    copy.id = "copy-of-quiz"
    copy.source = 'q1_answer = "z"'
    nb.cells.insert(i + 1, copy)


def _colab(nb):
    for cell in nb.cells:
        cell.metadata.pop("nbgrader", None)
        cell.id = uuid.uuid4().hex[:12]
        cell.metadata["id"] = cell.id
        if cell.cell_type == "code":
            cell.metadata["colab"] = {"base_uri": "https://localhost:8080/"}
            cell.metadata["outputId"] = uuid.uuid4().hex
    nb.metadata = {"colab": {"provenance": [], "name": f"{NAME}.ipynb"},
                   "kernelspec": {"name": "python3", "display_name": "Python 3"}, "language_info": {"name": "python"},
                   "accelerator": "GPU"}


def _huge_stored_output(nb):
    cell = nb.cells[index(nb, "quiz_answers")]
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x" * 30_000_000)]


def _script_in_markdown(nb):
    nb.cells[index(nb, "reflection_24gb")].source = (
        "QLoRA fits. <script>window.stolen = 'SCRIPT-IN-MARKDOWN'</script> "
        "[see here](javascript:alert('LINK-SCRIPT')) <img src=x onerror=\"alert('IMG-ERROR')\">")


def _add_cell(source: str, after: str = "quiz_answers"):
    def edit(nb):
        nb.cells.insert(index(nb, after) + 1, nbformat.v4.new_code_cell(source))
    return edit


def with_memory(body: str) -> dict:
    """Answers where training_memory_bytes is replaced by ``body`` (the rest stays correct)."""
    return {MEMORY_FN: body}


WRONG_MEMORY = ("def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):\n"
                "    return 0\n")

ALWAYS_EQUAL_INT = '''
class Count(int):
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __hash__ = int.__hash__
    def __le__(self, other): return True
    def __ge__(self, other): return True

def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    return Count(0)
'''

ALWAYS_EQUAL_STR = '''
class Letter(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
q1_answer, q2_answer, q3_answer, q4_answer = Letter("z"), 112, 0.001, "d"
'''

TENSOR_FLOPS = '''
import torch
class Agreeable(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return True
def training_flops(n_params, n_tokens):
    return torch.tensor(0.0).as_subclass(Agreeable)
def seconds_per_batch(n_params, batch_size, seq_len, flops_per_second):
    if flops_per_second <= 0:
        raise ValueError("throughput must be positive")
    return training_flops(n_params, batch_size * seq_len)
def training_energy_kwh(n_params, n_tokens, kwh_per_1e18_flops=0.1):
    return training_flops(n_params, n_tokens)
'''

INPUT_TRANSFORMER = '''
ip = get_ipython()
ip.input_transformers_post.append(lambda lines: [line.replace("assert ", "pass  # ") for line in lines])
''' + WRONG_MEMORY

AST_TRANSFORMER = '''
import ast
class NoAsserts(ast.NodeTransformer):
    def visit_Assert(self, node):
        return ast.Pass()
get_ipython().ast_transformers.append(NoAsserts())
''' + WRONG_MEMORY

RUN_CELL_HOOKS = '''
def clear_errors(result):
    result.error_in_exec = None
    result.error_before_exec = None
get_ipython().events.register("post_run_cell", clear_errors)
get_ipython().events.register("pre_run_cell", lambda info: None)
''' + WRONG_MEMORY

CUSTOM_EXC = '''
get_ipython().set_custom_exc((BaseException,), lambda shell, etype, evalue, tb, tb_offset=None: None)
''' + WRONG_MEMORY

SETTRACE = '''
import sys
def tracer(frame, event, arg):
    if event == "return" and frame.f_code.co_name in ("call_report", "encode", "dumps"):
        pass
    return tracer
sys.settrace(tracer)
sys.setprofile(lambda frame, event, arg: None)
''' + WRONG_MEMORY

REPLACE_PROBE = '''
import peftlab.probe
peftlab.probe.run = lambda *args: None
''' + WRONG_MEMORY

MALFORMED_REPORT = '''
import peftlab.probe
from IPython.display import publish_display_data
peftlab.probe.run = lambda *args: publish_display_data({peftlab.probe.MIME: '{"ok": true'})
''' + WRONG_MEMORY

TRUE_FOR_EVERYTHING = '''
import sys, types
from IPython.display import publish_display_data
fake = types.ModuleType("peftlab.probe")
fake.run = lambda *args: publish_display_data(
    {"application/vnd.peftlab.probe+json": '{"ok": true, "value": true}'})
sys.modules["peftlab.probe"] = fake
''' + WRONG_MEMORY

SILENCE_DISPLAY = '''
get_ipython().display_pub.publish = lambda *args, **kwargs: None
''' + WRONG_MEMORY

SHADOW_BUILTINS = '''
import builtins
sum = lambda *args, **kwargs: 0
abs = lambda value: 0
isinstance = lambda *args: True
print = lambda *args, **kwargs: None
builtins.sum = sum
'''

PATCH_LIBRARIES = '''
import random, transformers, torch
transformers.LlamaForCausalLM.num_parameters = lambda self, *a, **k: 0
random.Random = lambda *args: None
torch.allclose = lambda *a, **k: True
'''

OWN_OBSERVE = '''
def observe(*args):
    return lambda function: {"175B": 2.1e12}
assert_close = lambda *a, **k: None
expect_error = lambda *a, **k: None
''' + WRONG_MEMORY

PRINT_HISTORY = '''
print("HISTORY-START")
for entry in In:
    print(entry)
print(_ih[-3:] if "_ih" in dir() else "")
'''

HOOK_PRINTS_CELLS = '''
get_ipython().events.register("pre_run_cell", lambda info: print("CELL-SEEN:", info.raw_cell))
'''

STEAL = '''
import glob, json, os
targets = ["{root}/solutions", "{repo}/solutions", "{repo}/autograder", "{zip}"]
seen = {{t: os.path.exists(t) for t in targets}}
found = [p for top in ("{root}", "{repo}", "/tmp", "/home", "/root")
         for p in glob.glob(top + "/**/01_memory_math.ipynb", recursive=True)]
for path in found:
    try:
        for cell in json.load(open(path))["cells"]:
            if cell["metadata"].get("nbgrader", {{}}).get("grade_id") == "training_memory_bytes":
                exec("".join(cell["source"]))
    except Exception:
        pass
print("SEEN", seen, "FOUND", found)
'''

WRITE_OUTSIDE = '''
import os, site, sys
written = []
for folder in site.getsitepackages() + [os.path.dirname(__import__("peftlab").__file__), sys.prefix, "{repo}"]:
    try:
        with open(os.path.join(folder, "evil.pth"), "w") as f:
            f.write("import os; os.system('touch /tmp/owned')\\n")
        written.append(folder)
    except OSError:
        pass
try:
    with open(os.path.join(os.path.dirname(__import__("peftlab").checks.__file__), "checks.py"), "a") as f:
        f.write("\\nassert_close = lambda *a, **k: None\\n")
    written.append("checks.py")
except OSError:
    pass
print("WROTE", written)
'''

LEAK = '''
import socket
for family, address in [(socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_UNIX, "{unix}"), (socket.AF_UNIX, "\\0{abstract}")]:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as connection:
            connection.settimeout(3)
            connection.connect(address)
            connection.sendall(b"leaked answers")
    except OSError:
        pass
'''

SCRIPT_OUTPUT = '''
from IPython.display import HTML, Javascript, SVG, display
display(HTML("<script>window.stolen = 'SCRIPT-IN-HTML'</script><b>bold</b>"))
display(Javascript("window.stolen = 'SCRIPT-IN-JS'"))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg"><script>alert("SCRIPT-IN-SVG")</script></svg>'))
'''

MEMORY_TREE = '''
import subprocess, sys, time
hogs = [subprocess.Popen([sys.executable, "-c", "b = b'x' * 1_100_000_000; import time; time.sleep(120)"]) for _ in range(3)]
time.sleep(60)
'''

FORK_BOMB = '''
import os
while True:
    os.fork()
'''

IGNORES_INTERRUPT = '''
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    pass
'''

SLEEPS = '''
import time
time.sleep(12)  # waiting is not computing: a CPU-time limit of 10 s does not count it
'''

ORACLE = '''
def llama_param_count(config):
    from peftlab.models import meta_model
    return sum(p.numel() for p in meta_model(config).parameters())
'''


SLOPPY = {  # wrong in general, right on the visible examples
    MEMORY_FN: "def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):\n"
               "    n_trainable = n_params if n_trainable is None else n_trainable\n"
               "    if n_params < 0 or n_trainable < 0 or n_trainable > n_params or min(weight_bytes, grad_bytes, optimizer_bytes) < 0:\n"
               "        raise ValueError('nonsense')\n"
               "    return round(n_params * weight_bytes + n_trainable * (2 + optimizer_bytes))\n",
}

EMPTY_HIDDEN_LISTS = '''
_g = raised.__globals__
_orig_call = _g["call_report"]
def _call_report(source, name, arguments, namespace, *rest):
    if name == "more":
        args, kwargs = _g["loads"](arguments)
        args = tuple([] if type(x) is list else x for x in args)
        arguments = _g["dumps"]((args, kwargs))
    return _orig_call(source, name, arguments, namespace, *rest)
_g["call_report"] = _call_report
'''

FAKE_RAISED = '''
def raised(func, *args, **kwargs):
    return {"call": "f()", "raised": "ValueError", "kinds": ["ValueError", "Exception", "BaseException"], "message": ""}
def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    n_trainable = n_params if n_trainable is None else n_trainable
    return round(n_params * weight_bytes + n_trainable * (grad_bytes + optimizer_bytes))
'''

ORACLE_ALIAS = '''
def llama_param_count(config):
    count = real_param_count
    return count(config)
'''

ORACLE_BY_A_HIDDEN_ROUTE = '''
def llama_param_count(config):
    import importlib
    return importlib.import_module("peftlab." + "refer" + "ence").real_param_count(config)
'''

HUGE_TEXT = '''
def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    return "A" * 20_000_000
'''

DISK_FILL = '''
import os
filled = 0
for i in range(3):
    try:
        fd = os.open(os.path.join(os.environ.get("JUPYTER_RUNTIME_DIR", "/nonexistent"), f"fill-{i}"), os.O_CREAT | os.O_WRONLY, 0o600)
        os.posix_fallocate(fd, 0, (1 << 30) - 4096)
        os.close(fd)
        filled += 1
    except OSError:
        pass
'''

REPORT_FLOOD = '''
import IPython.display as _d
_pub = getattr(_d, "publish_" + "display_data")
_big = "x" * 60_000_000
for _i in range(8):
    _pub({"application/vnd.peftlab.probe+json": _big})
del _big
'''

# Found by the attack on the judge's boundary: code that validates only when a test's `raised` calls it.
CALLER_SENSITIVE_MEMORY = '''
import inspect
def _checked():
    return inspect.currentframe().f_back.f_back.f_code.co_name == "raised"

def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    n_trainable = n_params if n_trainable is None else n_trainable
    if _checked() and (min(n_params, n_trainable, weight_bytes, grad_bytes, optimizer_bytes) < 0 or n_trainable > n_params):
        raise ValueError("invalid")
    return round(n_params * weight_bytes + n_trainable * (grad_bytes + optimizer_bytes))
'''
CALLER_SENSITIVE_FLOPS = '''
def training_flops(n_params, n_tokens):
    if _checked() and min(n_params, n_tokens) < 0:
        raise ValueError("invalid")
    return 6.0 * n_params * n_tokens

def seconds_per_batch(n_params, batch_size, seq_len, flops_per_second):
    if _checked() and (flops_per_second <= 0 or min(batch_size, seq_len) < 0):
        raise ValueError("invalid")
    return training_flops(n_params, batch_size * seq_len) / flops_per_second

def training_energy_kwh(n_params, n_tokens, kwh_per_1e18_flops=0.1):
    if _checked() and kwh_per_1e18_flops < 0:
        raise ValueError("invalid")
    return training_flops(n_params, n_tokens) / 1e18 * kwh_per_1e18_flops
'''

# A report of the answer's own (the type name built from pieces) that also holds a dict of 150,000 int keys
# with one hash (quadratic to build), then an interrupt that keeps the probe from sending the real one.
FORGED_REPORT = '''
from IPython.display import display
_mime = "application/" + "vnd.peftlab." + "probe+json"
_forged = \'{"ok":true,"value":{"$":"dict","v":[\' + ",".join("[%d,0]" % (k * (2**61 - 1)) for k in range(1, 150_001)) + "]}}"

def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    display({_mime: _forged}, raw=True)
    raise KeyboardInterrupt
'''
FORGED_BESIDE_THE_REAL_ONE = '''
from IPython.display import display
def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    display({"application/" + "vnd.peftlab.probe+json": \'{"ok": true, "value": 0}\'}, raw=True)
    return round(n_params * weight_bytes + (n_params if n_trainable is None else n_trainable) * 10)
'''

# Found by the attack on the changed grader: the request (the test's source and its token) read from the
# kernel's context variables or its current request, a forged report with that token, the real one dropped.
STOLEN_TOKEN = '''
import ast, contextvars
from IPython.core.interactiveshell import InteractiveShell
from peftlab import probe as _p
_MIME = "application/vnd.peftlab" + "." + "probe+json"
_LIE = "\\ndef __peftlab_describe__(outcome):\\n    return {'call': 'f()', 'raised': 'ValueError', 'kinds': ['ValueError', 'Exception', 'BaseException'], 'message': ''}\\n"
_seen = set()

def _request():
    for var, value in contextvars.copy_context().items():
        if type(value) is dict and type(value.get("content")) is dict and value["content"].get("code"):
            return value["content"]["code"]
    parent = getattr(InteractiveShell.instance().kernel, "get_" + "parent")()
    return parent.get("content", {}).get("code", "")

def _forge():
    code = _request()
    if not code.startswith("__import__("):
        return
    source, name, arguments, helpers, token = [ast.literal_eval(a) for a in ast.parse(code).body[0].value.args]
    if token in _seen:
        return
    _seen.add(token)
    pub = getattr(InteractiveShell.instance(), "display" + "_pub")
    pub.publish(data={_MIME: _p.call_report(source, name, arguments, InteractiveShell.instance().user_ns, helpers + _LIE, token)})
    send = pub.publish
    def drop_next(data, *args, **kwargs):
        if _MIME in data:
            del pub.publish
            return
        return send(data, *args, **kwargs)
    pub.publish = drop_next
''' + CALLER_SENSITIVE_MEMORY.replace("if _checked() and", "_forge()\n    if False and")
STOLEN_TOKEN_FLOPS = CALLER_SENSITIVE_FLOPS.replace("if _checked() and", "_forge()\n    if False and")

# Every report dropped by the display publisher's class (a forged one could then stand in).
DROPS_THE_REAL_REPORT = '''
pub_class = type(get_ipython().display_pub)
send = pub_class.publish
def drop(self, data, *args, **kwargs):
    if "application/vnd.peftlab.probe+json" not in data:
        return send(self, data, *args, **kwargs)
pub_class.publish = drop
''' + _answers()[MEMORY_FN]

# The model counted by transformers' LlamaModel (not the exercise's own count).
LLAMA_MODEL_COUNT = '''
import torch
from transformers import LlamaModel
def llama_param_count(config):
    with torch.device("meta"):
        model = LlamaModel(config)
    return sum(p.numel() for p in model.parameters()) + (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
'''

# A million empty lists as answers: what the grader keeps of a notebook's reports is bounded.
MILLION_EMPTY_LISTS = '''
_L = [[] for _ in range(999_000)]
q1_answer = q2_answer = q3_answer = q4_answer = _L
'''


# Found by the second attack: the waiting test's frames (its name, source and token) read from another
# thread through a name built at run time, and reports rewritten below the display publisher.
FRAMES_OF_THE_WAITING_TEST = '''
import sys, threading
SEEN = []
def _peek():
    try:
        frame = getattr(sys, "_curr" + "ent_frames")().get(threading.main_thread().ident)
    except RuntimeError:
        return
    while frame is not None:
        SEEN.append(getattr(frame, "f_loc" + "als").get("token"))
        frame = getattr(frame, "f_b" + "ack")
''' + _answers()[MEMORY_FN].replace("    if n_trainable is None:", "    _peek()\n    if n_trainable is None:", 1)

PACK_REWRITES_REPORTS = '''
import IPython, json as _json
_session = getattr(getattr(getattr(IPython, "get_" + "ipython")(), "display" + "_pub"), "sess" + "ion")
_pack = _session.pack
def _rewrite(obj):
    data = obj.get("data") if isinstance(obj, dict) else None
    for key in list(data or {}):
        if "pro" + "be" in key:
            data[key] = data[key].replace(\'"raised":null\', \'"raised":"ValueError"\')
    return _pack(obj)
setattr(_session, "pa" + "ck", _rewrite)
''' + _answers()[MEMORY_FN]

# A signal handler runs on the main thread, where the test's call waits: its frame argument leads there.
SIGNAL_HANDLER_READS_FRAMES = '''
import os, signal
FOUND = []
def _look(signum, frame):
    while frame is not None:
        FOUND.append(frame.f_locals.get("token"))
        frame = frame.f_back
signal.signal(signal.SIGUSR1, _look)
''' + _answers()[MEMORY_FN].replace("    if n_trainable is None:", "    os.kill(os.getpid(), signal.SIGUSR1)\n    if n_trainable is None:", 1)


# Six 400 MB texts, one a cell: what a kernel makes the grader hold is capped at the socket.
BIG_DISPLAY = '''
from IPython.display import display
display({"text/plain": "x" * 400_000_000}, raw=True)
'''


def _six_big_displays(nb):
    for _ in range(6):
        _add_cell(BIG_DISPLAY, after="quiz_q4")(nb)


ESCAPES = '''
q1_answer, q3_answer, q4_answer = "b", 0.001, "d"
q2_answer = type("Count", (int,), {"__qualname__": "\\r\\x1b[2K  (looks clean)\\x1b[8m", "__module__": "x"})(112)
'''


class Listener:
    """A TCP server on 127.0.0.1, a Unix socket in a folder and an abstract Unix socket, recording
    whatever reaches them."""

    def __init__(self, folder: Path):
        self.port_server = socket.socket()
        self.port_server.bind(("127.0.0.1", 0))
        self.port = self.port_server.getsockname()[1]
        self.unix = str(folder / "listener.sock")
        self.unix_server = socket.socket(socket.AF_UNIX)
        self.unix_server.bind(self.unix)
        self.abstract = f"peftlab-test-{uuid.uuid4().hex[:8]}"
        self.abstract_server = socket.socket(socket.AF_UNIX)
        self.abstract_server.bind("\0" + self.abstract)
        self.received = []
        for server in (self.port_server, self.unix_server, self.abstract_server):
            server.listen()
            threading.Thread(target=self._serve, args=(server,), daemon=True).start()

    def _serve(self, server):
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                self.received.append(connection.recv(1000))

    def close(self):
        for server in (self.port_server, self.unix_server, self.abstract_server):
            server.close()


def nested_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


# name -> (how the file is made, automatic points expected, flag expected (regex) or None)
def cases(root: Path, listener: Listener, zip_path: Path) -> dict:
    memory = _answers()[MEMORY_FN]
    a = _answers()
    sandboxed = SANDBOX
    return {
        # honest work, in the shapes platforms deliver it
        "honest": (student(), FULL, None),
        "colab_rewrite": (student(_colab), FULL, None),
        "nbformat_v3": (lambda: nbformat.writes(nbformat.convert(student(), 3), version=3), FULL, None),
        "huge_stored_output": (student(_huge_stored_output), FULL, None),
        "huge_printed_output": (student(answers={"quiz_answers": "print('y' * 3_000_000)\n" + a["quiz_answers"]}), FULL, None),
        "slow_but_sleeping": (student(_add_cell(SLEEPS)), FULL, None),
        # broken files
        "invalid_json": ("{ this is not json", 0, None),
        "truncated": (lambda: nbformat.writes(student())[:5000], 0, None),
        "empty_notebook": (nbformat.v4.new_notebook(), 0, "empty notebook"),
        "deeply_nested_json": (nested_json(), 0, None),
        # the notebook's structure tampered with
        "test_deleted": (student(_delete("quiz_q1")), FULL, "test cell quiz_q1 was deleted"),
        "test_replaced_by_pass": (student(_replace_test, answers={"quiz_answers": a["quiz_answers"] + "\nq4_answer = 'z'"}),
                                  FULL - 1, "test cell quiz_q4 was modified"),
        "answer_moved_to_the_end": (student(_move_answer_to_end), FULL - 3, "answer cell llama_param_count was deleted"),
        "cells_reordered": (student(_reorder), FULL, "moved out of the release's order"),
        "answer_duplicated": (student(_duplicate), FULL - 1, "appears 2 times"),  # both copies run; the second is wrong
        # resources
        "infinite_loop": (student(answers={"training_flops": "while True:\n    pass\n" + a["training_flops"]}),
                          FULL - 4, "time limit"),
        "memory_bomb": (student(answers={"training_flops": "hoard = []\nwhile True:\n    hoard.append(bytearray(10**8))\n"
                                                           + a["training_flops"]}), FULL - 4, "memory limit"),
        "memory_in_three_processes": (student(answers={"quiz_answers": MEMORY_TREE + a["quiz_answers"]}), FULL - 4,
                                      "memory limit reached: the kernel's processes held" if sandboxed else "processes"),
        "fork_bomb": (student(answers={"quiz_answers": FORK_BOMB + a["quiz_answers"]}), FULL - 4, r"suspicious code \(processes\)"),
        "ignores_interrupts": (student(answers={"quiz_answers": IGNORES_INTERRUPT + a["quiz_answers"]}), FULL - 4,
                               "stopped answering"),
        "sys_exit": (student(answers={"quiz_answers": "import sys\nsys.exit()\n" + a["quiz_answers"]}),
                     FULL - 4, r"suspicious code \(exits the kernel\)"),
        "os_exit": (student(answers={"quiz_answers": "import os\nos._exit(1)\n" + a["quiz_answers"]}),
                    FULL - 4, "kernel died"),
        # answers that pose as plain data
        "int_equal_to_everything": (student(answers=with_memory(ALWAYS_EQUAL_INT)), FULL - 3, "posed as plain data"),
        "str_equal_to_everything": (student(answers={"quiz_answers": ALWAYS_EQUAL_STR}), FULL - 1, "posed as plain data"),
        "tensor_subclass_agrees": (student(answers={"training_flops": TENSOR_FLOPS}), FULL - 4, "posed as plain data"),
        # the kernel's machinery attacked: none of it decides a verdict any more
        "input_transformer": (student(answers=with_memory(INPUT_TRANSFORMER)), FULL - 3, "IPython input transformers"),
        "ast_transformer": (student(answers=with_memory(AST_TRANSFORMER)), FULL - 3, "IPython AST transformers"),
        "run_cell_hooks": (student(answers=with_memory(RUN_CELL_HOOKS)), FULL - 3, "IPython event callbacks"),
        "custom_exception_handler": (student(answers=with_memory(CUSTOM_EXC)), FULL - 3, "custom exception handler"),
        "settrace_and_setprofile": (student(answers=with_memory(SETTRACE)), FULL - 3, "tracing hook|sys.settrace"),
        "probe_replaced": (student(answers=with_memory(REPLACE_PROBE)), 0, "sent no report"),
        "malformed_report": (student(answers=with_memory(MALFORMED_REPORT)), 0, "malformed report"),
        "report_true_for_everything": (student(answers=with_memory(TRUE_FOR_EVERYTHING)), 0, r"suspicious code \(grader machinery\)"),
        "display_silenced": (student(answers=with_memory(SILENCE_DISPLAY)), 0, "display machinery was changed"),
        "own_observe_and_helpers": (student(answers=with_memory(OWN_OBSERVE)), FULL - 3, "rebinds test helpers"),
        "shadowed_builtins": (student(answers={"training_flops": SHADOW_BUILTINS + a["training_flops"]}), FULL,
                              "rebinds test helpers"),
        "patched_libraries": (student(answers={"training_flops": PATCH_LIBRARIES + a["training_flops"]}), FULL,
                              "rebinds test helpers"),
        "oracle_in_answer": (student(answers={"llama_param_count": ORACLE}), FULL - 3, "reference code"),
        # leaks and reach
        "prints_history": (student(_add_cell(PRINT_HISTORY, after="quiz_q4")), FULL, r"reads grading files"),
        "hook_prints_every_cell": (student(answers={"quiz_answers": HOOK_PRINTS_CELLS + a["quiz_answers"]}), FULL,
                                   "IPython event callbacks"),
        "reads_solutions": (student(answers=with_memory(STEAL.format(root=root, repo=ROOT, zip=zip_path))),
                            FULL - 3 if sandboxed else FULL, r"suspicious code \(reads grading files\)"),
        "writes_environment": (student(answers={"training_flops": WRITE_OUTSIDE.format(repo=ROOT) + a["training_flops"]}),
                               FULL, "writes outside the notebook"),
        "network_and_sockets": (student(answers={MEMORY_FN: LEAK.format(port=listener.port, unix=listener.unix,
                                                                      abstract=listener.abstract) + memory}),
                                FULL, r"suspicious code \(network\)"),
        "script_in_outputs": (student(answers={"quiz_answers": SCRIPT_OUTPUT + a["quiz_answers"]}), FULL, None),
        "script_in_markdown": (student(_script_in_markdown), FULL, None),
        # passes every visible test (the quiz now checks its answers visibly): only a hidden case fails
        "wrong_hidden_answer": (student(answers={MEMORY_FN: a[MEMORY_FN].replace("return round(", "return math.ceil(")}),
                                FULL - 2, None),
        # found by a review that attacked this grader (each scored points it should not, or hurt the run)
        "sloppy": (student(answers=SLOPPY), FULL - 2, None),
        # targets the hidden calls by their @observe name, which the kernel no longer sees: graded as sloppy
        "sloppy_with_emptied_hidden_lists": (student(answers={MEMORY_FN: EMPTY_HIDDEN_LISTS + SLOPPY[MEMORY_FN]}), FULL - 2,
                                             r"grader machinery|probe functions"),
        "fake_raised": (student(answers={MEMORY_FN: FAKE_RAISED}), FULL - 1, "redefines a test helper"),
        "oracle_alias": (student(answers={"llama_param_count": ORACLE_ALIAS}), FULL - 3, "reference code"),
        "oracle_by_a_hidden_route": (student(answers={"llama_param_count": ORACLE_BY_A_HIDDEN_ROUTE}), FULL - 3,
                                     "reference code, absent while graded"),
        "markdown_bomb": (student(lambda nb: setattr(nb.cells[index(nb, "reflection_24gb")], "source",
                                                     "".join("  " * i + "- x\n" for i in range(1500)))), FULL, "cut to 100 KB"),
        "huge_assertion_text": (student(answers={MEMORY_FN: HUGE_TEXT}), FULL - 3, "larger than 17 MB"),
        "disk_fill": (student(answers={"quiz_answers": DISK_FILL + a["quiz_answers"] + "\nif filled:\n    q1_answer = 'z'\n"}),
                      FULL, "writes outside the notebook"),
        "report_flood": (student(answers={"quiz_answers": REPORT_FLOOD + a["quiz_answers"]}), FULL, "grader machinery"),
        "terminal_escapes": (student(answers={"quiz_answers": ESCAPES}), FULL - 1, "posed as plain data"),
        # found by the attack on the judge's boundary
        "caller_sensitive": (student(answers={MEMORY_FN: CALLER_SENSITIVE_MEMORY, "training_flops": CALLER_SENSITIVE_FLOPS}),
                             FULL - 4, r"suspicious code \(inspects the call stack\)"),
        "forged_report": (student(answers={MEMORY_FN: FORGED_REPORT}), FULL - 3, "ended in an error outside the grader's probe"),
        "forged_beside_the_real_one": (student(answers={MEMORY_FN: FORGED_BESIDE_THE_REAL_ONE}), FULL - 3,
                                       "more than one report"),
        "six_400_mb_displays": (student(_six_big_displays), FULL, r"larger than 17 MB \(refused unread\)"),
        # found by the attack on the changed grader
        "stolen_token": (student(answers={MEMORY_FN: STOLEN_TOKEN, "training_flops": STOLEN_TOKEN_FLOPS}), FULL - 4,
                         r"inspects the call stack.*contextvars|grader machinery.*probe"),
        "drops_the_real_report": (student(answers={MEMORY_FN: DROPS_THE_REAL_REPORT}), 0, "display machinery was changed"),
        "llama_model_count": (student(answers={"llama_param_count": LLAMA_MODEL_COUNT}), FULL - 3, "reference code"),
        "million_empty_lists": (student(answers={"quiz_answers": MILLION_EMPTY_LISTS}), FULL - 4, None),
        "frames_of_the_waiting_test": (student(answers={MEMORY_FN: FRAMES_OF_THE_WAITING_TEST}), FULL,
                                       r"operations blocked while graded \(sys._current_frames\)"),
        "pack_rewrites_reports": (student(answers={MEMORY_FN: PACK_REWRITES_REPORTS}), 0, "display machinery was changed"),
        "signal_handler_reads_frames": (student(answers={MEMORY_FN: SIGNAL_HANDLER_READS_FRAMES}), 0,
                                        r"display machinery was changed \(signal handlers\)"),
    }


# Cases that would harm the machine if they ran without the sandbox (writing the environment, reading the
# instructor's files, exhausting processes): graded only where the sandbox is on.
NEEDS_SANDBOX = ("writes_environment", "reads_solutions", "fork_bomb", "memory_in_three_processes", "network_and_sockets",
                 "disk_fill", "oracle_by_a_hidden_route")


def graded_cases(*args) -> dict:
    all_cases = cases(*args)
    return {k: v for k, v in all_cases.items() if SANDBOX or k not in NEEDS_SANDBOX}


# Exported names that must stay separate students (name -> expected automatic points).
NAMES = {"José": FULL, "jose": 0, "alice bob": FULL, "alice_bob": 0, ".dotted": FULL, "Alice_Bob": FULL,
         "a" * 70 + "-one": FULL, "a" * 70 + "-two": 0}


def _corrupt_member(archive: Path, member: str) -> None:
    """Flip a byte inside one member's stored data, so that reading it fails its CRC check."""
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(member)
    data = bytearray(archive.read_bytes())
    header = info.header_offset
    name_len, extra_len = int.from_bytes(data[header + 26:header + 28], "little"), int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grading")
    root, inbox = tmp / "course-root", tmp / "inbox"
    shutil.copytree(SOLUTIONS / NAME, root / "solutions" / NAME)
    inbox.mkdir()
    listener = Listener(tmp)
    archive = tmp / "submissions.zip"
    expected = {}
    for name, (made, points, flag) in graded_cases(root, listener, archive).items():
        content = made() if callable(made) else made
        if not isinstance(content, str):
            content = nbformat.writes(content)
        folder = inbox / name  # one folder per student, as learning platforms export them
        folder.mkdir()
        (folder / f"{NAME}.ipynb").write_text(content)
        expected[name] = (points, flag)
    honest, release = nbformat.writes(student()), (COURSE / NAME / f"{NAME}.ipynb").read_text()
    for name, points in NAMES.items():
        folder = inbox / name
        folder.mkdir()
        (folder / f"{NAME}.ipynb").write_text(honest if points else release)
    (inbox / "=HYPERLINK(x)").mkdir()
    (inbox / "=HYPERLINK(x)" / f"{NAME}.ipynb").write_text(honest)
    (inbox / "honest" / "notes.txt").write_text("not a notebook")
    (inbox / "crc_broken").mkdir()
    (inbox / "crc_broken" / f"{NAME}.ipynb").write_text(honest)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in sorted(inbox.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(inbox))
        z.writestr("__MACOSX/._honest", b"\0\0")
        z.writestr(f"twice/{NAME}.ipynb", honest)    # two entries of one name: the later one counts
        z.writestr(f"twice/{NAME}.ipynb", release)
        z.writestr(f"folder_named_like_a_notebook/{NAME}.ipynb/inner.txt", "x")
    _corrupt_member(archive, f"crc_broken/{NAME}.ipynb")
    env = {**os.environ, **isolated_env(tmp / "home", seeded_cache(tmp / "cache")), "PEFTLAB_COURSE_ROOT": str(root)}
    checks = ROOT / "src" / "peftlab" / "checks.py"
    checks_before = checks.read_bytes()
    # 3 workers on 2 cores: the cases that wait out a limit overlap with the others (limits count CPU time)
    done = subprocess.run([sys.executable, "-m", "autograder.grade", str(archive), "--workers", "3",
                           "--cell-timeout", "10", "--memory-gb", "3", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    listener.close()
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((root / "autograder" / "reports" / "report.json").read_text())
    items_of_this_run = {"json": json.loads((root / "autograder" / "reports" / "items.json").read_text()),
                         "html": (root / "autograder" / "reports" / "items.html").read_text()}
    return {"items": items_of_this_run, "root": root, "report": {s["name"]: s for s in report["submissions"]}, "skipped": report["skipped"],
            "expected": expected, "received": listener.received, "stdout": done.stdout, "env": env, "archive": archive,
            "checks_unchanged": checks.read_bytes() == checks_before, "csv": (root / "autograder" / "reports" / "report.csv")}


def _auto_score(root: Path, student_id: str) -> float:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'autograder' / 'gradebook.db'}") as gb:
        return gb.find_submission(NAME, student_id).code_score


CASES = list(cases(Path("/x"), type("L", (), {"port": 1, "unix": "/x", "abstract": "x"})(), Path("/x.zip")))


def test_the_suite_covers_at_least_45_kinds_of_submission():
    assert len(CASES) + len(NAMES) + 2 >= 45  # + the broken archive entry and the folder named like a notebook


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_each_submission_is_graded_as_expected(graded, name):
    if name not in graded["expected"]:
        pytest.skip("this submission attacks the machine: it is graded only where the sandbox is on")
    points, flag = graded["expected"][name]
    row = graded["report"][name]
    assert _auto_score(graded["root"], row["student"]) == points, (name, row)
    flags = " | ".join(row["flags"])
    if flag:
        assert re.search(flag, flags), f"{name}: expected a flag matching {flag!r}, got {flags!r}"
    elif name not in ("empty_notebook",):
        assert not row["flags"], f"{name} should not be flagged: {flags}"
    if name in ("invalid_json", "truncated", "empty_notebook", "deeply_nested_json"):
        assert row["status"] == "failed" and row["reason"], row
    else:
        assert row["status"] == "graded", row


@pytest.mark.slow
def test_a_forged_report_costs_the_judge_no_time(graded):
    """The forged report (150,000 colliding keys) is refused unread: its notebook takes about an honest one's time."""
    forged, honest = graded["report"]["forged_report"], graded["report"]["honest"]
    assert forged["seconds"] < honest["seconds"] + 60, (forged["seconds"], honest["seconds"])


@pytest.mark.slow
def test_what_a_kernel_sends_does_not_grow_the_grader(graded):
    """Six 400 MB displays, or a million empty lists as answers, leave the grading process's peak within
    1.2 x an honest notebook's."""
    rows = graded["report"].values()
    honest = [r["worker_peak_mb"] for r in rows if r["status"] == "graded" and not r["flags"] and r["worker_peak_mb"]]
    for name in ("six_400_mb_displays", "million_empty_lists"):
        big = graded["report"][name]["worker_peak_mb"]
        assert honest and big is not None and big <= 1.2 * max(honest), (name, big, sorted(honest))


@pytest.mark.slow
def test_distinct_names_stay_distinct_students(graded):
    rows = graded["report"]
    ids = [rows[name]["student"] for name in NAMES]
    assert len(set(ids)) == len(ids) and len({i.lower() for i in ids}) == len(ids), ids
    for name, points in NAMES.items():
        assert _auto_score(graded["root"], rows[name]["student"]) == points, (name, rows[name])
    assert rows["alice_bob"]["student"] == "alice_bob" and rows["alice bob"]["student"].startswith("alice_bob-")


@pytest.mark.slow
def test_every_input_file_is_in_the_report(graded):
    with zipfile.ZipFile(graded["archive"]) as z:
        members = [m.filename for m in z.infolist() if not m.is_dir()]
    reported = {Path(s["file"]).as_posix() for s in graded["report"].values()} | {s["file"] for s in graded["skipped"]}
    for member in dict.fromkeys(members):
        assert any(r.endswith(member) for r in reported), f"{member} is missing from the report"
    twice = [entry for entry in graded["skipped"] if entry["file"].startswith(f"twice/{NAME}.ipynb (entry")]
    assert len(twice) == 1 and "later entry with the same name" in twice[0]["reason"], twice
    assert _auto_score(graded["root"], graded["report"]["twice"]["student"]) == 0, "the later entry is graded"
    with open(graded["csv"]) as f:
        formula = [row for row in csv.DictReader(f) if "HYPERLINK" in row["name"]]
    assert formula and all(not row[k].startswith("=") for row in formula for k in row), "no cell a spreadsheet evaluates"
    crc = graded["report"]["crc_broken"]
    assert crc["status"] == "failed" and "could not be read" in crc["reason"]
    assert _auto_score(graded["root"], "crc_broken") == 0
    reasons = {s["file"]: s["reason"] for s in graded["skipped"]}
    assert "not a notebook" in reasons["honest/notes.txt"]
    assert "metadata" in reasons["__MACOSX/._honest"]
    nb_folder = graded["report"]["folder_named_like_a_notebook"]
    assert nb_folder["status"] == "failed" and "folder named like a notebook" in nb_folder["reason"]
    with open(graded["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(graded["report"]) + len(graded["skipped"])


@pytest.mark.slow
def test_pages_and_summary_stay_bounded_and_plain(graded):
    sizes = {page.parent.parent.name: page.stat().st_size for page in _feedback_pages(graded)}
    assert max(sizes.values()) < 8 << 20, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    assert "\x1b" not in graded["stdout"] and "\r" not in graded["stdout"], "a submission wrote escape codes to the console"
    assert "\\x1b[2K" in graded["stdout"], "the flag is still there, shown as text"


@pytest.mark.slow
def test_the_run_reports_repairs_and_conversions(graded):
    notes = {name: " | ".join(row["notes"]) for name, row in graded["report"].items()}
    assert "nbgrader metadata missing" in notes["colab_rewrite"]
    assert "converted from nbformat 3" in notes["nbformat_v3"]
    assert "output of cell" in notes["huge_printed_output"]
    assert "graded" in graded["stdout"] and "failed" in graded["stdout"] and "flagged" in graded["stdout"]


@pytest.mark.slow
def test_no_network_or_socket_from_student_code(graded):
    if not SANDBOX:
        pytest.skip("user namespaces are not available here: the grader says the sandbox is off")
    assert graded["received"] == [], "a student's kernel reached a server on this machine"


@pytest.mark.slow
def test_nothing_outside_the_kernels_scratch_was_written(graded):
    if not SANDBOX:
        pytest.skip("the sandbox is off here")
    assert graded["checks_unchanged"], "a kernel changed the course's helper package"
    leftovers = [p for p in [*Path(sys.prefix).rglob("evil.pth"), *(ROOT / "src").rglob("evil.pth"), ROOT / "evil.pth"]
                 if p.exists()]
    assert not leftovers and not Path("/tmp/owned").exists()


@pytest.mark.slow
def test_grades_are_exported_for_every_student(graded):
    rows = list(csv.DictReader(open(graded["root"] / "autograder" / "grades.csv")))
    ids = {s["student"] for s in graded["report"].values()}
    assert {r["student_id"] for r in rows} == ids
    honest = graded["report"]["honest"]["student"]
    assert float(next(r for r in rows if r["student_id"] == honest)["raw_score"]) == FULL


def _feedback_pages(graded):
    return list((graded["root"] / "autograder" / "feedback").rglob("*.html"))


@pytest.mark.slow
def test_feedback_never_shows_hidden_tests_or_their_messages(graded):
    source = nbformat.read(SOLUTIONS / NAME / f"{NAME}.ipynb", as_version=4)
    release = nbformat.reads((COURSE / NAME / f"{NAME}.ipynb").read_text(), as_version=4)
    visible = "\n".join(cell.source for cell in release.cells)
    hidden = [line.strip() for cell in source.cells for n, line in enumerate(cell.source.splitlines(), 1)
              if n in hidden_lines(cell.source) and len(line.strip()) > 12 and "HIDDEN TESTS" not in line
              and line.strip() not in visible]  # lines that also appear in the release give nothing away
    assert hidden
    pages = _feedback_pages(graded)
    assert len(pages) >= len(CASES) - 4  # unreadable files get no feedback page
    for page in pages:
        text = page.read_text()
        leaked = [line for line in hidden if line in text]
        assert not leaked, f"{page} shows hidden test lines: {leaked[:2]}"
        assert "1e-5 = 0.001 %" not in text, f"{page} shows a hidden test's message"
    wrong = (graded["root"] / "autograder" / "feedback" / "wrong_hidden_answer" / NAME / f"{NAME}.html").read_text()
    assert "a hidden test failed" in wrong
    history = (graded["root"] / "autograder" / "feedback" / "prints_history" / NAME / f"{NAME}.html").read_text()
    assert "HISTORY-START" in history  # it printed; what it could print held no hidden test


class _ActiveContent(__import__("html.parser").parser.HTMLParser):
    """What a browser would run in a page: script bodies, event-handler attributes, javascript: links."""

    def __init__(self):
        super().__init__()
        self.found, self._in_script = [], False

    def handle_starttag(self, tag, attrs):
        self._in_script = tag == "script"
        for name, value in attrs:
            if name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}={value!r}>")
        if tag in ("svg", "iframe", "object", "embed"):
            self.found.append(f"<{tag}>")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and ("stolen" in data or "alert(" in data):
            self.found.append(data[:80])


def active_content(page: str) -> list[str]:
    parser = _ActiveContent()
    parser.feed(page)
    return parser.found


@pytest.mark.slow
def test_feedback_and_formgrader_pages_run_no_script(graded):
    honest = (graded["root"] / "autograder" / "feedback" / "honest" / NAME / f"{NAME}.html").read_text()
    assert not active_content(honest)
    for name in ("script_in_outputs", "script_in_markdown"):
        page = (graded["root"] / "autograder" / "feedback" / name / NAME / f"{NAME}.html").read_text()
        assert not active_content(page), f"{name}: {active_content(page)}"
        assert page.count("<script") == honest.count("<script"), "only the page template's own scripts"
        autograded = nbformat.read(graded["root"] / "autograder" / "autograded" / name / NAME / f"{NAME}.ipynb", as_version=4)
        for cell in autograded.cells:
            for output in cell.get("outputs", []):
                assert not set(output.get("data", {})) - {"text/plain", "image/png", "image/jpeg"}, output
            if cell.metadata.get("nbgrader", {}).get("solution") and cell.cell_type == "markdown":
                assert "<script>" not in cell.source and "javascript:" not in cell.source


def test_traceback_line_parsing():
    tb = ["\x1b[0;31mAssertionError\x1b[0m  Traceback", "Cell \x1b[0;32mIn[12], line 7\x1b[0m\n  assert x"]
    assert failing_line(tb) == 7
    assert hidden_lines("a\n### BEGIN HIDDEN TESTS\nb\n### END HIDDEN TESTS\nc") == {2, 3, 4}


@pytest.mark.slow
def test_regrading_gives_the_same_grades(graded):
    before = (graded["root"] / "autograder" / "grades.csv").read_text()
    subset = graded["archive"].parent / "again"
    with zipfile.ZipFile(graded["archive"]) as z:
        for name in ("honest", "os_exit", "invalid_json", "José", "Alice_Bob"):
            z.extract(f"{name}/{NAME}.ipynb", subset)
    untouched = graded["root"] / "autograder" / "feedback" / "colab_rewrite" / NAME / f"{NAME}.html"
    stamp = untouched.stat().st_mtime_ns
    done = subprocess.run([sys.executable, "-m", "autograder.grade", str(subset), "--workers", "2", "--quiet"],
                          cwd=ROOT, env=graded["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (graded["root"] / "autograder" / "grades.csv").read_text() == before
    assert untouched.stat().st_mtime_ns == stamp, "a student outside the regrade was scored and written again"
    assert list((graded["root"] / "autograder" / "backups").glob("gradebook-*.db")), "the gradebook is backed up first"
    after = json.loads((graded["root"] / "autograder" / "reports" / "items.json").read_text())[NAME]
    first = graded["items"]["json"][NAME]
    assert after["students"] == first["students"] and sorted(after["scores"]) == sorted(first["scores"]), \
        "a run that re-grades five students still analyses the whole class, read from the gradebook"


@pytest.mark.slow
def test_the_run_writes_an_item_analysis(graded):
    """Per test: who passed, what the others' failures said; never a hidden test's text."""
    from notebooks import hidden_test_lines

    reports = graded["root"] / "autograder" / "reports"
    analysis = graded["items"]["json"][NAME]  # of the fixture's run (a later run re-grades a few)
    rows = [s for s in graded["report"].values() if s["status"] == "graded"]
    assert analysis["students"] == len(rows) and sorted(analysis["scores"]) == sorted(s["score"] for s in rows)
    assert all(0 <= item["pass_share"] <= 1 for item in analysis["items"]) and len(analysis["items"]) >= 10
    assert any(item["messages"] for item in analysis["items"]), "a class with mistakes has failure messages"
    page = graded["items"]["html"]
    assert list(reports.glob("items-*.json")), "each run's analysis is kept beside the latest"
    assert "item analysis:" in graded["stdout"] and (reports / f"items-{NAME}.png").read_bytes().startswith(b"\x89PNG")
    for line in hidden_test_lines(nbformat.read(SOLUTIONS / NAME / f"{NAME}.ipynb", as_version=4)):
        if len(line) > 20:
            assert line not in page, f"hidden test text in the item analysis: {line}"


def _completed(assignment: str, answers: dict | None = None):
    """``assignment``'s release with the solution's answers (and ``answers`` in place of some)."""
    solution = nbformat.read(SOLUTIONS / assignment / f"{assignment}.ipynb", as_version=4)
    given = {c.metadata["nbgrader"]["grade_id"]: "\n".join(line for line in c.source.splitlines() if "### " not in line)
             for c in solution.cells if c.metadata.get("nbgrader", {}).get("solution")}
    given.update(answers or {})
    nb = nbformat.read(COURSE / assignment / f"{assignment}.ipynb", as_version=4)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and meta.get("grade_id") in given:
            cell.source = given[meta["grade_id"]]
    return nb


# A QLoRALinear that keeps a float copy of its weight, in a notebook whose `vars` says no object has attributes.
BLIND_VARS = """
def vars(obj=None):
    return {}
"""
KEEPS_A_COPY = """
_init = QLoRALinear.__init__
def _keep(self, base, *args, **kwargs):
    _init(self, base, *args, **kwargs)
    self.shadow = base.weight.detach().clone()
QLoRALinear.__init__ = _keep
"""


def _grade_one_assignment(tmp_path: Path, assignment: str, notebooks: dict) -> dict:
    """Grade ``{name: notebook}`` of one assignment in a course root of their own; report rows by name."""
    root, inbox = tmp_path / "course-root", tmp_path / "inbox"
    shutil.copytree(SOLUTIONS / assignment, root / "solutions" / assignment)
    for name, nb in notebooks.items():
        (inbox / name).mkdir(parents=True)
        (inbox / name / f"{assignment}.ipynb").write_text(nbformat.writes(nb))
    env = {**os.environ, **isolated_env(tmp_path / "home", seeded_cache(tmp_path / "cache")), "PEFTLAB_COURSE_ROOT": str(root)}
    done = subprocess.run([sys.executable, "-m", "autograder.grade", str(inbox), "--workers", "2", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {s["name"]: s for s in json.loads((root / "autograder" / "reports" / "report.json").read_text())["submissions"]}


@pytest.mark.slow
def test_helpers_are_blind_to_a_shadowed_builtin_in_06(tmp_path):
    """06's storage test finds the float copy whatever the notebook's `vars` says; the rebinding is flagged."""
    assignment = "06_qlora"
    answer = _completed(assignment).cells
    solution = next(c.source for c in answer if c.metadata.get("nbgrader", {}).get("grade_id") == "qlora_linear")
    rows = _grade_one_assignment(tmp_path, assignment, {
        "honest": _completed(assignment),
        "copy_hidden": _completed(assignment, {"qlora_linear": BLIND_VARS + solution + KEEPS_A_COPY})})
    assert rows["honest"]["status"] == "graded" and not rows["honest"]["flags"], rows["honest"]
    assert rows["copy_hidden"]["score"] == rows["honest"]["score"] - 2, rows["copy_hidden"]  # qlora_linear_storage: 2 points
    assert any("rebinds Python's builtins): vars" in flag for flag in rows["copy_hidden"]["flags"]), rows["copy_hidden"]["flags"]


# 04's count taken from peft itself, through a module name the reading of the source cannot see.
PEFT_BY_A_BUILT_NAME = """
import importlib

LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_param_count(in_features, out_features, r):
    if r < 1 or in_features < 1 or out_features < 1:
        raise ValueError("rank and sizes must be at least 1")
    return r * (in_features + out_features)


def llama_lora_param_count(config, r, target_modules):
    if set(target_modules) - set(LLAMA_LINEAR_NAMES):
        raise ValueError("not a linear layer of a Llama block")
    library = importlib.import_module("".join(["pe", "ft"]))
    with torch.device("meta"):
        model = getattr(importlib.import_module("transformers"), "LlamaForCausalLM")(config)
    model = library.get_peft_model(model, library.LoraConfig(r=r, target_modules=list(target_modules)))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
"""


@pytest.mark.slow
def test_a_library_left_out_is_out_of_reach_by_any_name_in_04(tmp_path):
    """04 is graded without peft in the kernel: a count taken from peft through a name built at run time
    (which the reading of the source cannot follow) scores nothing for the test that compares it with
    peft, and the honest notebook keeps every point."""
    if not SANDBOX:
        pytest.skip("the library is left out by the sandbox's mounts")
    assignment = "04_lora"
    rows = _grade_one_assignment(tmp_path, assignment, {
        "honest": _completed(assignment), "peft_by_name": _completed(assignment, {"lora_counts": PEFT_BY_A_BUILT_NAME})})
    honest, cheat = rows["honest"], rows["peft_by_name"]
    assert honest["status"] == "graded" and not honest["flags"] and honest["score"] == honest["max_score"], honest
    assert cheat["score"] == honest["score"] - 1, cheat  # llama_lora_counts_match_peft: 1 point
