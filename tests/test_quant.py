"""The quantization helpers, and the guard against bitsandbytes' silent CPU gradient bug."""

import copy
import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BitsAndBytesConfig

from peftlab import quant, reference, widgets
from peftlab.models import tiny_llama, tiny_llama_config
from peftlab.training import train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_bnb_reference_unpacks_its_own_bytes():
    w = torch.randn(5, 27)  # 135 values: an odd count and a tail block
    ref = reference.bnb_nf4(w)
    assert ref["codes"].shape == (135,) and ref["packed"].shape == (68,) and ref["absmax"].shape == (3,)
    table = reference.nf4_table()
    restored = (table[ref["codes"].long()].view(-1)[:128].view(2, 64) * ref["absmax"][:2, None]).reshape(-1)
    assert torch.equal(restored, ref["dequantized"].reshape(-1)[:128])
    assert ref["packed"][-1] & 0xF == 7, "bitsandbytes pads an odd count with the code of 0.0"


def test_storage_bits_follow_the_qlora_paper():
    w = torch.randn(64 * 256 * 2)
    assert reference.bnb_storage_bits(w, double_quant=False) == 4.5
    assert reference.bnb_storage_bits(w, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


def test_outlier_weights_are_seeded():
    a, b = quant.outlier_weights(512, outliers=3, seed=1), quant.outlier_weights(512, outliers=3, seed=1)
    assert torch.equal(a, b)
    assert (a.abs() > 0.2).sum() == 3


def test_round_trip_replaces_linear_weights_but_not_lm_head():
    model = tiny_llama(seed=0)
    before = model.lm_head.weight.detach().clone()
    count = quant.round_trip_linear_weights(model, torch.zeros_like)
    assert count == 14 and torch.all(model.model.layers[0].self_attn.q_proj.weight == 0)
    assert torch.equal(model.lm_head.weight, before)


def test_lm_loss_of_a_random_model_is_near_uniform():
    class CharTokenizer:
        def __call__(self, text, return_tensors="pt"):
            return {"input_ids": torch.tensor([[ord(c) % 512 for c in text]])}

    loss = quant.lm_loss(tiny_llama(seed=0), CharTokenizer(), ["an example sentence", "another one"])
    assert loss == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=0.05)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(seed=0).save_pretrained(folder)
    return folder


def _config():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def test_load_4bit_quantizes_every_block_layer_and_disables_cpu_repacking(tiny_folder):
    model = quant.load_4bit(str(tiny_folder), _config())
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    dense = tiny_llama(seed=0)
    stored = quant.stored_bytes(model)
    assert stored < 0.75 * sum(p.numel() * 4 for p in dense.parameters()), "4-bit layers shrink the model"
    packed = sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8)
    constants = sum(m.weight.quant_state.absmax.numel() for m in layers)  # 8-bit absmax with double quant
    assert stored >= sum(p.numel() * p.element_size() for p in model.parameters()) + constants
    assert quant.frozen_bytes(model) < stored and packed > 0  # a fresh model's float parameters still train


def _dense_twin(quantized):
    """A float model whose linear weights are exactly the 4-bit model's dequantized ones."""
    dense = tiny_llama(seed=0)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
                dense.get_submodule(name).weight.copy_(w)
    return dense


def test_qlora_gradients_match_a_dense_reference_after_an_evaluation_pass(tiny_folder):
    """The bitsandbytes bug (STACK_NOTES): on CPUs with AVX512-BF16 an eval pass through Linear4bit
    repacked its weights and later gradients through it were lost. With the course's loader they
    must equal a dense model's. (On CPUs without AVX512-BF16 the bug cannot occur; the test still
    guards the loader and the LoRA path.)"""
    quantized = quant.load_4bit(str(tiny_folder), _config())
    dense = _dense_twin(quantized)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    torch.manual_seed(0)
    q_model = get_peft_model(quantized, config)
    d_model = get_peft_model(dense, copy.deepcopy(config))
    with torch.no_grad():  # same adapters, lora_B non-zero so every gradient is informative
        for (qn, qp), (dn, dp) in zip(q_model.named_parameters(), d_model.named_parameters()):
            if "lora_" in qn:
                assert qn == dn
                qp.copy_(torch.randn_like(qp) * 0.1)
                dp.copy_(qp)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    q_model.eval()
    with torch.no_grad():  # the evaluation pass that triggered the bug
        q_model(ids)
        q_model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    q_model.train()
    q_model(ids, labels=ids).loss.backward()
    d_model(ids, labels=ids).loss.backward()
    dense_grads = dict(d_model.named_parameters())
    checked = 0
    for name, p in q_model.named_parameters():
        if p.requires_grad:
            reference = dense_grads[name].grad
            assert p.grad is not None and reference is not None, f"no gradient for {name}"
            assert torch.allclose(p.grad, reference, atol=1e-5, rtol=1e-3), f"gradient of {name} differs"
            checked += 1
    assert checked == 14 * 2


def test_train_reports_the_measured_training_state():
    model = tiny_llama(seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)

    class Tok:
        pad_token_id = 0
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 500 + 2 for c in text]}

    from peftlab.task import make_splits

    result = train(model, Tok(), make_splits(8, 4)[0], steps=2, batch_size=2, progress=False)
    n = model.lm_head.weight.numel()
    assert result.state_bytes == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}


def reference_blockwise(x, blocksize=64, bits=8):
    qmax = 2 ** (bits - 1) - 1
    flat = x.reshape(-1)
    blocks = nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return torch.round(blocks / scale[:, None]).to(torch.int8), absmax


def reference_deblockwise(q, absmax, shape, blocksize=64, bits=8):
    qmax = 2 ** (bits - 1) - 1
    return (q.float() * absmax[:, None] / qmax).reshape(-1)[: shape.numel()].reshape(shape)


def test_quantization_explorer_follows_its_controls():
    box = widgets.quantization_explorer(reference_blockwise, reference_deblockwise)
    (left, right), report = box.children[0].children, box.children[1]
    bits, block = left.children
    outliers, _ = right.children
    outliers.value, bits.value, block.value = 4, 4, "64"
    counts = [int(c.replace(",", "")) for c in re.findall(r"([\d,]+)(?: of [\d,]+ weights)? rounded to zero", report.value)]
    assert len(counts) == 2 and counts[1] > 3 * counts[0], report.value  # one scale zeroes far more
    outliers.value = 0
    assert "whole tensor" in report.value


def test_quantization_explorer_asks_for_the_functions_first():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    box = widgets.quantization_explorer(stub, stub)
    assert "Implement" in box.children[1].value
