"""What fine-tuning on the course task costs the model elsewhere (notebook 08, section 4): LoRA at
several ranks and full fine-tuning, each scored on the task and on general English it was not trained
on, after Biderman et al., 2024, *LoRA Learns Less and Forgets Less*.

    .venv/bin/python benchmarks/forgetting.py           # about 15 minutes on the 2-core reference machine
    .venv/bin/python benchmarks/forgetting.py --quick   # 1 seed, 2 methods, 1 rate: a smoke test

Held fixed: SmolLM2-135M-Instruct, 256 training dates, STEPS AdamW steps of batch 8, fp32 (or bf16
autocast where the CPU computes it natively). Varied: LoRA on every linear layer of a block at the
ranks of ``RANKS`` (alpha = 2 r), and full fine-tuning. Each method's rate is the better of its two in
``RATES`` on 64 validation dates (seed 0); that rate then trains with each seed of ``SEEDS``.
Measured per run: exact match on 128 test dates, and the next-token loss on `peftlab.quant.HELD_OUT_TEXT`
(held-out English written for the course) above the base model's: the forgetting.

Writes ``src/peftlab/data/forgetting.json`` (notebook 08 reads it, in Colab too) and prints a table.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "peftlab" / "data" / "forgetting.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from capstone import ALL_LINEAR, arguments, machine  # noqa: E402 (one command line, machine and target list)

RANKS = [2, 16, 64]
RATES = {"lora": [1e-3, 3e-3], "full": [1e-5, 3e-5]}
SEEDS = [0, 1]
STEPS, BATCH, N_TRAIN, N_VALIDATION, N_TEST = 16, 8, 256, 64, 128


def run_once(factory, tokenizer, rank, lr, seed, train_set, scored, targets=ALL_LINEAR):
    """Train LoRA at ``rank`` on ``targets`` (None: full fine-tuning); its accuracy on ``scored`` and
    held-out loss."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peftlab.quant import lm_loss
    from peftlab.task import evaluate
    from peftlab.training import greedy_generate_fn, train

    torch.manual_seed(seed)
    model = factory()
    if rank is not None:
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=targets))
    result = train(model, tokenizer, train_set, steps=STEPS, lr=lr, batch_size=BATCH, seed=seed, progress=False)
    accuracy = evaluate(model, tokenizer, scored, generate_fn=greedy_generate_fn(model))
    return {"accuracy": accuracy, "held_out_loss": lm_loss(model, tokenizer), "trainable": result.trainable_params,
            "seconds_per_step": result.seconds_per_step}


def main(argv=None) -> int:
    args = arguments(argv, __doc__, "1 seed, LoRA r=2 and full fine-tuning, 1 rate", OUT)
    from peftlab.models import load_smollm2_tokenizer
    from peftlab.quant import lm_loss, smollm2_factory
    from peftlab.task import make_splits

    train_pool, test_set = make_splits(n_train=N_TRAIN + N_VALIDATION, n_test=N_TEST)
    train_set, validation = train_pool[:N_TRAIN], train_pool[N_TRAIN:]
    factory, tokenizer = smollm2_factory(), load_smollm2_tokenizer()
    methods = {f"LoRA r={r}": r for r in RANKS} | {"full fine-tuning": None}
    seeds, rates = SEEDS, RATES
    if args.quick:
        methods, seeds = {"LoRA r=2": 2, "full fine-tuning": None}, SEEDS[:1]
        rates = {kind: values[-1:] for kind, values in RATES.items()}
    started = time.perf_counter()
    base_loss = lm_loss(factory(), tokenizer)
    report = {"settings": {"model": "SmolLM2-135M-Instruct", "steps": STEPS, "batch_size": BATCH, "train_dates": N_TRAIN,
                           "validation_dates": N_VALIDATION, "test_dates": N_TEST, "seeds": seeds, "rates": rates,
                           "lora": "every linear layer of a block, alpha = 2 r",
                           "forgetting": "next-token loss on peftlab.quant.HELD_OUT_TEXT above the base model's"},
              "machine": machine(), "date": dt.date.today().isoformat(), "base_held_out_loss": base_loss, "methods": {}}
    for name, rank in methods.items():
        run = functools.partial(run_once, factory, tokenizer, rank, train_set=train_set)
        report["methods"][name] = {"rank": rank, **rate_then_seeds(run, rates["lora" if rank is not None else "full"],
                                                                   seeds, validation, test_set, base_loss)}
        m = report["methods"][name]
        print(f"{name:<18} lr {m['lr']:g}: test {m['mean']:.1%}, held-out loss +{m['forgetting_mean']:.3f}", flush=True)
    print(f"\nbase model: held-out loss {base_loss:.3f}")
    print(f"{'method':<18}{'trainable':>12}{'lr':>8}{'test mean':>11}{'forgetting':>12}")
    for name, m in report["methods"].items():
        print(f"{name:<18}{m['trainable']:>12,}{m['lr']:>8g}{m['mean']:>11.1%}{m['forgetting_mean']:>+12.3f}")
    finish(report, started, args)
    return 0


def rate_then_seeds(run, rates, seeds, validation, test_set, base_loss) -> dict:
    """The better of ``rates`` on the validation dates (seed 0), then that rate with each seed on the
    test dates; ``run(lr, seed, scored)`` trains one model and scores it (`run_once`). What both stored
    experiments (this one and benchmarks/placement.py) keep of a method."""
    scores = {lr: run(lr, 0, scored=validation)["accuracy"] for lr in rates}
    best = max(rates, key=lambda lr: (scores[lr], -lr))
    runs = [run(best, seed, scored=test_set) for seed in seeds]
    accuracies, forgetting = [r["accuracy"] for r in runs], [r["held_out_loss"] - base_loss for r in runs]
    return {"lr": best, "validation": {str(lr): v for lr, v in scores.items()}, "test": accuracies,
            "mean": statistics.fmean(accuracies), "forgetting": forgetting, "forgetting_mean": statistics.fmean(forgetting),
            "trainable": runs[0]["trainable"], "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in runs)}


def finish(report: dict, started: float, args) -> None:
    """The run's minutes into ``report``, and the report into ``args.output`` (not for --quick)."""
    report["minutes"] = (time.perf_counter() - started) / 60
    print(f"{report['minutes']:.1f} minutes")
    if not args.quick:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.output}")


if __name__ == "__main__":
    sys.exit(main())
