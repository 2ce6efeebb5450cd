"""Notebook 07's tests catch the mistakes students plausibly make when predicting a run's memory and
choosing its settings (the GPU lab's configuration exercises)."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "07_gpu_lab" / "07_gpu_lab.ipynb"

PREDICT, SETTINGS = "predict_peak_bytes", "training_settings"
MUTANTS = {
    "embeddings and lm_head forgotten": (PREDICT, '"unquantized_weights": (total - quantized) * (4 if load_in_4bit else c)',
                                         '"unquantized_weights": 0', ["predict_weights"]),
    "every parameter in 4 bits": (PREDICT, "quantized = sum(m.weight.numel() for m in linear.values()) if load_in_4bit else 0",
                                  "quantized = total if load_in_4bit else 0", ["predict_weights"]),
    "unquantized parameters in 16 bits under QLoRA": (PREDICT, "(4 if load_in_4bit else c)", "c", ["predict_weights"]),
    "lm_head quantized too": (PREDICT, "isinstance(m, nn.Linear) and m is not output", "isinstance(m, nn.Linear)",
                              ["predict_weights"]),
    "AdamW's 8 bytes with an 8-bit optimizer": (PREDICT, '"optimizer_state": OPTIMIZER_STATE_BYTES[optimizer] * trainable',
                                                '"optimizer_state": 8 * trainable', ["predict_training_state"]),
    "16 bytes per adapter parameter, once": (PREDICT, '"adapter_weights": 4 * trainable, "gradients": 4 * trainable',
                                             '"adapter_weights": 16 * trainable, "gradients": 0', ["predict_training_state"]),
    "target modules ignored": (PREDICT, "    if target_modules != \"all-linear\":", "    if False:",
                               ["predict_training_state"]),
    "activations always in 16 bits": (PREDICT, "c = torch.empty((), dtype=compute_dtype).element_size()", "c = 2",
                                      ["predict_activations", "predict_weights"]),
    "checkpointing changes nothing": (PREDICT, "kept = layers * h * c + per_layer if gradient_checkpointing else layers * per_layer",
                                      "kept = layers * per_layer", ["predict_activations"]),
    "keys and values as wide as queries": (PREDICT, "(2 * a + 2 * k) * e * c", "4 * a * e * c", ["predict_activations"]),
    "LoRA inputs never shared": (PREDICT, "shared.get(leaf, leaf) if c == 4 else leaf", "leaf", ["predict_activations"]),
    "bf16 on a T4": (SETTINGS, '"bf16" if device.capability >= (8, 0) else "fp16"', '"bf16"', ["training_settings_devices"]),
    "precision from the device's name": (SETTINGS, '"bf16" if device.capability >= (8, 0) else "fp16"',
                                         '"bf16" if "A100" in device.name or "H100" in device.name else "fp16"',
                                         ["training_settings_devices"]),
    "decimal gigabytes": (SETTINGS, "budget = 0.9 * device.total_memory - CUDA_CONTEXT_BYTES",
                          "budget = 0.9 * device.total_memory / GiB * 1e9 - CUDA_CONTEXT_BYTES", ["training_settings_devices"]),
    "no room for the CUDA context": (SETTINGS, "budget = 0.9 * device.total_memory - CUDA_CONTEXT_BYTES",
                                     "budget = 0.9 * device.total_memory", ["training_settings_devices"]),
    "the whole memory as budget": (SETTINGS, "budget = 0.9 * device.total_memory - CUDA_CONTEXT_BYTES",
                                   "budget = device.total_memory - CUDA_CONTEXT_BYTES", ["training_settings_devices"]),
    "checkpointing always on": (SETTINGS, "((False, (16, 8)), (True, (16, 8, 4, 2, 1)))", "((True, (16, 8, 4, 2, 1)),)",
                                ["training_settings_devices"]),
    "smallest batch first": (SETTINGS, "(True, (16, 8, 4, 2, 1))", "(True, (1, 2, 4, 8, 16))", ["training_settings_devices"]),
    "8-bit paging on a CPU": (SETTINGS, '"optimizer": "adamw_torch", "gradient_checkpointing": False',
                              '"optimizer": "paged_adamw_8bit", "gradient_checkpointing": False', ["training_settings_devices"]),
}


test_solution_passes_the_graded_path, test_tests_reject_mistake, _ = mutation_tests(NB, MUTANTS)
