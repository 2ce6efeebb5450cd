"""Where should the adapters go? Notebook 08's open-ended experiment, and the measurements behind its
model answer: LoRA on the attention projections only, on the MLP only, or on every linear layer of a
block, at (nearly) the same number of trainable parameters, on the course task and on held-out text.

    .venv/bin/python benchmarks/placement.py           # about 10 minutes on the 2-core reference machine
    .venv/bin/python benchmarks/placement.py --quick   # 1 seed, 1 rate: a smoke test

The ranks hold the budget: SmolLM2's attention projections have 3,840 LoRA parameters per unit of rank
in a layer (q and o: 576 + 576; k and v: 576 + 192), the MLP 6,336 (three of 576 + 1,536), all seven
10,176; so r = 21, 13 and 8 give 80,640, 82,368 and 81,408 per layer. Everything else as in
`benchmarks/forgetting.py` (its training, scoring and rate choice: the better of two rates on
validation dates, then each seed on the test dates).

Writes ``src/peftlab/data/placement.json`` and prints a table.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "peftlab" / "data" / "placement.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from capstone import arguments, machine  # noqa: E402
from forgetting import BATCH, N_TEST, N_TRAIN, N_VALIDATION, SEEDS, STEPS, finish, rate_then_seeds, run_once  # noqa: E402

PLACEMENTS = {
    "attention only (q, k, v, o), r=21": (["q_proj", "k_proj", "v_proj", "o_proj"], 21),
    "MLP only (gate, up, down), r=13": (["gate_proj", "up_proj", "down_proj"], 13),
    "every linear layer, r=8": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8),
}
RATES = [1e-3, 3e-3]


def main(argv=None) -> int:
    args = arguments(argv, __doc__, "1 seed, 1 rate", OUT)
    from peftlab.models import load_smollm2_tokenizer
    from peftlab.quant import lm_loss, smollm2_factory
    from peftlab.task import make_splits

    train_pool, test_set = make_splits(n_train=N_TRAIN + N_VALIDATION, n_test=N_TEST)
    train_set, validation = train_pool[:N_TRAIN], train_pool[N_TRAIN:]
    factory, tokenizer = smollm2_factory(), load_smollm2_tokenizer()
    seeds, rates = (SEEDS[:1], RATES[-1:]) if args.quick else (SEEDS, RATES)
    started = time.perf_counter()
    base_loss = lm_loss(factory(), tokenizer)
    report = {"settings": {"model": "SmolLM2-135M-Instruct", "steps": STEPS, "batch_size": BATCH, "train_dates": N_TRAIN,
                           "validation_dates": N_VALIDATION, "test_dates": N_TEST, "seeds": seeds, "rates": rates,
                           "alpha": "2 r", "forgetting": "next-token loss on peftlab.quant.HELD_OUT_TEXT above the base model's"},
              "machine": machine(), "date": dt.date.today().isoformat(), "base_held_out_loss": base_loss, "placements": {}}
    for name, (targets, rank) in PLACEMENTS.items():
        run = functools.partial(run_once, factory, tokenizer, rank, train_set=train_set, targets=targets)
        report["placements"][name] = {"targets": targets, "rank": rank,
                                      **rate_then_seeds(run, rates, seeds, validation, test_set, base_loss)}
        m = report["placements"][name]
        print(f"{name:<36} lr {m['lr']:g}: test {m['mean']:.1%} {m['test']}, held-out loss +{m['forgetting_mean']:.3f}",
              flush=True)
    print(f"{'placement':<36}{'trainable':>11}{'lr':>7}{'test mean':>11}{'forgetting':>12}{'s/step':>8}")
    for name, m in report["placements"].items():
        print(f"{name:<36}{m['trainable']:>11,}{m['lr']:>7g}{m['mean']:>11.1%}{m['forgetting_mean']:>+12.3f}"
              f"{m['seconds_per_step']:>8.2f}")
    finish(report, started, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
