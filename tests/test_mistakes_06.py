"""Notebook 06's tests catch the mistakes students plausibly make with QLoRA."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "06_qlora" / "06_qlora.ipynb"

LIN, MEM, CFG = "qlora_linear", "qlora_memory", "configs"
APPLY = "result = LinearNF4.apply(x, self.weight_4bit, self.quant_state, self.bias)"
MUTANTS = {
    "keeps the float base layer": (LIN, "self.register_buffer(\"weight_4bit\", packed)",
                                   "self.register_buffer(\"weight_4bit\", packed)\n        self.base_layer = base_layer",
                                   ["qlora_linear_storage"]),
    "keeps a float copy of the weight as a buffer": (LIN, "self.register_buffer(\"weight_4bit\", packed)",
                                                     "self.register_buffer(\"weight_4bit\", packed)\n"
                                                     "        self.register_buffer(\"weight\", base_layer.weight.detach().clone())",
                                                     ["qlora_linear_storage"]),
    "caches the dequantized weight": (LIN, "self.register_buffer(\"weight_4bit\", packed)",
                                      "self.register_buffer(\"weight_4bit\", packed)\n"
                                      "        self.cached = bnbf.dequantize_4bit(packed, self.quant_state)",
                                      ["qlora_linear_storage"]),
    "dequantizes once and keeps it": (LIN, APPLY,
                                      "if getattr(self, \"_dense\", None) is None:\n"
                                      "            self._dense = bnbf.dequantize_4bit(self.weight_4bit, self.quant_state)\n"
                                      "        result = nn.functional.linear(x, self._dense.to(x.dtype), self.bias)",
                                      ["qlora_linear_storage"]),
    "a plain linear over the dequantized weight": (LIN, APPLY,
                                                   "result = nn.functional.linear(x, bnbf.dequantize_4bit(self.weight_4bit, "
                                                   "self.quant_state).to(x.dtype), self.bias)", ["qlora_linear_keeps_4bit"]),
    "saves the dequantized weight for backward": (LIN, "ctx.save_for_backward(weight_4bit)",
                                                  "ctx.save_for_backward(weight_4bit, weight)", ["qlora_linear_keeps_4bit"]),
    "keeps the dequantized weight on ctx": (LIN, "ctx.quant_state = quant_state",
                                            "ctx.quant_state = quant_state\n        ctx.weight = weight", ["qlora_linear_keeps_4bit"]),
    "backward with the weight transposed": (LIN, "return grad_output @ weight, None, None, None",
                                            "return grad_output @ weight.t(), None, None, None",
                                            ["qlora_linear_gradients", "qlora_linear_keeps_4bit"]),
    "lora_A starts at zero": (LIN, "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))", "nn.init.zeros_(self.lora_A.weight)",
                              ["qlora_linear_storage", "qlora_linear_gradients"]),
    "lora_A with the deck's kaiming_normal_": (LIN, "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))",
                                               "nn.init.kaiming_normal_(self.lora_A.weight)", ["qlora_linear_storage"]),
    "no LoRA scaling": (LIN, " * self.scaling\n", "\n", ["qlora_linear_output"]),
    "random lora_B": (LIN, "nn.init.zeros_(self.lora_B.weight)", "nn.init.normal_(self.lora_B.weight)", ["qlora_linear_storage"]),
    "bias left trainable": (LIN, "nn.Parameter(bias.detach().clone(), requires_grad=False)", "nn.Parameter(bias.detach().clone())",
                            ["qlora_linear_storage", "qlora_linear_gradients"]),
    "bias dropped": (LIN, "return nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))",
                     "return nn.functional.linear(x, weight)", ["qlora_linear_output"]),
    "dropout on the base path": (LIN, APPLY, "result = LinearNF4.apply(self.lora_dropout(x), self.weight_4bit, self.quant_state, self.bias)",
                                 ["qlora_linear_output"]),
    "gradient cut at the input": (LIN, APPLY, "result = LinearNF4.apply(x.detach(), self.weight_4bit, self.quant_state, self.bias)",
                                  ["qlora_linear_gradients", "qlora_linear_keeps_4bit"]),
    "weight memory without the block constants": (LIN, " + absmax.numel() * absmax.element_size()", "",
                                                  ["qlora_linear_storage"]),
    "memory forgets the second-level constants": (MEM, "bits = 4 + 8 / blocksize + 32 / (blocksize * 256)",
                                                  "bits = 4 + 8 / blocksize", ["qlora_memory_values"]),
    "memory ignores double_quant": (MEM, "if double_quant:", "if True:", ["qlora_memory_values"]),
    "memory counts trainable parameters at 2 bytes": (MEM, "n_trainable * trainable_bytes", "n_trainable * 2",
                                                       ["qlora_memory_values"]),
    "memory in bits, not bytes": (MEM, "n_params * bits / 8", "n_params * bits", ["qlora_memory_values"]),
    "FP4 instead of NF4": (CFG, "bnb_4bit_quant_type=\"nf4\"", "bnb_4bit_quant_type=\"fp4\"", ["bnb_config_fields"]),
    "no double quantization": (CFG, "bnb_4bit_use_double_quant=True", "bnb_4bit_use_double_quant=False", ["bnb_config_fields"]),
    "fp16 compute": (CFG, "bnb_4bit_compute_dtype=torch.bfloat16", "bnb_4bit_compute_dtype=torch.float16", ["bnb_config_fields"]),
    "8-bit loading": (CFG, "load_in_4bit=True", "load_in_8bit=True", ["bnb_config_fields"]),
    "attention layers only": (CFG, "\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]",
                              "\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]", ["qlora_config_targets"]),
    "LoRA arguments ignored": (CFG, "LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout",
                               "LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0", ["qlora_config_targets"]),
}

CORRECT_VARIANTS = {
    "peft's all-linear shorthand": (CFG, "target_modules=[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]",
                                    "target_modules=\"all-linear\""),
    "weight memory including the NF4 table": (LIN, "absmax.numel() * absmax.element_size()\n",
                                              "absmax.numel() * absmax.element_size() + self.quant_state.code.numel() * 4\n"),
}

test_solution_passes_the_graded_path, test_tests_reject_mistake, test_tests_accept_correct_variant = mutation_tests(
    NB, MUTANTS, CORRECT_VARIANTS)
