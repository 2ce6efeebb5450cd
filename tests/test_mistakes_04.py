"""Notebook 04's tests catch the mistakes students plausibly make with LoRA."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "04_lora" / "04_lora.ipynb"

LIN, APPLY, COUNT = "lora_linear", "apply_lora", "lora_counts"
MUTANTS = {
    "no scaling": (LIN, "* self.scaling\n        ### END SOLUTION\n\n    def get_delta_weight",
                   "\n        ### END SOLUTION\n\n    def get_delta_weight", ["lora_linear_matches_peft"]),
    "scaling by alpha instead of alpha / r": (LIN, "self.scaling = r, lora_alpha, lora_alpha / r",
                                              "self.scaling = r, lora_alpha, lora_alpha",
                                              ["lora_linear_init", "lora_linear_matches_peft"]),
    "B initialised randomly": (LIN, "nn.init.zeros_(self.lora_B.weight)", "nn.init.normal_(self.lora_B.weight)",
                               ["lora_linear_init", "apply_lora_starts_at_base"]),
    "A initialised with kaiming_normal_": (LIN, "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))",
                                           "nn.init.kaiming_normal_(self.lora_A.weight, a=math.sqrt(5))",
                                           ["lora_linear_init"]),
    "A and B both zero": (LIN, "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))",
                          "nn.init.zeros_(self.lora_A.weight)", ["lora_linear_init", "apply_lora_starts_at_base"]),
    "the deck's swapped shapes": (LIN, "self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)\n        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)",
                                  "self.lora_A = nn.Parameter(torch.zeros(base_layer.out_features, r))\n        self.lora_B = nn.Parameter(torch.zeros(r, base_layer.in_features))",
                                  ["lora_linear_init"]),
    "dropout on the base path": (LIN, "result = self.base_layer(x)", "x = self.lora_dropout(x)\n        result = self.base_layer(x)",
                                 ["lora_linear_matches_peft"]),
    "base layer not frozen": (LIN, "p.requires_grad_(False)\n        self.r", "p.requires_grad_(True)\n        self.r",
                              ["lora_linear_init"]),
    "merge without scaling": (LIN, "self.base_layer.weight += self.get_delta_weight()",
                              "self.base_layer.weight += self.lora_B.weight @ self.lora_A.weight",
                              ["lora_linear_merge"]),
    "unmerge that does not restore": (LIN, "self.base_layer.weight -= self.get_delta_weight()", "pass",
                                      ["lora_linear_merge"]),
    "merge applied twice": (LIN, "if not self.merged:\n            self.base_layer.weight +=", "if True:\n            self.base_layer.weight +=",
                            ["lora_linear_merge"]),
    "forward adds the update again when merged": (LIN, "        if self.merged:\n            return result\n", "",
                                                  ["lora_linear_merge"]),
    "delta weight transposed": (LIN, "(self.lora_B.weight @ self.lora_A.weight)", "(self.lora_A.weight.T @ self.lora_B.weight.T)",
                                ["lora_linear_merge"]),
    "apply_lora also wraps lm_head": (APPLY, "if isinstance(module, nn.Linear) and name.split(\".\")[-1] in target_modules",
                                      "if isinstance(module, nn.Linear) and (name.split(\".\")[-1] in target_modules or name == \"lm_head\")",
                                      ["apply_lora_matches_peft"]),
    "apply_lora wraps every linear layer": (APPLY, "and name.split(\".\")[-1] in target_modules", "",
                                            ["apply_lora_matches_peft"]),
    "apply_lora leaves other weights trainable": (APPLY, "p.requires_grad_(False)", "pass",
                                                  ["apply_lora_matches_peft", "apply_lora_starts_at_base"]),
    "apply_lora ignores r and alpha": (APPLY, "LoRALinear(getattr(parent, child), r, lora_alpha, lora_dropout)",
                                       "LoRALinear(getattr(parent, child))", ["apply_lora_matches_peft"]),
    "count ignores grouped-query attention": (COUNT, "kv_width = config.num_key_value_heads * head_dim",
                                              "kv_width = q_width", ["llama_lora_counts_match_peft"]),
    "count r * in * out": (COUNT, "return r * (in_features + out_features)", "return r * in_features * out_features",
                           ["lora_counts_values"]),
    "count for one layer only": (COUNT, "return config.num_hidden_layers * per_layer", "return per_layer",
                                 ["llama_lora_counts_match_peft"]),
}


test_solution_passes_the_graded_path, test_tests_reject_mistake, test_tests_accept_correct_variant = mutation_tests(NB, MUTANTS)
