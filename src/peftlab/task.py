"""The course task: rewrite a date written in words as an ISO date (YYYY-MM-DD).

Every notebook trains on the same task so their results compare. It suits a short CPU run: the answer
is short and checkable by exact match, the base model is unreliable at it (month names to numbers,
zero padding, ordinal suffixes), and the rule is learnable from a few hundred examples.

The generator is seeded and pure Python, so the data never needs a download. Train and test are
disjoint by calendar day: a date in the test split never appears in the training split in any
wording. The test split depends only on the seed, not on how many training examples are asked for.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

INSTRUCTION = "Rewrite the date in ISO format (YYYY-MM-DD)."
FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2049, 12, 31)

_ORDINAL_SUFFIX = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}


def _ordinal(day: int) -> str:
    return f"{day}{_ORDINAL_SUFFIX.get(day, 'th')}"


# Only wordings that cannot be misread: no all-number forms such as 03/05/2021, whose meaning
# depends on the country.
FORMATS = {
    "month_day_year": lambda d: f"{d:%B} {d.day}, {d.year}",  # March 5, 2021
    "day_month_year": lambda d: f"{d.day} {d:%B} {d.year}",  # 5 March 2021
    "abbrev_month_day_year": lambda d: f"{d:%b} {d.day}, {d.year}",  # Mar 5, 2021
    "day_abbrev_month_year": lambda d: f"{d.day} {d:%b} {d.year}",  # 5 Mar 2021
    "ordinal_of_month": lambda d: f"the {_ordinal(d.day)} of {d:%B}, {d.year}",  # the 5th of March, 2021
    "month_ordinal_year": lambda d: f"{d:%B} {_ordinal(d.day)} {d.year}",  # March 5th 2021
    "weekday_month_day_year": lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",  # Friday, March 5, 2021
}


@dataclass(frozen=True)
class Example:
    """One task instance: ``prompt`` is what the model sees, ``target`` the exact answer."""

    date: dt.date
    text: str  # the date as written in the prompt
    style: str  # key of FORMATS

    @property
    def target(self) -> str:
        return self.date.isoformat()

    @property
    def prompt(self) -> str:
        return format_prompt(self.text)

    @property
    def bare_prompt(self) -> str:
        """The prompt without the instruction line: for methods that learn their own instruction."""
        return f"Date: {self.text}\nISO:"

    @property
    def completion(self) -> str:
        """What a model should write after the prompt: a space, the answer, a newline."""
        return f" {self.target}\n"


def format_prompt(text: str) -> str:
    return f"{INSTRUCTION}\nDate: {text}\nISO:"


def _examples(days: Sequence[dt.date], rng: random.Random) -> list[Example]:
    styles = sorted(FORMATS)
    examples = []
    for day in days:
        style = rng.choice(styles)
        examples.append(Example(date=day, text=FORMATS[style](day), style=style))
    return examples


def make_splits(n_train: int = 512, n_test: int = 128, seed: int = 0):
    """Return ``(train, test)`` lists of `Example`, disjoint by calendar day.

    The days are a seeded permutation of 1950-2049: the first ``n_test`` make the test split and the
    next ``n_train`` the training split, so the test split is the same whatever ``n_train`` is.
    """
    n_days = (LAST_DAY - FIRST_DAY).days + 1
    if n_train < 0 or n_test < 0:
        raise ValueError(f"split sizes must be non-negative, got n_train={n_train}, n_test={n_test}")
    if n_train + n_test > n_days:
        raise ValueError(f"at most {n_days} examples in all, asked for {n_train + n_test}")
    rng = random.Random(seed)
    offsets = rng.sample(range(n_days), n_train + n_test)
    days = [FIRST_DAY + dt.timedelta(days=o) for o in offsets]
    test = _examples(days[:n_test], random.Random(f"{seed}-test"))
    train = _examples(days[n_test:], random.Random(f"{seed}-train"))
    return train, test


def extract_answer(generated: str) -> str:
    """The model's answer: its first line, stripped of surrounding spaces."""
    lines = generated.strip().splitlines()
    return lines[0].strip() if lines else ""


def exact_match(predictions: Iterable[str], targets: Iterable[str]) -> float:
    """Share of predictions whose extracted answer equals the target exactly (0.0 to 1.0)."""
    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("exact_match needs at least one example")
    hits = sum(extract_answer(p) == t for p, t in zip(predictions, targets))
    return hits / len(targets)


# Enough new tokens for a right answer and its newline: " 1957-04-07\n" is 12 tokens in SmolLM2's
# tokenizer (one per character; Llama 3's and Qwen's need no more). Every decoding step is a forward
# pass, so the evaluations of notebooks 02 to 08 take no longer than they must.
ANSWER_TOKENS = 12


def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = ANSWER_TOKENS,
                     batch_size: int = 32, generate_fn=None) -> list[str]:
    """Greedy completions of ``prompts`` (the generated text only), in batches with left padding.

    ``generate_fn(input_ids, attention_mask, max_new_tokens)`` replaces ``model.generate`` for
    methods it cannot run (a soft prompt, a prefix); it returns the new token ids only.
    """
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every prompt ends where generation starts
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt",
                              padding=True)
            batch = batch.to(model.device)
            with torch.no_grad():
                if generate_fn is None:
                    generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id)
                    new_tokens = generated[:, batch["input_ids"].shape[1]:]
                else:
                    new_tokens = generate_fn(batch["input_ids"], batch["attention_mask"], max_new_tokens)
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def evaluate(model, tokenizer, examples: Sequence[Example], bare: bool = False, **kwargs) -> float:
    """Exact-match accuracy of greedy generation on ``examples`` (0.0 to 1.0); ``bare`` drops the
    instruction line from the prompts (see `Example.bare_prompt`)."""
    prompts = [e.bare_prompt if bare else e.prompt for e in examples]
    predictions = generate_answers(model, tokenizer, prompts, **kwargs)
    return exact_match(predictions, [e.target for e in examples])
