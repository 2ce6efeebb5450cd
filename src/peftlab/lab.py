"""The GPU lab's training run: QLoRA (or LoRA) fine-tuning of a causal LM on the course task with
`transformers`' Trainer, measured end to end. Notebook 07 calls these functions step by step; the
command line runs the same code headless:

    python -m peftlab.lab --max-steps 60                          # offline SmolLM2, GPU if there is one
    python -m peftlab.lab --model Qwen/Qwen2.5-0.5B-Instruct ...  # any hub model, when online
    accelerate launch --multi_gpu --num_processes 2 -m peftlab.lab ...        # data parallel over 2 GPUs (or CPU processes)

Everything it measures goes to ``<output_dir>/results.json`` (and a loss plot, the adapter, sample
generations), so an instructor can collect one file per run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

# A CPU trains at well under a step a second here (benchmarks/run.py --only-lab): runs there are capped.
CPU_LIMITS = {"max_steps": 20, "max_seq_len": 64, "batch_size": 8, "n_test": 32}


@dataclass
class LabConfig:
    model: str = "SmolLM2-135M-Instruct"   # the offline default; a local folder; or any causal LM on the hub
    max_steps: int = 60
    max_seq_len: int = 64
    batch_size: int | None = 8              # None: the largest that fits the GPU (reference.training_settings)
    learning_rate: float | None = None      # None: by model size (hardware.default_hyperparameters)
    warmup_ratio: float | None = None
    lr_scheduler_type: str | None = None
    max_grad_norm: float | None = None
    load_in_4bit: bool = True               # QLoRA; False: LoRA over a 16-bit (GPU) or fp32 (CPU) base
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list = "all-linear"  # peft's shorthand: every linear layer but the output layer
    n_train: int = 512
    n_test: int = 64
    seed: int = 0
    output_dir: str = "lab_output"
    gradient_checkpointing: bool | None = None  # None: decided by reference.training_settings
    merge_on: str = "auto"                  # where to reload and merge the adapter: auto, cpu, gpu
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict) -> "LabConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown lab settings: {unknown}; known: {sorted(known)}")
        return cls(**values)


def environment() -> dict:
    """Device, memory and precision of this machine (precision from the GPU's compute capability)."""
    from peftlab import hardware

    device = hardware.current_device(_local_rank() if torch.cuda.is_available() else None)
    info = {"torch": torch.__version__, "cuda": device.is_gpu, "cpu_cores": os.cpu_count(), "device": device.name,
            "gpus": device.count if device.is_gpu else 0, "memory_gib": device.total_memory / hardware.GiB,
            "compute_capability": ".".join(map(str, device.capability)) if device.is_gpu else None,
            "precision": hardware.precision(device), "cuda_version": torch.version.cuda if device.is_gpu else None}
    from importlib.metadata import PackageNotFoundError, version

    try:  # its version, without importing it (which sets up its CUDA backend)
        info["bitsandbytes"] = version("bitsandbytes")
    except PackageNotFoundError:
        info["bitsandbytes"] = None
    info["_device"] = device
    return info


def device_of(env: dict):
    from peftlab import hardware

    return env.get("_device") or (hardware.KNOWN_GPUS["A100-80GB"] if env.get("cuda") else hardware.cpu_device())


def fit_to_machine(config: LabConfig, env: dict | None = None, quiet: bool = False) -> LabConfig:
    """On a CPU, cap the run at `CPU_LIMITS` and say so in ``config.notes``."""
    env = env or environment()
    if env["cuda"]:
        return config
    changed = []
    for key, limit in CPU_LIMITS.items():
        value = getattr(config, key)
        if value is None or value > limit:
            setattr(config, key, limit)
            changed.append(f"no GPU: {key} {value} -> {limit}")
    if changed:
        config.notes += changed
        if not quiet:
            print("No GPU found: running small CPU settings (" + "; ".join(changed) + ")")
    return config


def model_path(config: LabConfig) -> str:
    from peftlab.models import smollm2_path

    return smollm2_path() if config.model in ("SmolLM2-135M-Instruct", "smollm2") else config.model


def model_config(config: LabConfig):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path(config))


def settle(config: LabConfig, env: dict) -> LabConfig:
    """Fill what the config leaves open from the device and the model's size: precision-dependent
    batch size and gradient checkpointing (`peftlab.reference.training_settings`), learning rate, warmup,
    schedule and gradient clipping (`hardware.default_hyperparameters`)."""
    from peftlab import hardware, reference

    device, mconfig = device_of(env), model_config(config)
    n_params = hardware.meta_inventory(mconfig)["total"]
    for key, value in hardware.default_hyperparameters(n_params, device.is_gpu).items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    if config.batch_size is None or config.gradient_checkpointing is None:
        predict = lambda batch, checkpointing: predict_for(config, env, mconfig, batch, checkpointing)["total"]  # noqa: E731
        chosen = reference.training_settings(device, predict)
        if chosen["batch_size"] == 0:
            raise SystemExit(f"{config.model} does not fit {device.name} ({device.total_memory / hardware.GiB:.0f} GiB) "
                             f"even with a batch of one sequence of {config.max_seq_len} tokens and gradient checkpointing")
        if config.gradient_checkpointing is None:
            config.gradient_checkpointing = chosen["gradient_checkpointing"]
        if config.batch_size is None:
            config.batch_size = chosen["batch_size"]
            config.notes.append(f"batch size {config.batch_size}: the largest that fits {device.name}")
    return config


def predict_for(config: LabConfig, env: dict, mconfig=None, batch_size=None, checkpointing=None) -> dict:
    """`peftlab.reference.predict_peak_bytes` for this run, plus on a CPU the terms only a CPU run has."""
    from peftlab import hardware, reference

    device = device_of(env)
    mconfig = mconfig or model_config(config)
    terms = reference.predict_peak_bytes(
        mconfig, batch_size=batch_size or config.batch_size, seq_len=config.max_seq_len, r=config.r,
        target_modules=config.target_modules, load_in_4bit=config.load_in_4bit,
        compute_dtype=hardware.compute_dtype(device), optimizer=hardware.optimizer_for(device, config.load_in_4bit),
        gradient_checkpointing=bool(config.gradient_checkpointing if checkpointing is None else checkpointing),
        lora_dropout=config.lora_dropout)
    if not device.is_gpu:
        extra = cpu_terms(mconfig, config, terms)
        terms.update(extra)
        terms["total"] += sum(extra.values())
    return terms


def cpu_terms(mconfig, config: LabConfig, terms: dict) -> dict:
    """What a CPU run holds on top of the training step's terms:

    - ``fp32_copy_while_quantizing``: loading in 4 bits reads every linear weight from the (fp32)
      checkpoint and quantizes it. transformers maps the checkpoint file into memory, so the pages read
      stay resident (file-backed, counted in the process's resident memory) for as long as the mapping
      lives, the whole run here: 4 bytes per quantized parameter. Unquantized weights need no extra
      copy: they are the mapped pages themselves. (On a GPU, none of this is in the GPU's memory.)

    What the allocator keeps of freed memory (measured on SmolLM2: 100 to 450 MB after loading,
    depending on how many threads allocated) is handed back to the system at each phase
    (`MemoryMeter.mark`), so it is neither predicted nor measured.
    """
    from peftlab import hardware

    n_quantized = hardware.meta_inventory(mconfig)["quantized"] if config.load_in_4bit else 0
    return {"fp32_copy_while_quantizing": 4 * n_quantized}


def prediction(config: LabConfig, env: dict | None = None) -> dict:
    """Predicted peak memory before anything is loaded: parameter counts from the model's config on
    PyTorch's meta device (no memory), terms named as in `peftlab.reference.predict_peak_bytes`."""
    env = env or environment()
    terms = predict_for(config, env)
    return {"base_parameters": _base_parameters(config), "trainable_parameters": terms["trainable_parameters"],
            "bytes": {k: v for k, v in terms.items() if k != "trainable_parameters"}}


def _base_parameters(config: LabConfig) -> int:
    from peftlab import hardware

    return hardware.meta_inventory(model_config(config))["total"]


class MemoryMeter:
    """Peak memory of the run, measured like the prediction. On a GPU, what PyTorch allocated on this
    rank's device (`torch.cuda.max_memory_allocated`, reset once the rank has selected its GPU): the
    prediction's total. On a CPU, the process's resident memory sampled every 20 ms above what
    it held before the model was loaded (the Python runtime and libraries), with marks between phases
    (loaded, trained), so that each part compares with its own terms."""

    def __init__(self):
        import threading

        self.gpu = torch.cuda.is_available()
        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
        self.baseline = self.peak = self._rss()
        self.marks: dict[str, float] = {}
        self._phase_peak = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best there is
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0

    def _sample(self):
        while not self._stop.wait(0.02):
            rss = self._rss()
            self.peak, self._phase_peak = max(self.peak, rss), max(self._phase_peak, rss)

    def mark(self, name: str) -> None:
        """Resident memory now (above the baseline), and the phase's peak, under ``name``. On a CPU the
        allocator first hands what it keeps of freed memory back to the system (glibc's malloc_trim):
        what it retains otherwise depends on how many threads allocated, and is not the run's."""
        gc.collect()  # what is only waiting for the cycle collector is not part of the phase
        if not self.gpu:
            _trim()
        if self.gpu:
            self.marks[name] = float(torch.cuda.memory_allocated())
            self.marks[f"{name} (peak)"] = float(torch.cuda.max_memory_allocated())
            return
        rss = self._rss()
        self.marks[name] = rss - self.baseline
        self.marks[f"{name} (peak)"] = max(self._phase_peak, rss) - self.baseline
        self._phase_peak = rss

    def stop(self) -> tuple[float, str]:
        self._stop.set()
        self._thread.join()
        if self.gpu:
            return float(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
        return self.peak - self.baseline, "peak resident memory above the process's size before loading"


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back
        pass


def _select_device() -> None:
    """Under accelerate or torchrun each process owns one GPU: select it before measuring or loading."""
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_rank())


def run_settings(config: LabConfig, env: dict) -> dict:
    """How this run computes, as `training_settings` says it (the recipe's pieces read it): the
    device's precision and optimizer, the settled checkpointing and batch size."""
    from peftlab import hardware

    return {"precision": env["precision"], "optimizer": hardware.optimizer_for(device_of(env), config.load_in_4bit),
            "gradient_checkpointing": bool(config.gradient_checkpointing), "batch_size": config.batch_size}


@dataclass
class Recipe:
    """The pieces of a QLoRA run that a practitioner writes (notebook 07 asks the learner for each):

    - ``load_in_4bit(path, settings, device_map)``: the model, its linear layers in NF4;
    - ``add_lora(model, config, settings)``: prepared for k-bit training, LoRA added (a peft model);
    - ``collate(examples, tokenizer, max_seq_len)``: a batch of course-task examples;
    - ``training_arguments(config, settings)``: the Trainer's `TrainingArguments`.

    A piece left None is the lab's own (`peftlab.reference`); so is one that raises
    NotImplementedError (a notebook's unwritten exercise), and `origins` says which ran."""

    load_in_4bit: Callable | None = None
    add_lora: Callable | None = None
    collate: Callable | None = None
    training_arguments: Callable | None = None
    used: dict = field(default_factory=dict)

    def call(self, piece: str, *args):
        from peftlab import reference

        mine = getattr(self, piece)
        if mine is not None and self.used.get(piece) != "the lab's (yours is not written yet)":
            try:
                result = mine(*args)
                self.used[piece] = "yours"
                return result
            except NotImplementedError:
                print(f"{piece}: not written yet, so the lab uses its own")
                self.used[piece] = "the lab's (yours is not written yet)"
        self.used.setdefault(piece, "the lab's")
        return getattr(reference, REFERENCE_PIECES[piece])(*args)

    def origins(self) -> dict:
        return {piece: self.used.get(piece, "not used") for piece in REFERENCE_PIECES}


REFERENCE_PIECES = {"load_in_4bit": "load_in_4bit", "add_lora": "add_lora", "collate": "collate_examples",
                    "training_arguments": "training_arguments"}


def load(config: LabConfig, device: str | None = None, full_precision: bool = False,
         recipe: Recipe | None = None, settings: dict | None = None):
    """(model, tokenizer) for the config: the offline SmolLM2 by default, a local folder, else a hub
    model; in 4 bits through the recipe's ``load_in_4bit`` when ``load_in_4bit``. ``device="cpu"``
    loads onto the CPU (in fp32); ``full_precision`` loads without 4-bit weights (for merging an adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab import hardware
    from peftlab.models import _quiet_progress
    from peftlab.quant import disable_cpu_weight_repacking

    path = model_path(config)
    gpu = torch.cuda.is_available() and device != "cpu"
    compute = hardware.compute_dtype(hardware.current_device(_local_rank())) if gpu else torch.float32
    if config.load_in_4bit and not full_precision:
        settings = settings or run_settings(config, environment())
        with _quiet_progress(True):
            model = (recipe or Recipe()).call("load_in_4bit", path, settings, {"": _local_rank()} if gpu else "cpu")
        disable_cpu_weight_repacking(model)  # a CPU's repacked inference weights lose gradients (peftlab.quant)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=compute)
        if gpu:
            model = model.to(f"cuda:{_local_rank()}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def add_adapter(model, config: LabConfig, settings: dict | None = None, recipe: Recipe | None = None):
    """LoRA on ``config.target_modules`` ("all-linear" by default: any architecture): over a 4-bit
    base through the recipe's ``add_lora``; over a 16-bit one the same way without the k-bit
    preparation. Gradient checkpointing, when on, is the non-reentrant kind (what DDP and frozen bases need)."""
    from peft import LoraConfig, get_peft_model

    settings = settings or {"gradient_checkpointing": bool(config.gradient_checkpointing)}
    if config.load_in_4bit:
        return (recipe or Recipe()).call("add_lora", model, config, settings)
    if settings["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=config.target_modules)
    return get_peft_model(model, lora)


def precision_flags(env: dict) -> dict:
    """The Trainer's precision switches and optimizer for the device in ``env``."""
    from peftlab import hardware

    device = device_of(env)
    chosen = hardware.precision(device)
    return {"bf16": chosen == "bf16", "fp16": chosen == "fp16", "use_cpu": not device.is_gpu,
            "optim": hardware.optimizer_for(device, True)}


def training_arguments(config: LabConfig, env: dict, recipe: Recipe | None = None):
    """`transformers.TrainingArguments` for the lab from the recipe's ``training_arguments`` (precision
    from the device's compute capability: bf16 from 8.0, fp16 with loss scaling below, fp32 on a CPU;
    the optimizer for the device), with what only the lab decides: the progress bar, and DDP's
    search for unused parameters off under several processes (LoRA uses every one)."""
    args = (recipe or Recipe()).call("training_arguments", config, run_settings(config, env))
    args.disable_tqdm = False
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        args.ddp_find_unused_parameters = False
    return args


def _write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def _gather(value: float) -> list[float]:
    """Every rank's ``value`` (one list on every rank), or ``[value]`` outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def _leave_process_group() -> None:
    """End a distributed run together: every rank waits until the main one has evaluated and saved,
    then each leaves the process group. A rank that simply exited while the group still existed could
    abort in gloo's teardown ("terminate called without an active exception", SIGABRT), and the
    launcher then killed the main rank mid-evaluation (2 of 15 two-process runs without this wait; 0 of
    14 with it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(config: LabConfig, progress: bool = True, recipe: Recipe | None = None, quiet: bool = False) -> dict:
    """Train, measure and save; return (and write to ``results.json``) every figure. ``recipe``
    supplies the pieces of a QLoRA run (`Recipe`; default: the lab's own). ``results.json`` is written
    as soon as training ends, again after the evaluation, and after the adapter's reload and merge,
    which can fail without costing the run's figures."""
    import peft  # noqa: F401 - every library is imported before the memory baseline is taken
    import transformers.trainer  # noqa: F401

    import peftlab.training  # noqa: F401
    from peftlab.task import evaluate, make_splits

    if config.load_in_4bit:
        import bitsandbytes  # noqa: F401

    _select_device()
    env = environment()
    config = settle(fit_to_machine(config, env, quiet=quiet), env)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", 0)) == 0
    torch.manual_seed(config.seed)
    predicted = predict_for(config, env)
    recipe = recipe or Recipe()
    settings = run_settings(config, env)
    meter = MemoryMeter()

    start = time.perf_counter()
    model, tokenizer = load(config, recipe=recipe, settings=settings)
    load_seconds = time.perf_counter() - start
    meter.mark("loaded")
    n_base = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    train_set, test_set = make_splits(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    accuracy_before = evaluate(model, tokenizer, test_set) if main_process else None

    model = add_adapter(model, config, settings, recipe)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meter.mark("ready to train")
    args = training_arguments(config, env, recipe)
    trainer, log = _train(model, tokenizer, train_set, config, args, recipe, quiet=quiet or not progress)
    log["load_seconds"] = load_seconds
    meter.mark("trained")
    peak, peak_source = meter.stop()
    env_out = {k: v for k, v in env.items() if not k.startswith("_")}
    results = {"config": asdict(config), "environment": env_out, "world_size": log["world"],
               "parameters": {"base": n_base, "trainable": n_trainable, "trainable_percent": 100 * n_trainable / n_base},
               "memory": {"predicted_bytes": {k: v for k, v in predicted.items() if k != "trainable_parameters"},
                          "measured_peak_bytes": peak, "measured_with": peak_source,
                          "per_rank_peak_bytes": _gather(peak), "phases": meter.marks,
                          "comparison": memory_comparison(predicted, meter.marks, peak, env_out["cuda"])},
               "timing": _timing(log, config), "loss": log["losses"], "recipe": recipe.origins()}
    if not main_process:
        return results
    _write(results, out)  # the figures are safe before anything else can fail
    _evaluate(results, model, tokenizer, test_set, accuracy_before, out)
    trainer.model_wrapped = trainer.model = trainer.optimizer = trainer.lr_scheduler = None
    del trainer  # the optimizer's state goes before the merge needs its memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        results["adapter"] = save_reload_merge(model, tokenizer, out, config, test_set[0].prompt)
    except Exception as exc:  # noqa: BLE001 - the merge check never costs the run
        results["adapter"] = {"error": f"{type(exc).__name__}: {exc}"}
    _write(results, out)
    return results


def _train(model, tokenizer, train_set, config: LabConfig, args, recipe: Recipe, quiet: bool):
    """Train with the Trainer; (the trainer, its log: losses, step times, seconds, tokens, world size)."""
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

    from peftlab.training import encode

    log = {"losses": [], "step_times": []}

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            log["step_times"].append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log["losses"].append(float(logs["loss"]))

    trainer = Trainer(model=model, args=args, train_dataset=list(train_set), callbacks=[Record()],
                      data_collator=lambda examples: recipe.call("collate", examples, tokenizer, config.max_seq_len))
    if quiet:
        trainer.args.disable_tqdm = True
        for callback in (ProgressCallback, PrinterCallback):  # the Trainer's bar, and the dict it prints
            trainer.remove_callback(callback)
    model.train()
    start = time.perf_counter()
    trainer.train()
    log["train_seconds"] = time.perf_counter() - start
    log["world"] = int(os.environ.get("WORLD_SIZE", 1))
    lengths = [min(len(encode(tokenizer, example)[0]), config.max_seq_len) for example in train_set]
    log["tokens"] = sum(lengths) / len(lengths) * config.batch_size * config.max_steps * log["world"]
    return trainer, log


def _timing(log: dict, config: LabConfig) -> dict:
    steps = sorted(log["step_times"])
    return {"load_seconds": log["load_seconds"], "train_seconds": log["train_seconds"],
            "steps_per_second": config.max_steps / log["train_seconds"],
            "tokens_per_second": log["tokens"] / log["train_seconds"],
            "median_step_seconds": steps[len(steps) // 2] if steps else None}


def _evaluate(results: dict, model, tokenizer, test_set, accuracy_before, out: Path) -> None:
    """Accuracy after training, samples and the loss plot, into ``results`` (and written)."""
    from peftlab.task import evaluate, extract_answer, generate_answers

    model.eval()
    results["accuracy"] = {"before": accuracy_before, "after": evaluate(model, tokenizer, test_set),
                           "test_examples": len(test_set)}
    results["samples"] = [{"prompt": e.text, "target": e.target, "output": extract_answer(o)} for e, o in
                          zip(test_set[:5], generate_answers(model, tokenizer, [e.prompt for e in test_set[:5]]))]
    _plot_losses(results["loss"], out / "loss.png")
    _write(results, out)


def memory_comparison(predicted: dict, marks: dict, peak: float, gpu: bool) -> dict:
    """Predicted against measured, like with like. On a GPU: the allocator's peak against the
    prediction's total (both without the CUDA context). On a CPU, each phase against its own terms:
    the memory when training starts (the weights, the mapped fp32 checkpoint pages a 4-bit load read,
    the adapter), the growth during training (gradients, optimizer state, activations, logits, the
    dequantized weight), and the whole run."""
    if gpu:
        rows = {"whole run": (predicted["total"], peak)}
    else:
        weights = predicted["quantized_weights"] + predicted["unquantized_weights"]
        training = sum(predicted[k] for k in ("gradients", "optimizer_state", "activations", "logits", "dequantized_weight"))
        growth = max(0.0, marks.get("trained (peak)", 0.0) - marks.get("ready to train", 0.0))
        before = weights + predicted["fp32_copy_while_quantizing"] + predicted["adapter_weights"]
        rows = {"before training": (before, marks.get("ready to train", 0.0)),
                "training (growth)": (training, growth), "whole run": (predicted["total"], peak)}
    return {name: {"predicted": p, "measured": m, "ratio": m / p if p else None} for name, (p, m) in rows.items()}


def merge_device(config: LabConfig) -> str:
    """Where to reload and merge: on the GPU only when a 16-bit copy of the base fits twice in what is
    free beside the trained model (``merge_on="auto"``), else on the CPU (in fp32)."""
    if config.merge_on != "auto":
        return config.merge_on
    if not torch.cuda.is_available():
        return "cpu"
    free, _ = torch.cuda.mem_get_info()
    return "gpu" if free > 2 * 2 * _base_parameters(config) else "cpu"


def save_reload_merge(model, tokenizer, out: Path, config: LabConfig, prompt: str) -> dict:
    """Save the adapter, report its size, reload it onto a fresh full-precision base and merge it; the
    merged model's logits must match the reloaded one's. The fresh base goes to the GPU only when it
    fits beside the trained model (``merge_on="auto"``), else to the CPU in fp32."""
    from peft import PeftModel

    folder = out / "adapter"
    model.save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        trained_logits = model(**ids).logits.float().cpu()
    where = merge_device(config)
    fresh = load(config, device="cpu" if where == "cpu" else None, full_precision=True)[0]
    reloaded = PeftModel.from_pretrained(fresh, folder)
    reloaded.eval()
    ids = ids.to(reloaded.device)
    with torch.no_grad():
        reloaded_logits = reloaded(**ids).logits.float()
        merged = reloaded.merge_and_unload()
        merged_logits = merged(**ids).logits.float()
    return {"path": str(folder), "bytes": size, "merged_on": where,
            # merging must not change what the reloaded adapter computes (same base, same precision)
            "merged_max_logit_difference": (merged_logits - reloaded_logits).abs().max().item(),
            # a 16/32-bit base differs from the 4-bit one it was trained on: the quantization error
            "base_precision_max_logit_difference": (reloaded_logits.cpu() - trained_logits).abs().max().item(),
            "merged_onto": "a 16/32-bit copy of the base (4-bit weights cannot hold a merged update exactly)"}


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("lab run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(results: dict) -> str:
    """A short table of the run's figures."""
    mem = results["memory"]
    env = results["environment"]
    lines = [
        f"device: {env['device']} x{max(results['world_size'], 1)} ({env['precision']}), "
        f"{'QLoRA (NF4)' if results['config']['load_in_4bit'] else 'LoRA'}, "
        f"{results['parameters']['trainable']:,} trainable ({results['parameters']['trainable_percent']:.2f} %)",
        f"speed: {results['timing']['steps_per_second']:.2f} steps/s, {results['timing']['tokens_per_second']:,.0f} tokens/s",
        f"memory: predicted {mem['predicted_bytes']['total'] / 1e9:.2f} GB, measured peak "
        f"{mem['measured_peak_bytes'] / 1e9:.2f} GB ({mem['measured_with']})",
    ]
    for name, row in mem["comparison"].items():
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        lines.append(f"  {name:<20} predicted {row['predicted'] / 1e9:6.2f} GB, measured {row['measured'] / 1e9:6.2f} GB"
                     f" (measured / predicted {ratio})")
    if "accuracy" in results:
        acc = results["accuracy"]
        lines.append(f"accuracy: {acc['before']:.0%} -> {acc['after']:.0%} on {acc['test_examples']} test dates")
    adapter = results.get("adapter", {})
    if "error" in adapter:
        lines.append(f"adapter: saved, but the reload and merge check failed: {adapter['error']}")
    elif adapter:
        lines.append(f"adapter: {adapter['bytes'] / 1e6:.1f} MB; reloaded and merged on the {adapter['merged_on']}: logits "
                     f"change by {adapter['merged_max_logit_difference']:.1e}; on the full-precision base instead of "
                     f"the 4-bit one by up to {adapter['base_precision_max_logit_difference']:.2f}")
    return "\n".join(lines)


STORED_REFERENCE = Path(__file__).parent / "data" / "lab_reference.json"  # benchmarks/lab_reference.py writes it
_SAME_RUN = ("model", "max_steps", "max_seq_len", "batch_size", "learning_rate", "warmup_ratio", "lr_scheduler_type",
             "max_grad_norm", "load_in_4bit", "r", "lora_alpha", "lora_dropout", "target_modules", "n_train", "n_test",
             "seed", "gradient_checkpointing")


def reference_run(results: dict, quiet: bool = True) -> dict:
    """The lab's own recipe on the run that made ``results`` (same settings, same seed). On a CPU with
    the notebook's default settings it is the stored run (``STORED_REFERENCE``: a CPU run takes
    minutes; ``benchmarks/lab_reference.py`` made it); otherwise it runs now, into
    ``<output_dir>/reference``."""
    mine = results["config"]
    if STORED_REFERENCE.exists() and not results["environment"]["cuda"]:
        stored = json.loads(STORED_REFERENCE.read_text())
        if all(stored["config"].get(key) == mine.get(key) for key in _SAME_RUN):
            stored["stored"] = True
            return stored
    values = {key: mine[key] for key in _SAME_RUN}
    config = LabConfig(**values, output_dir=str(Path(mine["output_dir"]) / "reference"), merge_on=mine["merge_on"])
    return run(config, progress=not quiet, quiet=quiet)


def side_by_side(mine: dict, reference: dict) -> str:
    """Your recipe's run next to the lab's: losses, accuracy, memory, speed."""
    rows = [("pieces", ", ".join(f"{k}: {v}" for k, v in mine.get("recipe", {}).items()), "the lab's"),
            ("first / last loss", f"{mine['loss'][0]:.3f} / {mine['loss'][-1]:.3f}",
             f"{reference['loss'][0]:.3f} / {reference['loss'][-1]:.3f}"),
            ("accuracy after", f"{mine.get('accuracy', {}).get('after', float('nan')):.0%}",
             f"{reference.get('accuracy', {}).get('after', float('nan')):.0%}"),
            ("peak memory", f"{mine['memory']['measured_peak_bytes'] / 1e9:.2f} GB",
             f"{reference['memory']['measured_peak_bytes'] / 1e9:.2f} GB"),
            ("steps per second", f"{mine['timing']['steps_per_second']:.2f}", f"{reference['timing']['steps_per_second']:.2f}")]
    steps = min(len(mine["loss"]), len(reference["loss"]))
    gap = max((abs(a - b) for a, b in zip(mine["loss"][:steps], reference["loss"][:steps])), default=float("nan"))
    where = "stored run of this machine's kind" if reference.get("stored") else "run just now"
    lines = [f"{'':<20}{'your recipe':<34}the lab's recipe ({where})"] + [f"{a:<20}{b:<34}{c}" for a, b, c in rows[1:]]
    lines.append(f"largest loss difference over {steps} steps: {gap:.2e}")
    return "\n".join(lines)


def fit_table(models: list[str], seq_len: int = 512, r: int = 16) -> list[dict]:
    """For each model of `peftlab.models.LLAMA_FAMILY` and each of `hardware.KNOWN_GPUS`: the settings
    `peftlab.reference.training_settings` picks for QLoRA on every linear layer, and the predicted peak."""
    from peftlab import hardware, reference
    from peftlab.models import family_config

    rows = []
    for name in models:
        config = family_config(name)
        for gpu, device in hardware.KNOWN_GPUS.items():
            dtype = hardware.compute_dtype(device)

            def predict(batch, checkpointing):
                return reference.predict_peak_bytes(config, batch_size=batch, seq_len=seq_len, r=r, compute_dtype=dtype,
                                                   gradient_checkpointing=checkpointing, lora_dropout=0.05)["total"]

            chosen = reference.training_settings(device, predict)
            peak = predict(max(chosen["batch_size"], 1), chosen["gradient_checkpointing"]) + hardware.CUDA_CONTEXT_BYTES
            rows.append({"model": name, "gpu": gpu, **chosen, "peak_gib": peak / hardware.GiB,
                         "memory_gib": device.total_memory / hardware.GiB})
    return rows


def _quiet() -> None:
    """--quiet: nothing but the summary (no progress bars, library warnings or logging)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    defaults = LabConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model, help="SmolLM2 (offline), a local folder or a hub name")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="0: the largest that fits the GPU")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: by model size")
    parser.add_argument("--no-4bit", action="store_true", help="LoRA over a 16/32-bit base instead of QLoRA")
    parser.add_argument("--r", type=int, default=defaults.r)
    parser.add_argument("--target-modules", default="all-linear", help="comma-separated names, or all-linear")
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--merge-on", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.quiet:
        _quiet()
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    config = LabConfig(model=args.model, max_steps=args.max_steps, max_seq_len=args.max_seq_len,
                       batch_size=args.batch_size or None, learning_rate=args.learning_rate,
                       load_in_4bit=not args.no_4bit, r=args.r, target_modules=targets, n_train=args.n_train,
                       n_test=args.n_test, seed=args.seed, output_dir=args.output_dir, merge_on=args.merge_on,
                       gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing])
    results = run(config, progress=not args.quiet, quiet=args.quiet)
    _leave_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary(results))
        print(f"results: {Path(config.output_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
