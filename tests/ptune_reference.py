"""The prompt-tuning reference: transformers' own model with prompts prepended and deep prompts hooked in."""

from __future__ import annotations

import torch


def reference_forward(reference, ids, prompts, deep, attention_mask=None, inputs_embeds=None):
    """Logits of ``reference`` (transformers) for the tokens after the prompts.

    ``prompts`` [K, H] are prepended as ``inputs_embeds``; ``deep`` [blocks, K, H] (or None) is added to the
    first K hidden states before each decoder layer, through forward pre-hooks (Petals' deep prompt tuning).
    """
    k = prompts.shape[-2]
    embeds = reference.model.embed_tokens(ids) if inputs_embeds is None else inputs_embeds
    batch = embeds.shape[0]
    embeds = torch.cat([prompts.expand(batch, -1, -1), embeds], dim=1)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([torch.ones(batch, k, dtype=attention_mask.dtype), attention_mask], dim=1)
    hooks = []
    if deep is not None:
        for i, layer in enumerate(reference.model.layers):

            def hook(module, args, kwargs, prompt=deep[i]):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :k] + prompt, hidden[:, k:]], dim=1)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

            hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return reference(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, k:].contiguous()
    finally:
        for h in hooks:
            h.remove()


def reference_greedy(reference, ids, prompts, deep, new_tokens: int) -> torch.Tensor:
    """Greedy generation by full recompute with the prompts: ids followed by ``new_tokens`` tokens."""
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = reference_forward(reference, ids, prompts, deep)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
