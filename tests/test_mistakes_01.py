"""Notebook 01's tests catch the mistakes students plausibly make.

Each case swaps one solution cell for a wrong version and runs the notebook's graded path
in-process (demonstrations skipped); at least one of the named test cells must fail.
"""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "01_memory_math" / "01_memory_math.ipynb"

MEM = "training_memory_bytes"
FLOPS = "training_flops"
LLAMA = "llama_param_count"
MUTANTS = {
    "optimizer state for frozen parameters too": (MEM, "n_trainable * (grad_bytes", "n_params * (grad_bytes",
                                                  ["training_memory_bytes_examples"]),
    "n_trainable defaults to none trainable": (MEM, "n_trainable = n_params\n", "n_trainable = 0\n",
                                               ["training_memory_bytes_examples"]),
    "frozen weights forgotten": (MEM, "n_params * weight_bytes + n_trainable * (grad_bytes + optimizer_bytes)",
                                 "n_trainable * (weight_bytes + grad_bytes + optimizer_bytes)",
                                 ["training_memory_bytes_examples"]),
    "returns a float": (MEM, "return round(", "return float(", ["training_memory_bytes_examples"]),
    "no check of n_trainable > n_params": (MEM, "if n_trainable > n_params:", "if False:",
                                           ["training_memory_bytes_invalid_input"]),
    "no check of byte sizes": (MEM, "if min(weight_bytes, grad_bytes, optimizer_bytes) < 0:", "if False:",
                               ["training_memory_bytes_invalid_input"]),
    "forward pass only (2 N T)": (FLOPS, "return 6.0 * n_params", "return 2.0 * n_params",
                                  ["training_flops_values"]),
    "batch without sequence length": (FLOPS, "training_flops(n_params, batch_size * seq_len)",
                                      "training_flops(n_params, batch_size)", ["seconds_per_batch_values"]),
    "divides by zero throughput": (FLOPS, "if flops_per_second <= 0:", "if False:",
                                   ["seconds_per_batch_invalid_input"]),
    "energy per 1e12 FLOPs": (FLOPS, "/ 1e18 * kwh_per_1e18_flops", "/ 1e12 * kwh_per_1e18_flops",
                              ["training_energy_values"]),
    "energy ignores its rate": (FLOPS, "/ 1e18 * kwh_per_1e18_flops", "/ 1e18 * 0.1", ["training_energy_values"]),
    "k and v as wide as q (no GQA)": (LLAMA, "kv_width = config.num_key_value_heads * head_dim",
                                      "kv_width = config.num_attention_heads * head_dim",
                                      ["llama_param_count_models", "llama_param_count_gqa"]),
    "lm_head always counted": (LLAMA, "0 if config.tie_word_embeddings else vocab * hidden", "vocab * hidden",
                               ["llama_param_count_models"]),
    "two-matrix MLP": (LLAMA, "mlp = 3 * hidden", "mlp = 2 * hidden", ["llama_param_count_models"]),
    "norms forgotten": (LLAMA, "norms = 2 * hidden", "norms = 0", ["llama_param_count_models"]),
    "final norm forgotten": (LLAMA, "+ hidden + lm_head", "+ lm_head", ["llama_param_count_models"]),
    "head_dim always hidden / heads": (LLAMA, 'getattr(config, "head_dim", None) or ', "",
                                       ["llama_param_count_models"]),
    "attention biases ignored": (LLAMA, "if config.attention_bias:", "if False:", ["llama_param_count_models"]),
    "mlp biases ignored": (LLAMA, "if config.mlp_bias:", "if False:", ["llama_param_count_models"]),
    "quiz answers wrong": ("quiz_answers", 'q1_answer = "b"', 'q1_answer = "a"', ["quiz_q1"]),
    "percent given as a fraction": ("quiz_answers", "q3_answer = 0.001", "q3_answer = 0.00001", ["quiz_q3"]),
    "GiB instead of GB": ("quiz_answers", "q2_answer = 112", "q2_answer = 104.3", ["quiz_q2"]),
}


test_solution_passes_the_graded_path, test_tests_reject_mistake, test_tests_accept_correct_variant = mutation_tests(NB, MUTANTS)
