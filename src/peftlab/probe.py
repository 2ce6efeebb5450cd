"""How the notebooks' tests call your code: ``@observe`` functions and plain data.

A test cell has two parts. The functions marked ``@observe(...)`` call your code (build your module,
run it on the test's inputs) and return what the test needs to look at; the rest of the cell checks
those values. In JupyterLab and Colab both parts run in your notebook, one after the other. When your
work is graded, only the ``@observe`` functions run in your notebook's kernel; the checks run in the
grader's own process, on the returned values, so nothing in the notebook can change how they judge.

What crosses between the two is *plain data*: ``None``, ``bool``, ``int``, ``float``, ``str``, lists,
tuples and dicts of those, PyTorch tensors (their dtype, shape and bytes; whether they are an
``nn.Parameter`` and require gradients), dtypes and devices. Anything else (a subclass of ``int`` or
``str``, a tensor subclass, a module) arrives as an `Unreadable` value, which equals nothing and
fails every check; so return a plain ``int`` where a test expects a count. The same conversion runs
in your notebook, so what the visible tests see is what the grader sees.

    @observe(inputs)                  # arguments go in as plain data too
    def outputs(inputs):
        return [your_function(x) for x in inputs]
    assert outputs[0] == 42           # `outputs` is now the returned value, converted

`raised` describes what a call raised (for tests of error handling); `peftlab.checks.expect_error`
checks it.
"""

from __future__ import annotations

import ast
import base64
import builtins
import hmac
import json
import math
import os
import random
import re
import time

MIME = "application/vnd.peftlab.probe+json"
MAX_DEPTH = 32
MAX_ITEMS = 20_000  # items in one report (the course's tests send at most 177)
MAX_BYTES = 16 << 20  # of one report (the largest of the course's tests is 1.4 MB: 04's logits)
MAX_INT_BITS = 14_000  # about 4,200 digits: Python refuses to turn longer ints into text (or back)
DECODE_SECONDS = 10.0  # the grader's time for reading one report; a 15 MB tensor report takes 0.05 s
# Python's builtins as they were when this module was first imported (before any student code: the
# grader's kernel imports it first); test helpers and @observe functions run over these.
_BUILTINS = dict(builtins.__dict__)

_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "uint16", "uint32", "uint64", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")


class Unreadable:
    """A value that is not plain data (or a malformed report): equal to nothing, true for nothing."""

    __slots__ = ("kind", "why")

    def __init__(self, kind: str, why: str = ""):
        self.kind, self.why = str(kind)[:200], str(why)[:200]

    def __eq__(self, other):
        return False

    def __ne__(self, other):
        return True

    def __hash__(self):
        return id(self)

    def __bool__(self):
        return False

    def __repr__(self):
        return f"<a {self.kind}, not plain data{': ' + self.why if self.why else ''}>"

    def __format__(self, spec):
        return repr(self)


class ReportError(ValueError):
    """A report from the kernel that does not follow the format (a tampered or broken kernel)."""


class KernelError(Exception):
    """Your code raised an exception while a test called it."""

    def __init__(self, ename: str, evalue: str):
        super().__init__(f"{ename}: {evalue}" if evalue else ename)
        self.ename, self.evalue = ename, evalue


# ---------------------------------------------------------------------------------------------------
# Encoding (runs wherever the value was made: the student's kernel, or the grader for arguments)


def encode(value, _depth: int = 0, _count: list | None = None):
    """``value`` as JSON-ready plain data, with exact types: see the module docstring."""
    count = _count if _count is not None else [0]
    count[0] += 1
    if _depth > MAX_DEPTH or count[0] > MAX_ITEMS:
        return {"$": "unreadable", "kind": type(value).__name__, "why": "nested too deeply or too large"}
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        if value.bit_length() > MAX_INT_BITS:
            return {"$": "unreadable", "kind": "int", "why": "too many digits"}
        return value
    if kind is float:
        return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
    numpy_value = _numpy_scalar(value)
    if numpy_value is not None:
        return encode(numpy_value, _depth, count)
    if kind is list:
        return _encode_items(list.__iter__(value), _depth, count)
    if kind is tuple:
        return {"$": "tuple", "v": _encode_items(tuple.__iter__(value), _depth, count)}
    if kind is dict or _is_plain_dict(value):
        return {"$": "dict", "v": _encode_items(dict.items(value), _depth, count, pairs=True)}
    torch = _torch()
    if torch is not None:
        if kind is torch.dtype:
            return {"$": "dtype", "v": str(value).removeprefix("torch.")}
        if kind is torch.device:
            return {"$": "device", "v": str(value)}
        if kind is torch.Size:
            return {"$": "tuple", "v": [int(v) for v in value]}
        if kind in (torch.Tensor, torch.nn.Parameter):
            return _encode_tensor(torch, value)
    why = ""
    for plain in (bool, int, float, str, list, tuple, dict) + ((torch.Tensor,) if torch is not None else ()):
        if isinstance(value, plain):
            why = f"a subclass of {plain.__name__}"
            break
    return {"$": "unreadable", "kind": f"{kind.__module__}.{kind.__qualname__}", "why": why}


def _encode_items(items, depth: int, count: list, pairs: bool = False) -> list:
    """The items of a container, encoded, until the report's item limit: then one last item says so
    (the rest is not walked, so a huge container costs no more than the limit)."""
    out = []
    for item in items:
        if count[0] > MAX_ITEMS:
            out.append({"$": "unreadable", "kind": "items", "why": "nested too deeply or too large"})
            break
        out.append([encode(item[0], depth + 1, count), encode(item[1], depth + 1, count)] if pairs
                   else encode(item, depth + 1, count))
    return out


def _torch():
    import sys

    return sys.modules.get("torch")


def _numpy_scalar(value):
    import sys

    np = sys.modules.get("numpy")
    kind = type(value)
    if np is None or kind.__module__ != "numpy":  # numpy's own scalar types only (exact, no subclass)
        return None
    if kind is np.bool_:
        return bool(value)
    if kind in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        return int(value)
    if kind in (np.float16, np.float32, np.float64):
        return float(value)
    return None


def _is_plain_dict(value) -> bool:
    import collections

    return type(value) in (collections.OrderedDict, collections.defaultdict)


def _encode_tensor(torch, t):
    base = {"$": "tensor", "param": type(t) is torch.nn.Parameter, "grad": bool(t.requires_grad)}
    if t.layout != torch.strided or t.is_quantized or t.is_meta:
        return {"$": "unreadable", "kind": "torch.Tensor", "why": f"{t.layout} layout" if not t.is_meta else "meta tensor"}
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        return {"$": "unreadable", "kind": "torch.Tensor", "why": f"dtype {dtype}"}
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {**base, "dtype": dtype, "shape": [int(s) for s in t.shape], "data": base64.b64encode(raw).decode()}


def dumps(value) -> str:
    return json.dumps(encode(value), allow_nan=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------
# Decoding (total: anything that does not follow the format raises ReportError)


def loads(text, max_bytes: int = MAX_BYTES):
    """Plain data from a report written by `dumps`. Strict: wrong shapes raise ReportError."""
    if not isinstance(text, str):
        raise ReportError(f"a report must be text, got {type(text).__name__}")
    if len(text) > max_bytes:
        raise ReportError(f"report too large ({len(text) / 1e6:.1f} MB)")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ReportError(f"not valid JSON ({type(exc).__name__})") from None
    return decode(data)


class Budget:
    """Bounds the reading of one report: items (``most``), time (checked every 4,096 items) and dict
    keys whose hashes a kernel could make collide."""

    __slots__ = ("items", "most", "deadline", "keys")

    def __init__(self, seconds: float = DECODE_SECONDS, most: int = MAX_ITEMS + 16):
        self.items, self.most, self.deadline, self.keys = 0, most, time.monotonic() + seconds, 0

    def spend(self) -> None:
        self.items += 1
        if self.items > self.most:
            raise ReportError("the report holds too many items")
        if not self.items & 4095 and time.monotonic() > self.deadline:
            raise ReportError("the report took too long to read")

    def key(self, value):
        """``value`` as a dict key. Strings (hashed with the grader's own random seed), booleans, None
        and ints below 2**60 (each its own hash) cannot be made to collide; any other key (a float,
        a tuple) could, and a dict of 150,000 keys with one hash takes minutes to build, so a report
        may hold only `MAX_OTHER_KEYS` of those."""
        if value is None or type(value) in (str, bool) or (type(value) is int and -_KEY_INT < value < _KEY_INT):
            return value
        self.keys += 1
        if self.keys > MAX_OTHER_KEYS:
            raise ReportError(f"the report holds more than {MAX_OTHER_KEYS} dict keys that are not strings or ints")
        try:
            hash(value)
        except TypeError:
            raise ReportError("unhashable dict key") from None
        return value


_KEY_INT = 1 << 60
MAX_OTHER_KEYS = 256  # the tests' own reports hold at most a few


def decode(data, _depth: int = 0, _budget: Budget | None = None):
    """Plain data from `encode`'s form. Linear in the size of ``data``, bounded in depth, items and time."""
    budget = _budget if _budget is not None else Budget()
    budget.spend()
    if _depth > MAX_DEPTH + 2:
        raise ReportError("nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, str):
        return data
    if kind is float:
        return data
    if kind is list:
        return [decode(v, _depth + 1, budget) for v in data]
    if kind is not dict:
        raise ReportError(f"unexpected {kind.__name__}")
    tag = data.get("$")
    if tag == "tuple":
        return tuple(decode(v, _depth + 1, budget) for v in _field(data, "v", list))
    if tag == "dict":
        out = {}
        for pair in _field(data, "v", list):
            if type(pair) is not list or len(pair) != 2:
                raise ReportError("malformed dict entry")
            out[budget.key(decode(pair[0], _depth + 1, budget))] = decode(pair[1], _depth + 1, budget)
        return out
    if tag == "float":
        v = _field(data, "v", str)
        if v not in ("nan", "inf", "-inf"):
            raise ReportError("malformed float")
        return float(v)
    if tag == "unreadable":
        return Unreadable(str(data.get("kind", "value")), str(data.get("why", "")))
    if tag == "tensor":
        return _decode_tensor(data)
    import torch

    if tag == "dtype":
        v = _field(data, "v", str)
        if v not in _DTYPES:
            raise ReportError("unknown dtype")
        return getattr(torch, v)
    if tag == "device":
        v = _field(data, "v", str)
        try:
            return torch.device(v)
        except (RuntimeError, ValueError):
            raise ReportError("unknown device") from None
    raise ReportError(f"unknown tag {str(tag)[:40]!r}")


def _field(data: dict, key: str, kind: type):
    value = data.get(key)
    if type(value) is not kind:
        raise ReportError(f"field {key!r} should be a {kind.__name__}")
    return value


def _decode_tensor(data: dict):
    import binascii

    import torch

    dtype_name = _field(data, "dtype", str)
    if dtype_name not in _DTYPES:
        raise ReportError("unknown tensor dtype")
    dtype = getattr(torch, dtype_name)
    shape = _field(data, "shape", list)
    if len(shape) > 16 or any(type(s) is not int or s < 0 for s in shape):
        raise ReportError("malformed tensor shape")
    numel = math.prod(shape)
    if numel * dtype.itemsize > MAX_BYTES:
        raise ReportError("tensor too large")
    try:
        raw = base64.b64decode(_field(data, "data", str), validate=True)
    except (binascii.Error, ValueError):
        raise ReportError("malformed tensor data") from None
    if len(raw) != numel * dtype.itemsize:
        raise ReportError(f"tensor data holds {len(raw)} bytes, its shape needs {numel * dtype.itemsize}")
    if numel == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    grad, param = data.get("grad"), data.get("param")
    if type(grad) is not bool or type(param) is not bool:
        raise ReportError("malformed tensor flags")
    if grad and not (dtype.is_floating_point or dtype.is_complex):
        raise ReportError("only floating-point tensors can require gradients")
    if param:
        return torch.nn.Parameter(tensor, requires_grad=grad)
    return tensor.requires_grad_(grad) if grad else tensor


# ---------------------------------------------------------------------------------------------------
# Calling the student's code


def _local_runner(func, args, kwargs):
    """In a notebook: run the function here, with the same conversions and the same rule on the answers it
    calls (`peftlab.rules`) as the grader applies."""
    if func.__code__.co_freevars:
        raise TypeError(f"@observe function {func.__name__} uses variables of an enclosing function "
                        f"({', '.join(func.__code__.co_freevars)}); pass them as arguments")
    from peftlab.rules import check_observed

    check_observed(func)
    args, kwargs = loads(dumps((tuple(args), dict(kwargs))))
    state = _random_state()
    try:
        reseed()
        return loads(dumps(func(*args, **kwargs)))
    finally:  # the test's own random draws go on as if nothing had run: as in the grader
        _set_random_state(state)


def _random_state():
    import sys

    torch, np = _torch(), sys.modules.get("numpy")
    return (random.getstate(), torch.get_rng_state() if torch is not None else None,
            np.random.get_state() if np is not None else None)


def _set_random_state(state) -> None:
    import sys

    python, torch_state, numpy_state = state
    random.setstate(python)
    if torch_state is not None:
        _torch().set_rng_state(torch_state)
    if numpy_state is not None:
        sys.modules["numpy"].random.set_state(numpy_state)


_runner = _local_runner


def set_runner(runner) -> None:
    """Used by the grader (in its own process) to send @observe functions to the student's kernel."""
    global _runner
    _runner = runner or _local_runner


def observe(*args, **kwargs):
    """Decorator: call the function now with ``args`` and bind its name to the result, as plain data."""

    def decorator(func):
        return _runner(func, args, kwargs)

    return decorator


def reseed(seed: int = 0) -> None:
    """The same random state before every observation, in a notebook and in the grader's kernel."""
    random.seed(seed)
    torch = _torch()
    if torch is not None:
        torch.manual_seed(seed)
    import sys

    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed)


# The helpers tests call inside @observe functions, as source: the grader sends this text with every
# observation and defines it afresh there, in globals of its own over Python's original builtins, so a
# notebook that replaces `raised`, `float_tensors` or a builtin they use changes nothing about what a
# test's call reports.
#
# Every call an @observe function makes goes through `__peftlab_call__` (the grader rewrites the
# function's source so: `trampolined`): the callee runs on a thread of its own, started for that call,
# whose stack holds only this trampoline. So the student's code sees the same frames above it whether a
# test checks what it returns or whether it raises (`raised`), whichever test is running. The caller's
# torch state that is kept per thread (gradient mode, inference mode, saved-tensor hooks) and its
# context variables go with the call.
HELPERS = """
def __peftlab_state__():
    import sys
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch._C._autograd._top_saved_tensors_default_hooks(True), torch.get_num_threads())


def __peftlab_bounce__(box):
    func, args, kwargs, context, state = box[0], box[1], box[2], box[3], box[4]
    try:
        guard = None
        if state is not None:
            import sys
            torch = sys.modules["torch"]
            if torch.get_num_threads() != state[3]:  # OpenMP's count is per thread: results depend on it
                torch.set_num_threads(state[3])
            torch.set_grad_enabled(state[0])
            guard = torch._C._InferenceMode(True) if state[1] else None
            if state[2] is not None:
                torch._C._autograd._push_saved_tensors_default_hooks(*state[2])
        box[5] = (True, context.run(func, *args, **kwargs))
    except BaseException as exc:
        box[5] = (False, exc)


def __peftlab_call__(func, /, *args, **kwargs):
    \"\"\"Call ``func`` on a fresh thread; (ok, value or exception, func, args, kwargs).\"\"\"
    import contextvars
    import threading

    box = [func, args, kwargs, contextvars.Context(), __peftlab_state__(), None]
    thread = threading.Thread(target=__peftlab_bounce__, args=(box,), name="peftlab-call", daemon=True)
    try:
        thread.start()
    except RuntimeError as exc:  # no thread could be started (a process limit)
        return (False, exc, func, args, kwargs)
    while True:
        try:
            thread.join()
            break
        except KeyboardInterrupt:  # the grader's interrupt (a time limit): passed on to the call
            import ctypes
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
    if box[5] is None:
        return (False, RuntimeError("the call ended without a result"), func, args, kwargs)
    return (box[5][0], box[5][1], func, args, kwargs)


def __peftlab_value__(outcome):
    if outcome[0]:
        return outcome[1]
    raise outcome[1]


def __peftlab_short__(value):
    outcome = __peftlab_call__(repr, value)
    text = outcome[1] if outcome[0] and type(outcome[1]) is str else "<" + type(value).__name__ + ">"
    return text if len(text) <= 80 else text[:77] + "..."


def __peftlab_describe__(outcome):
    \"\"\"What `raised` reports of a call's outcome.\"\"\"
    ok, value, func, args, kwargs = outcome
    short = __peftlab_short__
    call = (getattr(func, "__name__", "function") if type(getattr(func, "__name__", None)) is str else "function")
    call = call + "(" + ", ".join([short(a) for a in args] + [str(k) + "=" + short(v) for k, v in kwargs.items()])[:300] + ")"
    if ok:
        return {"call": call, "raised": None, "kinds": [], "message": "", "returned": short(value)}
    if isinstance(value, NotImplementedError) or not isinstance(value, Exception):
        raise value  # an unsolved exercise, or an interrupt: not described but passed on
    text = __peftlab_call__(str, value)
    message = text[1][:1000] if text[0] and type(text[1]) is str else ""
    kinds = [c.__name__ for c in type(value).__mro__ if c.__module__ == "builtins"]
    return {"call": call, "raised": type(value).__name__, "kinds": kinds, "message": message}


def raised(func, *args, **kwargs):
    \"\"\"Call ``func`` and describe the outcome: the exception it raised, or what it returned.
    NotImplementedError (an unsolved exercise) is not described but passed on.\"\"\"
    return __peftlab_describe__(__peftlab_call__(func, *args, **kwargs))


def float_tensors(obj, min_numel=1):
    \"\"\"Every floating-point tensor with at least ``min_numel`` elements reachable from ``obj`` (a
    module's parameters, buffers and plain attributes, and inside objects, lists and dicts it holds),
    as ``(path, tensor)`` pairs: to check that a module keeps no float copy of something. Reads
    objects as they are stored (no attribute hook, iterator or type check of theirs runs).\"\"\"
    import torch

    found, seen = [], set()

    def walk(value, path, depth):
        if id(value) in seen or depth > 6:
            return
        seen.add(id(value))
        kind = type(value)
        if issubclass(kind, torch.Tensor):
            if value.is_floating_point() and value.numel() >= min_numel:
                found.append((path, value))
            return
        if issubclass(kind, dict):
            items = list(dict.items(value))
        elif issubclass(kind, (list, tuple)):
            items = list(enumerate(list.__iter__(value) if issubclass(kind, list) else tuple.__iter__(value)))
        elif issubclass(kind, (set, frozenset)):
            items = list(enumerate(set.__iter__(value) if issubclass(kind, set) else frozenset.__iter__(value)))
        elif issubclass(kind, type) or issubclass(kind, (int, float, str, bytes, bool)):
            return
        else:
            try:
                attributes = object.__getattribute__(value, "__dict__")
            except (AttributeError, TypeError):
                return
            if type(attributes) is not dict or (callable(value) and not issubclass(kind, torch.nn.Module)):
                return
            items = list(dict.items(attributes))
        for key, item in items:
            walk(item, (path + "." + str(key)) if path else str(key), depth + 1)

    walk(obj, "", 0)
    return found
"""
exec(HELPERS)  # noqa: S102 - this module's own raised and float_tensors, from the same text


def _text(exc) -> str:
    try:
        return str(exc)[:1000]
    except Exception:  # noqa: BLE001 - a student's __str__ may raise
        return ""


def _builtin_kinds(exc) -> list[str]:
    return [c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins"]


def describe_error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__[:100], "kinds": _builtin_kinds(exc), "message": _text(exc)}


HELPER_NAMES = ("raised", "float_tensors", "__peftlab_call__", "__peftlab_value__", "__peftlab_describe__")


def _check_globals(namespace: dict, helpers: str) -> dict:
    """Globals for an @observe function: the notebook's names (a copy) over Python's original builtins,
    less any notebook name that shadows a builtin, plus the helpers defined afresh in globals of
    their own (so they see no name of the notebook's)."""
    own = {"__builtins__": dict(_BUILTINS), "__name__": "peftlab.helpers"}
    exec(compile(helpers or HELPERS, "<test helpers>", "exec"), own)
    view = {key: value for key, value in dict.items(namespace)
            if type(key) is str and (key not in _BUILTINS or key.startswith("__"))}
    view["__builtins__"] = own["__builtins__"]
    view.update((name, own[name]) for name in HELPER_NAMES)
    return view


def call_report(source: str, name: str, arguments: str, namespace: dict, helpers: str = "", token: str = "") -> str:
    """Define the @observe function ``name`` from ``source`` over the notebook's ``namespace``
    (`_check_globals`), call it with the encoded ``arguments`` and return the report, marked with the
    grader's ``token`` for this call: the returned value, or the error it raised."""
    scope: dict = {}
    try:
        view = _check_globals(namespace, helpers)
        exec(compile(source, "<check>", "exec"), view, scope)
        args, kwargs = loads(arguments)
        reseed()
        value = scope[name](*args, **kwargs)
        return json.dumps({"ok": True, "value": encode(value), "token": token}, allow_nan=False, separators=(",", ":"))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit included: it is the student's
        return json.dumps({"ok": False, "error": describe_error(exc), "token": token}, separators=(",", ":"))


def run(source: str, name: str, arguments: str, helpers: str = "", token: str = "") -> None:
    """In the student's kernel, sent by the grader: `call_report` in the notebook's namespace, the
    report published as display data of its own type (never shown: the grader collects it). The
    request's text, which holds the call's token, is first removed from where the kernel keeps it; a
    display machinery changed since `arm` raises instead (the grader then refuses the call)."""
    from IPython import get_ipython

    shell = get_ipython()
    _scrub(shell, token)
    changed = _changed(shell)  # before the student's code runs too: a signal handler would see this frame
    if changed:
        raise RuntimeError(f"the kernel's display machinery was changed ({changed}): not run")
    report = call_report(source, name, arguments, shell.user_ns, helpers, token)
    changed = _changed(shell)
    if changed:
        raise RuntimeError(f"the kernel's display machinery was changed ({changed}): report withheld")
    _ARMED[1](shell.display_pub, {MIME: report})


_ARMED: tuple = ()
_PUBLISHING = ("publish", "send", "serialize", "sign", "pack", "msg", "send_multipart")  # methods an instance may shadow


_SESSION_TRAITS = ("pack", "unpack", "auth", "key", "digest_mod", "signature_scheme", "session", "bsession", "packer")


def _publishing(shell) -> tuple:
    """The objects, class functions and settings a display passes through, as they are now."""
    pub = shell.display_pub
    session, socket = getattr(pub, "session", None), getattr(pub, "pub_socket", None)
    thread = getattr(socket, "io_thread", None)
    traits = getattr(session, "_trait_values", {})
    return (pub, type(pub).publish, session, type(session).send, type(session).serialize, type(session).sign,
            type(session).msg, socket, getattr(type(socket), "send_multipart", None), thread,
            *(getattr(type(thread), name, None) for name in ("send_multipart", "schedule", "_really_send")),
            *(traits.get(name) for name in _SESSION_TRAITS), *_signal_handlers())


def _signal_handlers() -> tuple:
    """The signal handlers (a handler runs on the main thread, where a test's call waits: its frame is
    the handler's argument), SIGINT aside: the kernel sets that one itself around each request."""
    import signal

    return tuple(signal.getsignal(s) for s in sorted(signal.valid_signals()) if s != signal.SIGINT)


# Operations that reach other threads' frames, every object, or the process's memory: a test's call
# (its token, its source) waits on the main thread's stack while the student's code runs.
_BLOCKED = frozenset({"sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
                      "gc.get_referents", "sys.settrace", "sys.setprofile"})
_SEEN: list = []


_PROCESS_MEMORY = re.compile(r"/proc/[^/]+(/task/[^/]+)?/mem")


def _guard(event: str, args: tuple) -> None:
    path = args[0] if event == "open" and args and isinstance(args[0], (str, bytes)) else ""
    if event in _BLOCKED or (path and _PROCESS_MEMORY.fullmatch(os.fsdecode(path))):
        if len(_SEEN) < 64:
            _SEEN.append(event)
        raise RuntimeError(f"{event} is not available while work is graded")


def arm() -> None:
    """Keep the kernel's display machinery as it is, and block the operations in `_BLOCKED` from now
    on (an audit hook: Python cannot remove one). The grader calls this before any student code."""
    global _ARMED
    import sys

    from IPython import get_ipython

    if not _ARMED:
        _ARMED = _publishing(get_ipython())
        sys.addaudithook(_guard)


def _changed(shell) -> str:
    """What of the display machinery differs from `arm`'s: replaced objects or class functions, or
    instance attributes that shadow their methods."""
    if not _ARMED:
        return ""
    now = _publishing(shell)
    signals = len(_signal_handlers())
    if any(a is not b for a, b in zip(now[-signals:], _ARMED[-signals:])):
        return "signal handlers"
    if any(a is not b for a, b in zip(now, _ARMED)):
        return "replaced"
    shadowed = [name for obj in (now[0], now[2], now[7]) for name in _PUBLISHING
                if isinstance(getattr(obj, "__dict__", None), dict) and name in obj.__dict__]
    return ", ".join(shadowed)


def _scrub(shell, token: str) -> None:
    """Remove the current request's text from the kernel's copies of it (the request itself, the
    cell's entry in linecache, IPython's execution info): student code cannot find the token there."""
    import linecache

    if not token:
        return
    kernel = getattr(shell, "kernel", None)
    parent = getattr(kernel, "get_parent", lambda *a: None)()  # one dict, which the kernel's context variables share
    content = parent.get("content") if isinstance(parent, dict) else None
    if isinstance(content, dict) and token in str(content.get("code", "")):
        content["code"] = ""
    for key, entry in list(linecache.cache.items()):
        if len(entry) > 2 and isinstance(entry[2], list) and any(token in line for line in entry[2][:1]):
            linecache.cache.pop(key, None)
    for result in (getattr(getattr(shell, "displayhook", None), "exec_result", None), getattr(shell, "last_execution_result", None)):
        info = getattr(result, "info", None)
        if token in str(getattr(info, "raw_cell", "")):
            info.raw_cell = ""


# Calls left as they are by `trampolined`: those that need the caller's own frame, and the helper
# that only reads objects.
_DIRECT = frozenset({"super", "locals", "globals", "vars", "dir", "eval", "exec", "float_tensors", "__peftlab_call__",
                     "__peftlab_value__", "__peftlab_describe__"})
_RAISED = "raised"


class _Trampoline(ast.NodeTransformer):
    def visit_Call(self, node):
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Name) and func.id in _DIRECT:
            return node
        if isinstance(func, ast.Name) and func.id == _RAISED and node.args and not isinstance(node.args[0], ast.Starred):
            call = ast.Call(ast.Name("__peftlab_call__", ast.Load()), node.args, node.keywords)
            return ast.Call(ast.Name("__peftlab_describe__", ast.Load()), [call], [])
        call = ast.Call(ast.Name("__peftlab_call__", ast.Load()), [func, *node.args], node.keywords)
        return ast.Call(ast.Name("__peftlab_value__", ast.Load()), [call], [])


CHECK = "check"  # every @observe function's name in the kernel: the name says nothing of the test


def trampolined(source: str) -> str:
    """An @observe function's source with every call it makes (``f(x)``, ``raised(f, x)``) made through
    the helpers' trampoline (`HELPERS`), and the function named `CHECK`, so that no call can tell which
    test, or which kind of check, made it. Run by the grader on the tests' own source."""
    tree = _Trampoline().visit(ast.parse(source))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            node.name = CHECK
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def read_report(text: str, token: str | None = None, seconds: float = DECODE_SECONDS, budget: Budget | None = None):
    """The grader's side of `run`: the returned value, or KernelError for what the code raised. With
    ``token``, only a report marked with it (the one the grader's call asked for) is read."""
    if not isinstance(text, str) or len(text) > MAX_BYTES:
        raise ReportError("report missing or too large")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ReportError("the report is not valid JSON") from None
    if type(data) is not dict or type(data.get("ok")) is not bool:
        raise ReportError("malformed report")
    if token is not None and not (type(data.get("token")) is str and hmac.compare_digest(data["token"], token)):
        raise ReportError("a report not made by the grader's call (its token is wrong or missing)")
    if data["ok"]:
        if "value" not in data:
            raise ReportError("malformed report")
        return decode(data["value"], _budget=budget or Budget(seconds))
    error = data.get("error")
    if type(error) is not dict or type(error.get("type")) is not str or type(error.get("message", "")) is not str:
        raise ReportError("malformed error report")
    raise KernelError(error["type"][:100], error.get("message", "")[:1000])
