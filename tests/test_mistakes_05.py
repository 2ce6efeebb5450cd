"""Notebook 05's tests catch the mistakes students plausibly make when writing quantizers."""

from notebooks import SOLUTIONS, mutation_tests

NB = SOLUTIONS / "05_quantization" / "05_quantization.ipynb"

AFF, ABS, BLK, LEV, NF4, BITS = "affine", "absmax", "blockwise", "nf4_levels", "nf4", "bits_per_param"
MUTANTS = {
    "zero point with the sign flipped": (AFF, "round(-low / scale)", "round(low / scale)", ["affine_matches_pytorch"]),
    "2**bits levels instead of 2**bits - 1 steps": (AFF, "qmax = 2 ** bits - 1\n    x", "qmax = 2 ** bits\n    x",
                                                     ["affine_matches_pytorch"]),
    "range not widened to include zero": (AFF, "low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)",
                                          "low, high = x.min().item(), x.max().item()",
                                          ["affine_matches_pytorch", "affine_round_trip"]),
    "the deck's (x - zero_point) / scale": (AFF, "torch.round(x / scale) + zero_point", "torch.round((x - zero_point) / scale)",
                                            ["affine_matches_pytorch", "affine_round_trip"]),
    "no guard for a constant tensor": (AFF, "    if scale == 0:\n        scale = 1.0\n", "", ["affine_round_trip"]),
    "dequantize adds the zero point": (AFF, "(q.float() - zero_point) * scale", "(q.float() + zero_point) * scale",
                                       ["affine_round_trip"]),
    "absmax over 2**(bits-1) levels": (ABS, "qmax = 2 ** (bits - 1) - 1\n    x", "qmax = 2 ** (bits - 1)\n    x",
                                       ["absmax_quantization"]),
    "absmax: no guard for zeros": (ABS, "absmax / qmax if absmax > 0 else 1.0", "absmax / qmax", ["absmax_quantization"]),
    "one scale for the whole tensor where blocks were asked": (
        BLK, "absmax = blocks.abs().amax(dim=1)", "absmax = blocks.abs().max().expand(blocks.shape[0]).clone()",
        ["blockwise_layout", "blockwise_error"]),
    "blockwise: 2**bits - 1 as the largest code": (BLK, "qmax = 2 ** (bits - 1) - 1\n    flat", "qmax = 2 ** bits - 1\n    flat",
                                                   ["blockwise_error"]),
    "blockwise: tail dropped instead of padded": (BLK, "padding = (-flat.numel()) % blocksize\n    blocks = nn.functional.pad(flat, (0, padding)).view(-1, blocksize)",
                                                  "blocks = flat[: flat.numel() // blocksize * blocksize].view(-1, blocksize)",
                                                  ["blockwise_layout"]),
    "uniform levels passed off as NF4": (LEV, "return levels / levels.max()", "return torch.linspace(-1, 1, 16)",
                                         ["nf4_levels_match_bitsandbytes"]),
    "symmetric levels (no exact zero)": (LEV, "torch.linspace(offset, 0.5, 9)[:-1].double()",
                                         "torch.linspace(offset, 0.5, 8)[:-1].double()",
                                         ["nf4_levels_match_bitsandbytes"]),
    "levels normalised in float64 (off by 1e-7)": (LEV, "torch.zeros(1, dtype=torch.float64), positive]).float().sort().values\n    return levels / levels.max()",
                                                    "torch.zeros(1, dtype=torch.float64), positive]).sort().values\n    return (levels / levels.max()).float()",
                                                    ["nf4_matches_bitsandbytes"]),
    "swapped nibble order": (NF4, "(codes[0::2] << 4) | codes[1::2]", "(codes[1::2] << 4) | codes[0::2]",
                             ["pack_4bit_layout", "nf4_matches_bitsandbytes"]),
    "odd count padded with 0": (NF4, "torch.full((1,), 7, dtype=torch.uint8)", "torch.zeros(1, dtype=torch.uint8)",
                                ["pack_4bit_layout"]),
    "NF4 with one absmax for the whole tensor": (NF4, "absmax = blocks.abs().amax(dim=1)",
                                                 "absmax = blocks.abs().max().expand(blocks.shape[0]).clone()",
                                                 ["nf4_matches_bitsandbytes"]),
    "NF4 codes rounded down instead of to the nearest level": (
        NF4, "codes = torch.bucketize(scaled.reshape(-1), midpoints).to(torch.uint8)",
        "codes = (torch.bucketize(scaled.reshape(-1), levels, right=True) - 1).clamp(0, 15).to(torch.uint8)",
        ["nf4_matches_bitsandbytes"]),
    "dequantize ignores the absmax": (NF4, "view(-1, blocksize) * absmax[:, None]", "view(-1, blocksize)",
                                      ["nf4_matches_bitsandbytes"]),
    "bits per parameter forget the second-level constants": (
        BITS, "return 4 + dq_bits / blocksize + absmax_bits / (blocksize * dq_blocksize)",
        "return 4 + dq_bits / blocksize", ["bits_per_param_values"]),
    "bits per parameter forget the block constants": (BITS, "return 4 + absmax_bits / blocksize", "return 4",
                                                      ["bits_per_param_values"]),
}

CORRECT_VARIANTS = {
    # Division and argmin round differently from bitsandbytes on a few elements in a million; the
    # graded tensors must not punish them.
    "NF4 by division and argmin": (NF4, "codes = torch.bucketize(scaled.reshape(-1), midpoints).to(torch.uint8)",
                                   "codes = (blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]).reshape(-1, 1)\n"
                                   "    codes = (codes - levels).abs().argmin(dim=1).to(torch.uint8)"),
    "affine in tensors rather than Python floats": (
        AFF, "low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)\n    scale = (high - low) / qmax",
        "low, high = x.min().clamp(max=0), x.max().clamp(min=0)\n    scale = ((high - low) / qmax).item()\n"
        "    low = low.item()"),
}

test_solution_passes_the_graded_path, test_tests_reject_mistake, test_tests_accept_correct_variant = mutation_tests(
    NB, MUTANTS, CORRECT_VARIANTS)
