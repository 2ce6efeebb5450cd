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
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# A CPU is about a hundred times slower than a data-centre GPU at this: runs there are capped.
CPU_LIMITS = {"max_steps": 20, "max_seq_len": 64, "batch_size": 8, "n_test": 32}


@dataclass
class LabConfig:
    model: str = "SmolLM2-135M-Instruct"   # the offline default; or any causal LM on the hub
    max_steps: int = 60
    max_seq_len: int = 64
    batch_size: int = 8
    learning_rate: float = 2e-3
    load_in_4bit: bool = True               # QLoRA; False: LoRA over a 16-bit (GPU) or fp32 (CPU) base
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    n_train: int = 512
    n_test: int = 64
    seed: int = 0
    output_dir: str = "lab_output"
    gradient_checkpointing: bool | None = None  # default: on for a GPU, off on a CPU
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict) -> "LabConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown lab settings: {unknown}; known: {sorted(known)}")
        return cls(**values)


def environment() -> dict:
    """Device, memory and precision support of this machine."""
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, gpus=torch.cuda.device_count(), memory_gb=props.total_memory / 1e9,
                    bf16=torch.cuda.is_bf16_supported(), cuda_version=torch.version.cuda)
    else:
        from peftlab.training import fast_bf16

        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
        info.update(device="CPU", gpus=0, memory_gb=pages / 1e9, bf16=fast_bf16(torch.device("cpu")))
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def fit_to_machine(config: LabConfig, env: dict | None = None) -> LabConfig:
    """On a CPU, cap the run at `CPU_LIMITS` and say so in ``config.notes``."""
    env = env or environment()
    if env["cuda"]:
        return config
    changed = []
    for key, limit in CPU_LIMITS.items():
        value = getattr(config, key)
        if value > limit:
            setattr(config, key, limit)
            changed.append(f"no GPU: {key} {value} -> {limit}")
    if changed:
        config.notes += changed
        print("No GPU found: running small CPU settings (" + "; ".join(changed) + ")")
    return config


def predict_peak_memory(n_params: int, n_trainable: int, config: LabConfig, hidden_size: int,
                        num_layers: int, vocab_size: int, weight_bytes: float) -> dict[str, float]:
    """A first-order memory prediction in bytes: frozen weights (``weight_bytes`` each; 4.127/8 in NF4
    with double quantization), adapter training state (16 B per trainable parameter: fp32 weight,
    gradient, two Adam moments), and activations: per layer about 34 * hidden bytes per token in 16
    bits (Korthikanti et al., 2022, without attention scores), divided when checkpointing keeps only
    each layer's input, plus the logits (vocab x 4 bytes per token, twice for the loss)."""
    tokens = config.batch_size * config.max_seq_len
    checkpointing = bool(config.gradient_checkpointing)
    per_layer = (2 * hidden_size if checkpointing else 34 * hidden_size) * tokens
    activations = num_layers * per_layer + 2 * 4 * vocab_size * tokens
    parts = {"weights": n_params * weight_bytes, "adapter training state": 16 * n_trainable,
             "activations": activations}
    parts["total"] = sum(parts.values())
    return parts


def model_path(config: LabConfig) -> str:
    from peftlab.models import smollm2_path

    return smollm2_path() if config.model in ("SmolLM2-135M-Instruct", "smollm2") else config.model


def prediction(config: LabConfig, env: dict | None = None) -> dict:
    """Predicted peak memory before anything is loaded: parameter counts from the model's config on
    PyTorch's meta device (no memory), the adapter's size from `peft` itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    env = env or environment()
    model_config = AutoConfig.from_pretrained(model_path(config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    n_base = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha, target_modules=LLAMA_LINEAR)
    n_trainable = sum(p.numel() for p in get_peft_model(model, lora).parameters() if p.requires_grad)
    weight_bytes = 4.127 / 8 if config.load_in_4bit else (2 if env["cuda"] else 4)
    checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None else env["cuda"]
    sized = LabConfig(**{**asdict(config), "gradient_checkpointing": checkpointing})
    parts = predict_peak_memory(n_base, n_trainable, sized, model_config.hidden_size,
                                model_config.num_hidden_layers, model_config.vocab_size, weight_bytes)
    return {"base_parameters": n_base, "trainable_parameters": n_trainable, "bytes": parts}


class MemoryMeter:
    """Peak memory of the run. On a GPU, what PyTorch allocated (reset at start). On a CPU, the
    process's resident memory sampled every 20 ms, minus what it held before the model was loaded
    (the Python runtime and libraries), so that the figure compares with the prediction."""

    def __init__(self):
        import threading

        self.gpu = torch.cuda.is_available()
        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
        self.baseline = self.peak = self._rss()
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
            self.peak = max(self.peak, self._rss())

    def stop(self) -> tuple[float, str]:
        self._stop.set()
        self._thread.join()
        if self.gpu:
            return float(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
        return self.peak - self.baseline, "peak resident memory above the process's size before loading"


def load(config: LabConfig):
    """(model, tokenizer) for the config: the offline SmolLM2 by default, else a hub model; in 4 bits
    through bitsandbytes when ``load_in_4bit``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from peftlab.quant import load_4bit

    path = model_path(config)
    gpu = torch.cuda.is_available()
    compute = torch.bfloat16 if (gpu and torch.cuda.is_bf16_supported()) else (torch.float16 if gpu else torch.float32)
    if config.load_in_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
        model = load_4bit(path, quant, **({"device_map": {"": _local_rank()}} if gpu else {}))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=compute if gpu else torch.float32)
        if gpu:
            model = model.to(f"cuda:{_local_rank()}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def add_adapter(model, config: LabConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = bool(config.gradient_checkpointing)
    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=LLAMA_LINEAR)
    return get_peft_model(model, lora)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, tokenizer, examples, max_seq_len):
        from peftlab.training import encode

        self.items = []
        for example in examples:
            ids, labels = encode(tokenizer, example)
            self.items.append((ids[:max_seq_len], labels[:max_seq_len]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def training_arguments(config: LabConfig, env: dict):
    """`transformers.TrainingArguments` for the lab (the notebook's exercise asks for the same)."""
    from transformers import TrainingArguments

    gpu = env["cuda"]
    return TrainingArguments(
        output_dir=str(Path(config.output_dir) / "trainer"), max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        seed=config.seed, bf16=gpu and env["bf16"], fp16=gpu and not env["bf16"], use_cpu=not gpu,
        optim="paged_adamw_8bit" if (gpu and config.load_in_4bit) else "adamw_torch",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        ddp_find_unused_parameters=False if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None)


def run(config: LabConfig, progress: bool = True, make_training_arguments=None) -> dict:
    """Train, measure and save; return (and write to ``results.json``) every figure.
    ``make_training_arguments(config, env)`` replaces `training_arguments` (notebook 07's exercise)."""
    from transformers import Trainer, TrainerCallback

    from peftlab.task import evaluate, extract_answer, generate_answers, make_splits
    from peftlab.training import collate

    env = environment()
    config = fit_to_machine(config, env)
    if config.gradient_checkpointing is None:
        config.gradient_checkpointing = bool(env["cuda"])
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", 0)) == 0
    torch.manual_seed(config.seed)
    meter = MemoryMeter()

    start = time.perf_counter()
    model, tokenizer = load(config)
    load_seconds = time.perf_counter() - start
    n_base = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    train_set, test_set = make_splits(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    accuracy_before = evaluate(model, tokenizer, test_set) if main_process else None

    model = add_adapter(model, config)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    predicted = prediction(config, env)["bytes"]

    losses, step_times = [], []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    dataset = _Examples(tokenizer, train_set, config.max_seq_len)
    args = (make_training_arguments or training_arguments)(config, env)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=lambda items: collate(items, tokenizer.pad_token_id), callbacks=[Record()])
    if not progress:
        trainer.args.disable_tqdm = True
    model.train()
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    world = int(os.environ.get("WORLD_SIZE", 1))
    tokens = sum(len(ids) for ids, _ in dataset.items) / len(dataset) * config.batch_size * config.max_steps * world
    peak, peak_source = meter.stop()

    results = {"config": asdict(config), "environment": env, "world_size": world,
               "parameters": {"base": n_base, "trainable": n_trainable, "trainable_percent": 100 * n_trainable / n_base},
               "memory": {"predicted_bytes": predicted, "measured_peak_bytes": peak, "measured_with": peak_source},
               "timing": {"load_seconds": load_seconds, "train_seconds": train_seconds,
                          "steps_per_second": config.max_steps / train_seconds,
                          "tokens_per_second": tokens / train_seconds,
                          "median_step_seconds": sorted(step_times)[len(step_times) // 2] if step_times else None},
               "loss": losses}
    if main_process:
        model.eval()
        results["accuracy"] = {"before": accuracy_before, "after": evaluate(model, tokenizer, test_set),
                               "test_examples": len(test_set)}
        results["samples"] = [{"prompt": e.text, "target": e.target, "output": extract_answer(o)} for e, o in
                              zip(test_set[:5], generate_answers(model, tokenizer, [e.prompt for e in test_set[:5]]))]
        results["adapter"] = save_reload_merge(model, tokenizer, out, config, test_set[0].prompt)
        _plot_losses(losses, out / "loss.png")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def save_reload_merge(model, tokenizer, out: Path, config: LabConfig, prompt: str) -> dict:
    """Save the adapter, report its size, reload it onto a fresh base and merge it; the merged model's
    logits must match the trained one's."""
    from peft import PeftModel

    folder = out / "adapter"
    model.save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        trained_logits = model(**ids).logits.float()
    fresh = load(LabConfig(**{**asdict(config), "load_in_4bit": False, "notes": []}))[0]
    reloaded = PeftModel.from_pretrained(fresh, folder)
    reloaded.eval()
    with torch.no_grad():
        reloaded_logits = reloaded(**ids).logits.float()
        merged = reloaded.merge_and_unload()
        merged_logits = merged(**ids).logits.float()
    return {"path": str(folder), "bytes": size,
            # merging must not change what the reloaded adapter computes (same base, same precision)
            "merged_max_logit_difference": (merged_logits - reloaded_logits).abs().max().item(),
            # a 16/32-bit base differs from the 4-bit one it was trained on: the quantization error
            "base_precision_max_logit_difference": (reloaded_logits - trained_logits.to(reloaded_logits.device)).abs().max().item(),
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
    lines = [
        f"device: {results['environment']['device']} x{max(results['world_size'], 1)}, "
        f"{'QLoRA (NF4)' if results['config']['load_in_4bit'] else 'LoRA'}, "
        f"{results['parameters']['trainable']:,} trainable ({results['parameters']['trainable_percent']:.2f} %)",
        f"speed: {results['timing']['steps_per_second']:.2f} steps/s, {results['timing']['tokens_per_second']:,.0f} tokens/s",
        f"memory: predicted {mem['predicted_bytes']['total'] / 1e9:.2f} GB, measured peak "
        f"{mem['measured_peak_bytes'] / 1e9:.2f} GB ({mem['measured_with']})",
    ]
    if "accuracy" in results:
        acc = results["accuracy"]
        lines.append(f"accuracy: {acc['before']:.0%} -> {acc['after']:.0%} on {acc['test_examples']} test dates")
        adapter = results["adapter"]
        lines.append(f"adapter: {adapter['bytes'] / 1e6:.1f} MB; reloaded and merged: logits change by "
                     f"{adapter['merged_max_logit_difference']:.1e}; on the full-precision base instead of the "
                     f"4-bit one by up to {adapter['base_precision_max_logit_difference']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = LabConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--no-4bit", action="store_true", help="LoRA over a 16/32-bit base instead of QLoRA")
    parser.add_argument("--r", type=int, default=defaults.r)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = LabConfig(model=args.model, max_steps=args.max_steps, max_seq_len=args.max_seq_len,
                       batch_size=args.batch_size, learning_rate=args.learning_rate, load_in_4bit=not args.no_4bit,
                       r=args.r, n_train=args.n_train, n_test=args.n_test, seed=args.seed, output_dir=args.output_dir)
    results = run(config, progress=not args.quiet)
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary(results))
        print(f"results: {Path(config.output_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
