"""Assertion helpers for the notebooks' test cells, so their failure messages tell a student what to fix
rather than print a bare traceback.

`assert_close` and `expect_error` check values an ``@observe`` function returned (see
`peftlab.probe`); `raised` and `float_tensors` are for use inside one (the grader sends its own copy of
them with every observation).

Importing this module in a notebook also keeps the tests' reference code (`peftlab.reference`) out of
the notebook's namespace: after every cell, the names a test cell imported from it are removed again,
so that no answer can call them (see `forget_reference`).
"""

from __future__ import annotations

import math
import sys

from peftlab.probe import Unreadable, float_tensors, observe, raised  # noqa: F401 - the test cells' imports
from peftlab.rules import answers_must_not_use  # noqa: F401 - the imports cell declares the notebook's rule
from peftlab.quiz import check_answer  # noqa: F401 - the quiz tests give instant feedback


def expect_error(error: type[BaseException], outcome, hint: str = "") -> None:
    """Assert that a call described by `peftlab.probe.raised` raised ``error`` (or a subclass of it);
    ``hint`` says why it should."""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("kinds"), list):
        raise AssertionError(f"expected the outcome of a call (from raised(...)), got {outcome!r}")
    call = outcome.get("call", "the call")
    if error.__name__ in outcome["kinds"]:
        return
    if outcome.get("raised"):
        raise AssertionError(f"{call} raised {outcome['raised']}: {outcome.get('message', '')}; expected "
                             f"{error.__name__}. {hint}".strip())
    raise AssertionError(f"{call} returned {outcome.get('returned', '')} without raising {error.__name__}. "
                         f"{hint}".strip())


def assert_close(actual, expected, rel: float = 1e-9, abs_tol: float = 0.0, what: str = "value") -> None:
    """Assert two numbers agree within a relative tolerance, naming ``what`` in the message."""
    if type(actual) not in (int, float):
        raise AssertionError(f"{what} should be a number (int or float), got {type(actual).__name__}: {actual!r}")
    if not math.isclose(actual, expected, rel_tol=rel, abs_tol=abs_tol):
        raise AssertionError(f"{what} should be {expected:,.6g}, got {actual:,.6g}")


def forget_reference(*_) -> list[str]:
    """Take the tests' reference code out of the notebook's namespace: every global bound to
    `peftlab.reference` or to one of its functions, and the package's ``reference`` attribute (the
    module stays loaded, so a test cell's next import costs nothing). Runs after every cell; returns
    the names removed."""
    module = sys.modules.get("peftlab.reference")
    shell = _shell()
    if module is None or shell is None:
        return []
    oracles = {id(module)} | {id(value) for value in vars(module).values()
                               if getattr(value, "__module__", None) == module.__name__}
    removed = [name for name, value in list(shell.user_ns.items()) if id(value) in oracles]
    for name in removed:
        del shell.user_ns[name]
    package = sys.modules.get("peftlab")
    if package is not None and vars(package).get("reference") is module:
        delattr(package, "reference")
    return removed


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _watch() -> None:
    shell = _shell()
    if shell is not None and forget_reference not in shell.events.callbacks.get("post_run_cell", []):
        shell.events.register("post_run_cell", forget_reference)


_watch()

# What 07's recipe tests compare, as plain data: the same description of the learner's object (in the
# notebook's kernel) and of the lab's own (in the grader).

ARGUMENT_FIELDS = ("output_dir", "max_steps", "seed", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type",
                   "warmup_steps", "max_grad_norm", "optim", "bf16", "fp16", "use_cpu", "activation_checkpointing",
                   "activation_checkpointing_kwargs", "logging_steps", "save_strategy", "remove_unused_columns",
                   "dataloader_num_workers")


def describe_4bit(model) -> dict:
    """Each linear layer of ``model``: 4-bit (its format and compute dtype) or plain (its dtype)."""
    import bitsandbytes as bnb
    import torch

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            layers[name] = {"kind": "4-bit", "quant_type": state.quant_type, "double_quant": bool(state.nested),
                            "blocksize": int(state.blocksize), "compute_dtype": module.compute_dtype}
        elif isinstance(module, torch.nn.Linear):
            layers[name] = {"kind": "plain", "dtype": module.weight.dtype}
    return {"class": type(model).__name__, "layers": layers,
            "devices": sorted({str(p.device) for p in model.parameters()})}


def describe_adapter(model) -> dict:
    """A peft model's LoRA configuration, what trains (name, shape, dtype), the dtypes of the frozen
    parameters that are not 4-bit, and its gradient checkpointing (on, and the ``use_reentrant`` it
    passes; "unset" when it passes none)."""
    config = getattr(model, "peft_config", {}).get("default") if isinstance(getattr(model, "peft_config", None), dict) else None
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "bias", "modules_to_save", "use_dora",
              "use_rslora")
    described = None
    if config is not None:
        described = {}
        for name in fields:
            value = getattr(config, name, None)
            value = sorted(value) if isinstance(value, (set, frozenset)) else value
            described[name] = str(value) if name == "task_type" and value is not None else value
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    func = getattr(checkpointed[0], "_gradient_checkpointing_func", None) if checkpointed else None
    return {"class": type(model).__name__, "config": described,
            "trainable": {n: [list(p.shape), p.dtype] for n, p in model.named_parameters() if p.requires_grad},
            "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters()
                                     if not p.requires_grad and type(p).__name__ != "Params4bit"}),
            "checkpointing": bool(checkpointed),
            "use_reentrant": getattr(func, "keywords", {}).get("use_reentrant", "unset") if func else None}


def describe_arguments(args) -> dict:
    """The `TrainingArguments` fields the lab's run depends on (`ARGUMENT_FIELDS`), as `to_dict` gives them."""
    values = args.to_dict() if hasattr(args, "to_dict") else {}
    return {"class": type(args).__name__, **{name: values.get(name) for name in ARGUMENT_FIELDS}}


__all__ = ["ARGUMENT_FIELDS", "Unreadable", "assert_close", "describe_4bit", "describe_adapter", "describe_arguments", "expect_error", "float_tensors", "forget_reference", "observe", "raised"]
