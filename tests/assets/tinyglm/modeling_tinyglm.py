"""A remote-code causal LM whose output layer is `output_layer`, not `lm_head` (like ChatGLM).

Loaded only with trust_remote_code=True, from a local folder: the shape of the failure ChatGLM users
hit when tools look for `lm_head` by name.
"""

from transformers import LlamaConfig, LlamaForCausalLM


class TinyGLMConfig(LlamaConfig):
    model_type = "tinyglm"


class TinyGLMForCausalLM(LlamaForCausalLM):
    config_class = TinyGLMConfig
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.output_layer = self._modules.pop("lm_head")

    @property
    def lm_head(self):  # the parent's forward still works; no module is registered under this name
        return self.output_layer

    def get_output_embeddings(self):
        return self.output_layer

    def set_output_embeddings(self, new):
        self.output_layer = new
