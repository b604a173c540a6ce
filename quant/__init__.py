"""LSQ quantization-aware training primitives in pure PyTorch (no YOLO, no Ultralytics)."""
from .convert import (activation_quantizers, calibrate, default_policy, fixed_operators, is_quantized, layer_bits,
                      layer_roles, policy_roles, quant_convs, quantize_model, register_policy, replace_module,
                      set_quantizers_enabled, weight_quantizers)
from .grid import MIN_SCALE, broadcast_scale, qrange
from .lsq import LSQQuantizer, lsq_fake_quant
from .qconv import QuantConv2d, set_recompute_input
from .recipe import QuantRecipe

__all__ = ["LSQQuantizer", "QuantConv2d", "QuantRecipe", "quantize_model", "layer_bits", "calibrate",
           "register_policy", "layer_roles", "policy_roles", "default_policy", "fixed_operators", "quant_convs",
           "is_quantized", "activation_quantizers", "weight_quantizers", "set_quantizers_enabled",
           "lsq_fake_quant", "set_recompute_input", "replace_module", "broadcast_scale", "qrange", "MIN_SCALE"]
