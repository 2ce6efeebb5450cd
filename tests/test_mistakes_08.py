"""Notebook 08's tests catch the mistakes students plausibly make in the capstone."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "08_choosing_peft" / "08_choosing_peft.ipynb"

CMP, PLUS, DORA = "peft_comparison", "loraplus", "dora_linear"
SETUP, MATCH = "dora_linear_setup", "dora_linear_matches_peft"
MUTANTS = {
    "efficiency as a fraction, not percent": (CMP, '"efficiency": 100 * trainable / total', '"efficiency": trainable / total',
                                              ["comparison_efficiency_matches_peft"]),
    "total counts only the frozen parameters": (CMP, '"total": total,', '"total": total - trainable,',
                                                ["comparison_efficiency_matches_peft"]),
    "QLoRA base not quantized": (CMP, "model = self.model_factory(quantization_config=quantization)",
                                 "model = self.model_factory()", ["comparison_configs"]),
    "QLoRA on attention only": (CMP, "target_modules=LLAMA_LINEAR)", "target_modules=[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"])",
                                ["comparison_configs"]),
    "QLoRA without double quantization": (CMP, "bnb_4bit_use_double_quant=True", "bnb_4bit_use_double_quant=False",
                                          ["comparison_configs"]),
    "one shared base model for every method": (CMP, "        self.model_factory = model_factory\n",
                                               "        shared = model_factory()\n        self.model_factory = lambda **kwargs: shared\n",
                                               ["comparison_configs"]),
    "prefix tuning registered as prompt tuning": (CMP, "self._methods[\"prefix_tuning\"] = (PrefixTuningConfig(",
                                                  "self._methods[\"prefix_tuning\"] = (PromptTuningConfig(",
                                                  ["comparison_configs", "comparison_efficiency_matches_peft"]),
    "add_* does not return self": (CMP, "self._methods[\"lora\"] = (config, None)\n        return self",
                                   "self._methods[\"lora\"] = (config, None)", ["comparison_configs"]),
    "LoRA+ rates swapped": (PLUS, "(fast if \"lora_B\" in name or", "(fast if \"lora_A\" in name or",
                            ["loraplus_matches_peft"]),
    "LoRA+ only lora_B fast (the paper's text, not peft's rule)": (PLUS, " or param.ndim == 1 else slow", " else slow",
                                                                  ["loraplus_matches_peft"]),
    "LoRA+ every non-adapter tensor fast": (PLUS, "\"lora_B\" in name or param.ndim == 1", "\"lora_A\" not in name",
                                            ["loraplus_matches_peft"]),
    "LoRA+ biases only, not norms": (PLUS, "\"lora_B\" in name or param.ndim == 1", "\"lora_B\" in name or name.endswith(\"bias\")",
                                     ["loraplus_matches_peft"]),
    "LoRA+ ratio on every group": (PLUS, "{\"params\": slow, \"lr\": lr}", "{\"params\": slow, \"lr\": lr * loraplus_lr_ratio}",
                                   ["loraplus_matches_peft"]),
    "LoRA+ includes frozen parameters": (PLUS, "        if not param.requires_grad:\n            continue\n", "",
                                         ["loraplus_matches_peft"]),
    "LoRA+ groups only the adapters": (PLUS, "        if not param.requires_grad:\n            continue\n",
                                       "        if not param.requires_grad or \"lora_\" not in name:\n            continue\n",
                                       ["loraplus_matches_peft"]),
    "LoRA+ puts lora_B in both groups": (PLUS, "(fast if \"lora_B\" in name or param.ndim == 1 else slow).append(param)",
                                         "slow.append(param)\n        if \"lora_B\" in name:\n            fast.append(param)",
                                         ["loraplus_matches_peft", "loraplus_trains"]),
    "LoRA+ leaves A out": (PLUS, "return [{\"params\": slow, \"lr\": lr}, ", "return [", ["loraplus_matches_peft", "loraplus_trains"]),
    "DoRA's norm not detached": (DORA, "torch.linalg.norm(direction, dim=1).detach()", "torch.linalg.norm(direction, dim=1)", [MATCH]),
    "DoRA's norm over the input axis": (DORA, "torch.linalg.norm(direction, dim=1).detach()",
                                        "torch.linalg.norm(direction, dim=0).detach()[: direction.shape[0]]", [MATCH]),
    "DoRA's norm of the base weight only": (DORA, "torch.linalg.norm(direction, dim=1).detach()",
                                            "torch.linalg.norm(self.base_layer.weight, dim=1).detach()", [MATCH]),
    "DoRA without LoRA's scaling": (DORA, "self.base_layer.weight + self.scaling * (", "self.base_layer.weight + (", [MATCH]),
    "DoRA scales the bias too": (DORA, "out = nn.functional.linear(x, direction) * (self.magnitude / norm)\n        return out if self.base_layer.bias is None else out + self.base_layer.bias",
                                 "return nn.functional.linear(x, direction, self.base_layer.bias) * (self.magnitude / norm)", [MATCH]),
    "DoRA's magnitude starts at one": (DORA, "nn.Parameter(torch.linalg.norm(base_layer.weight.detach(), dim=1))",
                                       "nn.Parameter(torch.ones(base_layer.out_features))", [SETUP]),
    "DoRA's base left trainable": (DORA, "        for p in base_layer.parameters():\n            p.requires_grad_(False)\n", "", [SETUP]),
    "DoRA's magnitude is not trained": (DORA, "nn.Parameter(torch.linalg.norm(base_layer.weight.detach(), dim=1))",
                                        "nn.Parameter(torch.linalg.norm(base_layer.weight.detach(), dim=1), requires_grad=False)",
                                        [SETUP, MATCH]),
}

test_solution_passes_the_graded_path, test_tests_reject_mistake, _ = mutation_tests(NB, MUTANTS)
