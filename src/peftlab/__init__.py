"""Helpers for the PEFT Lab notebooks.

What lives here: the tiny test-model factory and the SmolLM2 loader (`peftlab.models`), the course
task (`peftlab.task`), widgets and plots that take the student's own functions as arguments
(`peftlab.widgets`, `peftlab.plots`), and environment reporting (`peftlab.env`).

What does not: any solution to a graded exercise. The notebooks are where students write those.
"""

import logging
import sys
import warnings

from peftlab.env import fit_threads, in_colab, print_versions

# In a notebook's kernel, torch gets the cores that other work leaves free (see `fit_threads`): on a
# busy machine, more threads than free cores makes torch many times slower. Scripts and the grader
# (which sets OMP_NUM_THREADS for its kernels) choose for themselves.
if "ipykernel" in sys.modules:
    fit_threads()

# transformers 5 warns about its own deprecated attribute whenever peft or a training loop touches
# it. Nothing a learner can act on, and nbgrader gives zero points to a test cell that writes to
# stderr, so this one message is silenced for everyone who imports the course's helpers.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
# peft 0.21's prepare_model_for_kbit_training (notebooks 06 to 08) still calls the model's
# `gradient_checkpointing_enable`, which transformers 5.24 renamed `activation_checkpointing_enable`.
warnings.filterwarnings("ignore", message=r".*`gradient_checkpointing_enable` is deprecated.*", category=FutureWarning)
# peft 0.21 still passes `past_key_values`, which transformers 5.24 renamed `cache`.
warnings.filterwarnings("ignore", message=r".*`past_key_values`.*deprecated.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*Both `past_key_values` and `cache` are set.*", category=FutureWarning)

# bitsandbytes on a CPU with AVX512-BF16 logs that it could not fetch an optional faster kernel (the
# `kernels` package downloads it from the hub, which the course never needs); a harmless performance note
# that would otherwise reach stderr in whichever test cell first imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

__all__ = ["__version__", "in_colab", "print_versions"]
