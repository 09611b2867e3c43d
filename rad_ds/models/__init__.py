"""The RAD hybrid model family (config, causal LM, Mamba2 mixer, hybrid cache), registered with the
transformers Auto classes; saved checkpoints carry the model code (``trust_remote_code``)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_rad_hybrid import LAYER_TYPES, RadHybridConfig
from .hybrid_cache import RadHybridCache
from .mamba2_mixer import Mamba2Mixer
from .modeling_rad_hybrid import RadHybridForCausalLM, RadHybridModel, RadHybridPreTrainedModel

AutoConfig.register("rad_hybrid", RadHybridConfig, exist_ok=True)
AutoModel.register(RadHybridConfig, RadHybridModel, exist_ok=True)
AutoModelForCausalLM.register(RadHybridConfig, RadHybridForCausalLM, exist_ok=True)
# save_pretrained writes `auto_map` and copies the modeling files next to the weights, so an exported
# student loads with plain transformers (trust_remote_code=True) on a machine without rad_ds
RadHybridConfig.register_for_auto_class()
RadHybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LAYER_TYPES", "Mamba2Mixer", "RadHybridCache", "RadHybridConfig", "RadHybridForCausalLM", "RadHybridModel",
    "RadHybridPreTrainedModel",
]
