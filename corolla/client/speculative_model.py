"""Petals' speculative-generation classes: `AutoDistributedSpeculativeModel` and
`Distributed{Family}ForSpeculativeGeneration`, on corolla's speculative decoding (`corolla.client.speculative`).

As in Petals, `from_pretrained(..., small_model=M)` attaches a small local model of the same tokenizer, and a
greedy `generate` drafts with it and verifies the drafts through the swarm in one pass per iteration
(`speculative_inference_iteration_size` drafts, Petals' name; default 10). The output is token-identical to
plain greedy generation. The same model can also speculate with n-gram drafts
(`prompt_lookup_num_tokens=`) or another `assistant_model=`, like every corolla causal LM; sampling uses the
exact acceptance rule. Without `small_model`, `generate` is plain generation.
"""

from __future__ import annotations

from corolla.client.hf_model import auto_class, family_class_names, family_classes
from corolla.client.model import DistributedModelForCausalLM

__all__ = [
    "SPECULATIVE_CLASSES",
    "AutoDistributedSpeculativeModel",
    "DistributedModelForSpeculativeGeneration",
    *family_class_names("ForSpeculativeGeneration"),
]


class DistributedModelForSpeculativeGeneration(DistributedModelForCausalLM):
    """A distributed causal LM that drafts with a small local model (`small_model`) when generating."""

    auto_name = "AutoDistributedSpeculativeModel"
    small_model = None

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, small_model=None, **kwargs):
        model = super().from_pretrained(model_name_or_path, **kwargs)
        model.__dict__["small_model"] = small_model  # not a submodule: its weights are not this model's
        return model

    def generate(self, inputs=None, *args, speculative_inference_iteration_size: int | None = None, **kwargs):
        drafting = any(kwargs.get(name) is not None for name in ("assistant_model", "prompt_lookup_num_tokens"))
        if self.small_model is not None and not drafting:
            kwargs["assistant_model"] = self.small_model
            if speculative_inference_iteration_size is not None and kwargs.get("generation_config") is None:
                kwargs["num_assistant_tokens"] = speculative_inference_iteration_size
            elif kwargs.get("generation_config") is None and "num_assistant_tokens" not in kwargs:
                kwargs["num_assistant_tokens"] = 10
        elif speculative_inference_iteration_size is not None:
            raise ValueError(
                "speculative_inference_iteration_size needs a small_model (from_pretrained(small_model=))"
            )
        return super().generate(inputs, *args, **kwargs)


#: model_type -> speculative class, for `AutoDistributedSpeculativeModel`
SPECULATIVE_CLASSES: dict[str, type[DistributedModelForSpeculativeGeneration]] = {}
family_classes(
    DistributedModelForSpeculativeGeneration, "ForSpeculativeGeneration", globals(), SPECULATIVE_CLASSES
)
AutoDistributedSpeculativeModel = auto_class(
    "AutoDistributedSpeculativeModel", SPECULATIVE_CLASSES, "distributed speculative model", __name__
)
