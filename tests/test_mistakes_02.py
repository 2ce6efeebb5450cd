"""Notebook 02's tests catch the mistakes students plausibly make with soft prompts."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "02_soft_prompts" / "02_soft_prompts.ipynb"

SPT, TEXT = "soft_prompt_tuning", "init_from_text"
MUTANTS = {
    "prompt appended after the input": (SPT, "torch.cat([prompt, embeds], dim=1)", "torch.cat([embeds, prompt], dim=1)",
                                        ["soft_prompt_matches_peft"]),
    "mask not extended": (SPT, "attention_mask = torch.cat([attention_mask.new_ones(batch, prompt_len), attention_mask], dim=1)",
                          "pass", ["soft_prompt_matches_peft"]),
    "mask extended with zeros": (SPT, "attention_mask.new_ones(batch, prompt_len)", "attention_mask.new_zeros(batch, prompt_len)",
                                 ["soft_prompt_matches_peft"]),
    "labels not extended": (SPT, "labels = torch.cat([labels.new_full((batch, prompt_len), -100), labels], dim=1)",
                            "pass", ["soft_prompt_matches_peft", "soft_prompt_trains_only_the_prompt"]),
    "labels padded with 0": (SPT, "labels.new_full((batch, prompt_len), -100)", "labels.new_full((batch, prompt_len), 0)",
                             ["soft_prompt_matches_peft"]),
    "labels ignored (the deck's version)": (SPT, "attention_mask=attention_mask,\n                          labels=labels)",
                                            "attention_mask=attention_mask)", ["soft_prompt_matches_peft"]),
    "base not frozen": (SPT, "p.requires_grad_(False)", "pass", ["soft_prompt_setup", "soft_prompt_trains_only_the_prompt"]),
    "soft prompt is a plain tensor": (SPT, "self.soft_prompt = nn.Parameter(\n            torch.randn(num_virtual_tokens, embedding.shape[1], dtype=embedding.dtype, device=embedding.device)\n            * embedding.detach().std())",
                                      "self.soft_prompt = torch.randn(num_virtual_tokens, embedding.shape[1]) * embedding.std().item()",
                                      ["soft_prompt_setup"]),
    "soft prompt forced to fp32": (SPT, "prompt = self.soft_prompt.to(embeds.dtype)", "prompt = self.soft_prompt.float()",
                                   ["soft_prompt_setup"]),
    "soft prompt at unit scale": (SPT, "\n            * embedding.detach().std())", ")", ["soft_prompt_setup"]),
    "soft prompt of shape (hidden, P)": (SPT, "torch.randn(num_virtual_tokens, embedding.shape[1], dtype=embedding.dtype",
                                         "torch.randn(embedding.shape[1], num_virtual_tokens, dtype=embedding.dtype",
                                         ["soft_prompt_setup"]),
    "text truncated but never repeated": (TEXT, "token_ids = (token_ids * repeats)[:num_virtual_tokens]",
                                          "token_ids = token_ids[:num_virtual_tokens]", ["init_from_text_matches_peft"]),
    "text padded with token 0": (TEXT, "token_ids = (token_ids * repeats)[:num_virtual_tokens]",
                                 "token_ids = (token_ids + [0] * num_virtual_tokens)[:num_virtual_tokens]",
                                 ["init_from_text_matches_peft"]),
    "text init keeps the graph": (TEXT, "    with torch.no_grad():\n        return embedding(torch.tensor(token_ids, device=embedding.weight.device)).detach().clone()",
                                  "    return embedding(torch.tensor(token_ids, device=embedding.weight.device))",
                                  ["init_from_text_matches_peft"]),
    "count uses the vocabulary": ("soft_prompt_count", "return num_virtual_tokens * config.hidden_size",
                                  "return num_virtual_tokens * config.vocab_size", ["soft_prompt_count_values"]),
}


test_solution_passes_the_graded_path, test_tests_reject_mistake, test_tests_accept_correct_variant = mutation_tests(NB, MUTANTS)
