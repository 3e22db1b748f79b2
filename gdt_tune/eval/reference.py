"""The straightforward paths that ``gdt-tune evaluate`` replaced, kept as the reference its fast
paths are tested (tests/test_event_scoring.py, tests/test_generation.py) and benchmarked
(bench/eval_speed.py) against: one forward of ``context + candidate`` per event candidate, and one
prefill of the prompt per forecast draw (torchtune's ``generate``)."""

from __future__ import annotations

import torch


@torch.no_grad()
def score_sequences(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, device, batch_size: int) -> list[float]:
    """Mean log-probability of each continuation given its context, in padded batches."""
    scores = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        length = max(len(c) + len(x) for c, x in batch)
        tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
        for i, (c, x) in enumerate(batch):
            tokens[i, : len(c) + len(x)] = torch.tensor(c + x)
        hidden, head = _hidden_states(model, tokens.to(device))
        # torchtune's decoder returns its output in fp32 (also for a bf16 model): back to the head's dtype
        head_dtype = next((p.dtype for p in head.parameters()), hidden.dtype)
        for i, (c, x) in enumerate(batch):
            pos = torch.arange(len(c) - 1, len(c) + len(x) - 1, device=hidden.device)
            logits = head(hidden[i, pos].to(head_dtype))  # only where needed: 128k vocab
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            scores.append(float(logprobs[torch.arange(len(x)), torch.tensor(x)].mean()))
    return scores


def _hidden_states(model, tokens):
    """(final hidden states, output head) of a torchtune decoder; (logits, identity) for any
    other module."""
    head = getattr(model, "output", None)
    if not isinstance(head, torch.nn.Module):
        return model(tokens), torch.nn.Identity()
    model.output = torch.nn.Identity()
    try:
        return model(tokens), head
    finally:
        model.output = head


def _top_p_next_token(top_p: float, temperature: float):
    def next_token(model, input_pos, x, q=None, *, mask=None, temperature_=None, **kwargs):
        logits = model(x, input_pos=input_pos, mask=mask)[:, -1]
        if temperature <= 0:
            return logits.argmax(-1, keepdim=True).to(torch.int), logits.unsqueeze(1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1)
        return order.gather(-1, choice).to(torch.int), logits.unsqueeze(1)
    return next_token


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new: int, temperature: float, top_p: float,
                     device, dtype) -> list[str]:
    """Decoded completions of left-padded ``prompts`` (KV cache; stops at <|eot_id|>). The first
    token is picked by torchtune's sampler (temperature only; answers always start with 'Task')."""
    from torchtune.generation import generate
    from torchtune.modules.common_utils import local_kv_cache

    length = max(map(len, prompts))
    batch = torch.full((len(prompts), length), tokenizer.pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, length - len(p):] = torch.tensor(p)
    with local_kv_cache(model, batch_size=len(prompts), device=device, dtype=dtype,
                        decoder_max_seq_len=length + max_new):
        out, _ = generate(model, batch.to(device), max_generated_tokens=max_new, pad_id=tokenizer.pad_id,
                          temperature=max(temperature, 1e-5), stop_tokens=[tokenizer.eot_id],
                          custom_generate_next_token=_top_p_next_token(top_p, temperature))
    texts = []
    for row in out[:, length:].tolist():
        row = row[: row.index(tokenizer.eot_id)] if tokenizer.eot_id in row else row
        texts.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id and t != 0]))
    return texts
