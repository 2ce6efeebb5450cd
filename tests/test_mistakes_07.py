"""Notebook 07's tests catch the mistakes students plausibly make when predicting a run's memory,
choosing its settings and writing the training recipe (loading in 4 bits, adding LoRA, batching, the
Trainer's arguments)."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "07_gpu_lab" / "07_gpu_lab.ipynb"

PREDICT, SETTINGS = "predict_peak_bytes", "training_settings"
LOAD, ADAPT, COLLATE, ARGS = "load_in_4bit", "add_lora", "collate_examples", "training_arguments"
PREPARE = ('model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"],\n'
           '                                            gradient_checkpointing_kwargs={"use_reentrant": False})')
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

RECIPE_MUTANTS = {
    "FP4 instead of NF4": (LOAD, 'bnb_4bit_quant_type="nf4"', 'bnb_4bit_quant_type="fp4"', ["load_in_4bit_layers"]),
    "no double quantization": (LOAD, "bnb_4bit_use_double_quant=True", "bnb_4bit_use_double_quant=False", ["load_in_4bit_layers"]),
    "bf16 compute whatever the settings": (LOAD, '[settings["precision"]]', '["bf16"]', ["load_in_4bit_layers"]),
    "compute dtype left to bitsandbytes": (LOAD, ",\n                                      bnb_4bit_compute_dtype=compute_dtype)", ")",
                                           ["load_in_4bit_layers"]),
    "fp16 and bf16 swapped": (LOAD, '{"bf16": torch.bfloat16, "fp16": torch.float16', '{"bf16": torch.float16, "fp16": torch.bfloat16',
                              ["load_in_4bit_layers"]),
    "8-bit loading": (LOAD, "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type",
                      "BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_quant_type", ["load_in_4bit_layers"]),
    "no quantization config": (LOAD, "quantization_config=quantization, ", "", ["load_in_4bit_layers"]),
    "the output layer quantized too": (LOAD, "bnb_4bit_compute_dtype=compute_dtype)",
                                       'bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=[])', ["load_in_4bit_layers"]),
    "no k-bit preparation": (ADAPT, PREPARE, "model.gradient_checkpointing_enable() if settings[\"gradient_checkpointing\"] else None",
                             ["add_lora_model"]),
    "reentrant checkpointing (peft's default)": (ADAPT, ',\n                                            gradient_checkpointing_kwargs={"use_reentrant": False})', ")",
                                                 ["add_lora_model"]),
    "checkpointing always on": (ADAPT, 'use_gradient_checkpointing=settings["gradient_checkpointing"]', "use_gradient_checkpointing=True",
                                ["add_lora_model"]),
    "attention projections only": (ADAPT, "target_modules=config.target_modules", 'target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]',
                                    ["add_lora_model"]),
    "r and alpha swapped": (ADAPT, "r=config.r, lora_alpha=config.lora_alpha", "r=config.lora_alpha, lora_alpha=config.r",
                            ["add_lora_model"]),
    "no dropout": (ADAPT, "lora_dropout=config.lora_dropout", "lora_dropout=0.0", ["add_lora_model"]),
    "no task type": (ADAPT, 'LoraConfig(task_type="CAUSAL_LM", ', "LoraConfig(", ["add_lora_model"]),
    "biases trained too": (ADAPT, "target_modules=config.target_modules)", 'target_modules=config.target_modules, bias="all")',
                           ["add_lora_model"]),
    "the output layer trained in full": (ADAPT, "target_modules=config.target_modules)",
                                         'target_modules=config.target_modules, modules_to_save=["lm_head"])', ["add_lora_model"]),
    "the prompt in the loss": (COLLATE, "([-100] * len(prompt) + answer)", "(prompt + answer)", ["collate_batches"]),
    "padding in the loss": (COLLATE, "labels = torch.full((len(rows), longest), -100, dtype=torch.long)",
                            "labels = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)", ["collate_batches"]),
    "padding on the left": (COLLATE, "        input_ids[i, :len(ids)] = torch.tensor(ids)\n        attention_mask[i, :len(ids)] = 1\n"
                                     "        labels[i, :len(ids)] = torch.tensor(targets)",
                            "        input_ids[i, longest - len(ids):] = torch.tensor(ids)\n        attention_mask[i, longest - len(ids):] = 1\n"
                            "        labels[i, longest - len(ids):] = torch.tensor(targets)", ["collate_batches"]),
    "the mask covers the padding": (COLLATE, "attention_mask = torch.zeros(", "attention_mask = torch.ones(", ["collate_batches"]),
    "padded with id 0": (COLLATE, "torch.full((len(rows), longest), tokenizer.pad_token_id,", "torch.full((len(rows), longest), 0,",
                         ["collate_batches"]),
    "labels shifted by hand": (COLLATE, "labels[i, :len(ids)] = torch.tensor(targets)",
                               "labels[i, :len(ids) - 1] = torch.tensor(targets[1:])", ["collate_batches"]),
    "no cut at max_seq_len": (COLLATE, "((prompt + answer)[:max_seq_len], ([-100] * len(prompt) + answer)[:max_seq_len])",
                              "(prompt + answer, [-100] * len(prompt) + answer)", ["collate_batches"]),
    "the end kept instead of the start": (COLLATE, "((prompt + answer)[:max_seq_len], ([-100] * len(prompt) + answer)[:max_seq_len])",
                                          "((prompt + answer)[-max_seq_len:], ([-100] * len(prompt) + answer)[-max_seq_len:])",
                                          ["collate_batches"]),
    "the prompt's last token in the loss": (COLLATE, "[-100] * len(prompt) + answer", "[-100] * (len(prompt) - 1) + prompt[-1:] + answer",
                                            ["collate_batches"]),
    "float tensors": (COLLATE, "attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)",
                      "attention_mask = torch.zeros((len(rows), longest))", ["collate_batches"]),
    "bf16 on every GPU": (ARGS, 'bf16=precision == "bf16", fp16=precision == "fp16"', 'bf16=precision != "fp32", fp16=False',
                          ["training_arguments_fields"]),
    "the default optimizer": (ARGS, 'optim=settings["optimizer"],', "", ["training_arguments_fields"]),
    "the default schedule": (ARGS, "lr_scheduler_type=config.lr_scheduler_type, ", "", ["training_arguments_fields"]),
    "warmup in whole steps": (ARGS, "warmup_steps=float(config.warmup_ratio)", "warmup_steps=int(config.warmup_ratio * config.max_steps)",
                              ["training_arguments_fields"]),
    "no warmup": (ARGS, "warmup_steps=float(config.warmup_ratio)", "warmup_steps=0", ["training_arguments_fields"]),
    "default gradient clipping": (ARGS, "max_grad_norm=config.max_grad_norm, ", "", ["training_arguments_fields"]),
    "checkpointing left to the default": (ARGS, 'activation_checkpointing=settings["gradient_checkpointing"],', "",
                                          ["training_arguments_fields"]),
    "reentrant checkpointing in the Trainer": (ARGS, '        activation_checkpointing_kwargs={"use_reentrant": False}, **bookkeeping)',
                                               "        **bookkeeping)", ["training_arguments_fields"]),
    "batch size left to the default": (ARGS, 'per_device_train_batch_size=settings["batch_size"], ', "", ["training_arguments_fields"]),
    "the run's seed ignored": (ARGS, "seed=config.seed,", "", ["training_arguments_fields"]),
}
MUTANTS.update(RECIPE_MUTANTS)

CORRECT_VARIANTS = {
    "the seven projections named": (ADAPT, "target_modules=config.target_modules",
                                    'target_modules=config.target_modules if config.target_modules != "all-linear" else '
                                    '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'),
    "transformers' old checkpointing names": (ARGS, 'activation_checkpointing=settings["gradient_checkpointing"],\n'
                                                    '        activation_checkpointing_kwargs=',
                                              'gradient_checkpointing=settings["gradient_checkpointing"],\n        gradient_checkpointing_kwargs='),
    "the tokenizer's own padding": (COLLATE, "    longest = max(len(ids) for ids, _ in rows)",
                                    "    padded = tokenizer.pad({\"input_ids\": [ids for ids, _ in rows]}, padding=True, return_tensors=\"pt\")\n"
                                    "    longest = padded[\"input_ids\"].shape[1]"),
}


# The quick tier keeps two mistakes of each recipe piece; the rest of the recipe's run in the slow tier.
QUICK = {"FP4 instead of NF4", "no quantization config", "no k-bit preparation", "attention projections only",
         "the prompt in the loss", "padding on the left", "bf16 on every GPU", "warmup in whole steps"}
test_solution_passes_the_graded_path, test_tests_reject_mistake, test_tests_accept_correct_variant = mutation_tests(
    NB, MUTANTS, CORRECT_VARIANTS, slow=set(RECIPE_MUTANTS) - QUICK)
