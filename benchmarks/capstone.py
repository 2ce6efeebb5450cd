"""The capstone's controlled experiment (notebook 08, section 2): the methods compared with everything
but the method held fixed, over several seeds.

    .venv/bin/python benchmarks/capstone.py           # about 20 minutes on the 2-core reference machine
    .venv/bin/python benchmarks/capstone.py --quick   # 1 seed, 2 methods, 2 rates: a smoke test

Held fixed: SmolLM2-135M-Instruct, the course task, 256 training dates, 8 AdamW steps of batch 8, bf16
autocast where the CPU computes bf16 natively (else fp32), rank 8 and alpha 16 for LoRA and QLoRA.
Varied: the method, and for LoRA and QLoRA the target modules (the query and value projections, or
every linear layer of a block), so that LoRA and QLoRA are compared on the same targets.

The learning rate is chosen the same way for every method: each rate of ``RATES`` trains once (seed 0)
and is scored on 64 validation dates, disjoint from the training and the test dates (while the best
lies on the grid's edge, the grid grows past it by a factor of 3, at most twice); the best rate then
trains with seeds 0, 1 and 2 (each seed sets the initialisation and the batch order), scored on
128 test dates, so that one date is 0.8 points. Decoding is greedy with plain forward passes for
every method (`peftlab.training.greedy_generate_fn`).

Writes ``src/peftlab/data/capstone.json`` (the settings, the machine, every score; notebook 08 reads
it, in Colab too) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "peftlab" / "data" / "capstone.json"

ATTENTION = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RATES = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
MAX_EXTENSIONS = 2  # more rates past the grid's edge, while the best is there
SEEDS = [0, 1, 2]
STEPS, BATCH, N_TRAIN, N_VALIDATION, N_TEST = 8, 8, 256, 64, 128


def methods():
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    lora = lambda targets: LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=targets)  # noqa: E731
    return {
        "prompt tuning, 16 tokens": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16), False),
        "prefix tuning, 8 tokens": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), False),
        "LoRA, q and v": (lora(ATTENTION), False),
        "QLoRA, q and v": (lora(ATTENTION), True),
        "LoRA, all linear": (lora(ALL_LINEAR), False),
        "QLoRA, all linear": (lora(ALL_LINEAR), True),
    }


def build(factory, config, four_bit: bool, compute_dtype):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if four_bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute_dtype)
        model = prepare_model_for_kbit_training(factory(quantization_config=quantization), use_gradient_checkpointing=False)
    else:
        model = factory()
    return get_peft_model(model, copy.deepcopy(config))


def run_once(factory, tokenizer, config, four_bit, compute_dtype, lr, seed, train_set, scored):
    import torch

    from peftlab.task import evaluate
    from peftlab.training import greedy_generate_fn, train

    torch.manual_seed(seed)
    model = build(factory, config, four_bit, compute_dtype)
    result = train(model, tokenizer, train_set, steps=STEPS, lr=lr, batch_size=BATCH, seed=seed, progress=False)
    accuracy = evaluate(model, tokenizer, scored, generate_fn=greedy_generate_fn(model))
    trainable, total = model.get_nb_trainable_parameters()
    return {"accuracy": accuracy, "seconds_per_step": result.seconds_per_step, "trainable": trainable, "total": total,
            "activation_mb": result.activation_bytes / 1e6, "final_loss": result.losses[-1]}


def machine() -> dict:
    import peft
    import torch
    import transformers

    from peftlab.training import fast_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "bf16_autocast": fast_bf16(torch.device("cpu")),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def arguments(argv, doc: str, quick: str, output: Path):
    """The experiments' command line (--quick, --output), with the course's package on the path."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{quick} (a smoke test; writes nothing)")
    parser.add_argument("--output", type=Path, default=output)
    sys.path.insert(0, str(ROOT / "src"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = arguments(argv, __doc__, "1 seed, 2 methods, 2 rates", OUT)
    import torch

    from peftlab.models import load_smollm2_tokenizer
    from peftlab.quant import smollm2_factory
    from peftlab.task import make_splits
    from peftlab.training import fast_bf16

    compute_dtype = torch.bfloat16 if fast_bf16(torch.device("cpu")) else torch.float32
    train_pool, test_set = make_splits(n_train=N_TRAIN + N_VALIDATION, n_test=N_TEST)
    train_set, validation = train_pool[:N_TRAIN], train_pool[N_TRAIN:]
    factory, tokenizer = smollm2_factory(), load_smollm2_tokenizer()
    chosen_methods = methods()
    rates, seeds = RATES, SEEDS
    if args.quick:
        chosen_methods = {k: chosen_methods[k] for k in ("prompt tuning, 16 tokens", "LoRA, q and v")}
        rates, seeds = RATES[1:3], SEEDS[:1]
    started = time.perf_counter()
    report = {"settings": {"model": "SmolLM2-135M-Instruct", "steps": STEPS, "batch_size": BATCH, "train_dates": N_TRAIN,
                           "validation_dates": N_VALIDATION, "test_dates": N_TEST, "rates": rates, "seeds": seeds,
                           "lora": {"r": 8, "lora_alpha": 16}, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                           "rate_choice": "the best validation accuracy of seed 0 (ties: the smaller rate); the grid grows by 3x "
                                             f"past an edge while the best rate is on it, {MAX_EXTENSIONS} more rates at most"},
              "machine": machine(), "date": dt.date.today().isoformat(), "methods": {}}
    for name, (config, four_bit) in chosen_methods.items():
        validation_scores, grid = {}, list(rates)
        while True:  # the grid grows by a factor of 3 past an edge while the best rate lies on that edge
            for lr in grid:
                if lr not in validation_scores:
                    validation_scores[lr] = run_once(factory, tokenizer, config, four_bit, compute_dtype, lr, 0,
                                                     train_set, validation)
                    print(f"{name:<26} lr {lr:<6g} validation {validation_scores[lr]['accuracy']:5.1%}", flush=True)
            best = max(grid, key=lambda lr: (validation_scores[lr]["accuracy"], -lr))
            if len(grid) >= len(rates) + MAX_EXTENSIONS or (best != grid[0] and best != grid[-1]):
                break
            grid = [round(grid[0] / 3, 12)] + grid if best == grid[0] else grid + [round(grid[-1] * 3, 12)]
        runs = [run_once(factory, tokenizer, config, four_bit, compute_dtype, best, seed, train_set, test_set) for seed in seeds]
        accuracies = [r["accuracy"] for r in runs]
        report["methods"][name] = {
            "validation": {str(lr): v["accuracy"] for lr, v in sorted(validation_scores.items())}, "lr": best,
            "test": accuracies, "mean": statistics.fmean(accuracies),
            "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in runs),
            "activation_mb": runs[0]["activation_mb"], "trainable": runs[0]["trainable"], "total": runs[0]["total"]}
        m = report["methods"][name]
        print(f"{name:<26} lr {best:g}: test {', '.join(f'{a:.1%}' for a in accuracies)} "
              f"(mean {m['mean']:.1%}, sd {m['sd']:.1%}), {m['seconds_per_step']:.2f} s/step", flush=True)
    report["minutes"] = (time.perf_counter() - started) / 60
    print(f"\n{'method':<26}{'trainable':>11}{'lr':>8}{'test mean':>11}{'sd':>7}{'s/step':>8}{'activ. MB':>11}")
    for name, m in report["methods"].items():
        print(f"{name:<26}{m['trainable']:>11,}{m['lr']:>8g}{m['mean']:>11.1%}{m['sd']:>7.1%}{m['seconds_per_step']:>8.2f}"
              f"{m['activation_mb']:>11.0f}")
    print(f"{report['minutes']:.1f} minutes")
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
