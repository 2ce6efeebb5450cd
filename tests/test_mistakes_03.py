"""Notebook 03's tests catch the mistakes students plausibly make with prefix tuning."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "03_prefix_tuning" / "03_prefix_tuning.ipynb"

PT, GEN, COUNT = "prefix_tuning", "prefix_generate", "prefix_count"
CORRECT_VARIANTS = {
    # Re-running the whole sequence through forward at every step is slower but right.
    "generate without reusing the cache": (GEN, "full_mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)\n        out = self.model(input_ids=next_token, attention_mask=full_mask, cache=out.cache)",
                                           "out = self.forward(torch.cat(tokens, dim=1), attention_mask=attention_mask)"),
}

MUTANTS = {
    "count ignores grouped-query attention": (COUNT, "kv_width = config.num_key_value_heads * head_dim",
                                              "kv_width = config.hidden_size", ["prefix_count_matches_peft"]),
    "count forgets the values": (COUNT, "return 2 * config.num_hidden_layers", "return config.num_hidden_layers",
                                 ["prefix_count_matches_peft"]),
    "prefix sized by the hidden size": (PT, "shape = (num_virtual_tokens, self.kv_heads * self.head_dim)",
                                        "shape = (num_virtual_tokens, config.hidden_size)",
                                        ["prefix_setup", "prefix_matches_peft"]),
    "prefix only on keys": (PT, "cache.update(per_head(keys), per_head(values), layer)",
                            "cache.update(per_head(keys), per_head(torch.zeros_like(values)), layer)",
                            ["prefix_matches_peft", "prefix_trains_only_the_prefix"]),
    "keys and values swapped": (PT, "cache.update(per_head(keys), per_head(values), layer)",
                                "cache.update(per_head(values), per_head(keys), layer)", ["prefix_matches_peft"]),
    "mask not extended": (PT, "attention_mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)",
                          "pass", ["prefix_matches_peft"]),
    "heads and positions mixed up": (PT, "t.view(prefix_len, self.kv_heads, self.head_dim).transpose(0, 1)",
                                     "t.view(self.kv_heads, prefix_len, self.head_dim)", ["prefix_matches_peft"]),
    "model not frozen": (PT, "p.requires_grad_(False)", "pass", ["prefix_setup", "prefix_trains_only_the_prefix"]),
    "one shared prefix for all layers": (PT, "self.prefix_keys = nn.ParameterList([nn.Parameter(torch.randn(shape)) for _ in range(config.num_hidden_layers)])",
                                         "self.prefix_keys = nn.ParameterList([nn.Parameter(torch.randn(shape))] * config.num_hidden_layers)",
                                         ["prefix_setup"]),
    "generate ignores the prefix": (GEN, "out = self.forward(input_ids, attention_mask=attention_mask)",
                                    "out = self.model(input_ids=input_ids, attention_mask=attention_mask)",
                                    ["prefix_generate_uses_the_prefix"]),
    "generate drops the prefix after the first token": (GEN, "full_mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)\n        out = self.model(input_ids=next_token, attention_mask=full_mask, cache=out.cache)",
                                                        "out = self.model(input_ids=torch.cat(tokens, dim=1))",
                                                        ["prefix_generate_uses_the_prefix"]),
    "generate returns new tokens only": (GEN, "return torch.cat(tokens, dim=1)", "return torch.cat(tokens[1:], dim=1)",
                                         ["prefix_generate_uses_the_prefix"]),
    "generate ignores the attention mask": (GEN, "if attention_mask is None:", "if True:",
                                            ["prefix_generate_uses_the_prefix"]),
    "generate forgets the mask after the first step": (GEN, "out = self.model(input_ids=next_token, attention_mask=full_mask, cache=out.cache)",
                                                       "out = self.model(input_ids=next_token, cache=out.cache)",
                                                       ["prefix_generate_uses_the_prefix"]),
    "generate off by one": (GEN, "for step in range(max_new_tokens):", "for step in range(max_new_tokens - 1):",
                            ["prefix_generate_uses_the_prefix"]),
}


test_solution_passes_the_graded_path, test_tests_reject_mistake, test_tests_accept_correct_variant = mutation_tests(NB, MUTANTS, CORRECT_VARIANTS)
