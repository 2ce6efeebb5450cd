"""A small, plain training loop on the course task, shared by the notebooks' demonstrations.

It trains whatever parameters have ``requires_grad`` set, so the same loop serves prompt tuning,
prefix tuning, LoRA and QLoRA: the method is in the model, not in the loop. The loss covers the
answer tokens only (prompt positions get the label -100), as in instruction tuning.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from peftlab.task import Example

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy (and transformers) skip


def encode(tokenizer, example: Example, bare: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion, and labels that are -100 over the prompt (``bare``: the
    prompt without its instruction line)."""
    text = example.bare_prompt if bare else example.prompt
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into a batch with an attention mask."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(tokenizer, examples: Sequence[Example], batch_size: int, seed: int = 0, bare: bool = False):
    """Endless shuffled batches (a new order every epoch, the same for the same seed)."""
    encoded = [encode(tokenizer, e, bare) for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([encoded[i] for i in order[start:start + batch_size]], pad_id)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    trainable_params: int = 0
    state_bytes: dict = field(default_factory=dict)  # measured at the last step: weights, gradients, optimizer
    activation_bytes: int = 0  # measured at the last step: what autograd kept for the backward pass

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def train(model, tokenizer, examples: Sequence[Example], steps: int, lr: float = 1e-3,
          batch_size: int = 16, seed: int = 0, loss_fn: Callable | None = None,
          bf16: bool | None = None, progress: bool = True, bare: bool = False,
          param_groups: list[dict] | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require gradients with AdamW for ``steps`` steps.

    ``loss_fn(model, batch)`` returns the loss (default: ``model(**batch).loss``), which lets a
    wrapper such as a soft-prompt module take the batch its own way. ``bf16`` runs the forward and
    backward under bfloat16 autocast (default: on a CPU that supports it quickly, as on the course
    machines; the trained parameters stay fp32). ``bare`` trains on prompts without the
    instruction line, for methods that learn their own. ``param_groups`` (optimizer parameter
    groups, each with its own ``lr``) replaces the single group, as LoRA+ needs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter of the model requires a gradient")
    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = fast_bf16(device)
    loss_fn = loss_fn or (lambda m, batch: m(**batch).loss)
    optimizer = torch.optim.AdamW(param_groups or params, lr=lr, weight_decay=0.0)
    result = TrainResult(trainable_params=sum(p.numel() for p in params))
    stream = batches(tokenizer, examples, batch_size, seed, bare)
    bar = _progress(steps) if progress else None
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for _ in range(steps):
            batch = {k: v.to(device) for k, v in next(stream).items()}
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            last = result.steps == steps - 1
            with autocast, (saved_tensors(model) if last else contextlib.nullcontext()) as saved:
                loss = loss_fn(model, batch)
            if last:
                result.activation_bytes = saved.bytes
            loss.backward()
            optimizer.step()
            if result.steps == steps - 1:  # the gradients and Adam's moments all exist now
                result.state_bytes = _state_bytes(params, optimizer)
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss.item())
            result.steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        result.seconds = time.perf_counter() - start
        model.train(was_training)
        if bar is not None:
            bar.close()
    return result


class saved_tensors:  # noqa: N801 - used as a context manager, like torch's own hooks
    """While active, add up the bytes of every tensor autograd keeps for the backward pass (each
    storage once; ``model``'s own parameters and buffers left out, such as a 4-bit layer's packed
    codes): the activation memory of a forward pass,
    measured with PyTorch's saved-tensor hooks. Under autocast it includes the 16-bit copies of the
    weights that autocast makes for the step. ``bytes`` holds the sum."""

    def __init__(self, model=None):
        own = [*model.parameters(), *model.buffers()] if model is not None else []
        self._exclude = {t.untyped_storage().data_ptr() for t in own}
        self._kept: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._kept.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


@functools.cache
def _mallinfo2():
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = Info
    return function


def heap_bytes() -> int | None:
    """Bytes the C allocator has handed out and not taken back (glibc's ``mallinfo2``, over all its
    arenas and the chunks it maps on its own), or None without glibc. PyTorch's CPU tensors come from
    there, so the difference of two readings is what was allocated in between and is still alive,
    whatever the allocator keeps of freed memory (which the process's resident size counts)."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def forward_backward_memory(module, x) -> dict[str, int]:
    """Run ``module(x)``, then backward from the sum of its squares; the memory allocated above the
    start: ``held`` after the forward pass (what the backward pass will need, with the output) and
    ``peak`` over both passes. On a GPU PyTorch's allocator says; on a CPU the C heap
    (`heap_bytes`), its peak sampled every millisecond."""
    import gc
    import threading

    gc.collect()
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        read = torch.cuda.memory_allocated
    elif heap_bytes() is not None:
        read = heap_bytes
    else:
        raise RuntimeError("no way to read the allocated memory here (a CPU without glibc)")
    start = read()
    top, done = [start], threading.Event()

    def sample():
        while not done.wait(0.001):
            top[0] = max(top[0], read())

    sampler = None if x.is_cuda else threading.Thread(target=sample, daemon=True)
    if sampler is not None:
        sampler.start()
    try:
        out = module(x)
        held = read() - start
        out.float().pow(2).sum().backward()
        del out
    finally:
        done.set()
        if sampler is not None:
            sampler.join()
    peak = torch.cuda.max_memory_allocated() if x.is_cuda else max(top[0], read())
    return {"held": held, "peak": max(peak - start, held)}


def _state_bytes(params, optimizer) -> dict[str, int]:
    """Bytes held for training: the trainable weights, their gradients and the optimizer's state."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    return {"weights": sum(size(p) for p in params),
            "gradients": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(t) for s in optimizer.state.values() for t in s.values()
                             if torch.is_tensor(t) and t.dim() > 0)}


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds training up here: on GPUs from compute capability 8.0
    (`peftlab.hardware.precision`; a T4 only emulates it), and on CPUs with native bf16 instructions
    (AVX512-BF16 or AMX); on other CPUs it is emulated and slower."""
    if device.type == "cuda":
        from peftlab import hardware

        return hardware.precision(hardware.current_device(device.index)) == "bf16"
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; this is only a fallback
        return None
    return tqdm(total=total, desc="training", leave=False)


def soft_prompt_generate_fn(model, soft_prompt: torch.Tensor):
    """A ``generate_fn`` for `peftlab.task.evaluate` that puts ``soft_prompt`` (P x hidden) in front of
    every input, as prompt tuning does: greedy decoding from input embeddings."""

    def generate(input_ids, attention_mask, max_new_tokens):
        batch = input_ids.shape[0]
        embeds = model.get_input_embeddings()(input_ids)
        prompt = soft_prompt.detach().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        mask = torch.cat([attention_mask.new_ones(batch, prompt.shape[1]), attention_mask], dim=1)
        # Given only embeddings, generate returns just the new tokens.
        return model.generate(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask,
                              max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=model.config.eos_token_id)

    return generate


def greedy_generate_fn(model):
    """A ``generate_fn`` for `peftlab.task.evaluate` that decodes greedily with plain forward passes.
    It works for every ``peft`` method, including prefix tuning, whose prefix ``generate`` drops
    (transformers 5.24): the first pass goes through the peft model (which puts its virtual tokens or
    prefix in the cache), the following ones through the adapted base model, reusing that cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def generate(input_ids, attention_mask, max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        extra = cache.get_seq_length() - input_ids.shape[1]  # virtual tokens or prefix already cached
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], extra), attention_mask], dim=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        new = [token]
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(token.shape)], dim=1)
            out = base(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            new.append(token)
        return torch.cat(new, dim=1)

    return generate
