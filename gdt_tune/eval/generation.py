"""Forecast generation for ``gdt-tune evaluate``: one prefill per prompt, every draw decodes from it.

The prompts of a batch are left-padded and prefilled once (only the last position is projected onto
the vocabulary); their KV cache is then repeated for the draws (greedy first, then the sampled
ones) and all rows decode together. Sampling is GDT's temperature and top-p, with one uniform number
per row and step from ``generator``: a batch draws the same tokens wherever it runs (data-parallel
evaluate), and the greedy row equals the one-prefill-per-draw reference::

    tokens = generate_draws(model, prompts, [(0.0, 1.0)] + [(0.9, 0.85)] * 10, max_new=600, pad_id=pad,
                            stop_id=eot, generator=torch.Generator().manual_seed(0), device=dev, dtype=dt)
    tokens[prompt][draw]   # generated ids, up to (not including) the stop token
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import KVCache
from torchtune.modules.common_utils import local_kv_cache


@contextmanager
def last_position_logits(model):
    """The decoder's head on the last position only (a 7k-token prefill makes one row of logits, not 7k)."""
    def unembed(self, h):
        return self.output(self.norm(h[:, -1:])).float()

    previous = model.__dict__.get("unembed")
    model.unembed = types.MethodType(unembed, model)
    try:
        yield
    finally:
        if previous is None:
            del model.unembed
        else:
            model.unembed = previous


def pick_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """Per row: the argmax where ``temperature`` is 0, else a top-p sample at that temperature, by
    inverse CDF at ``uniform`` over the kept tokens (most probable first)."""
    greedy = logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature.clamp_min(1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p[:, None], 0.0)
    cdf = sorted_p.cumsum(-1)
    index = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).clamp_max(cdf.shape[-1] - 1)
    sampled = order.gather(-1, index).squeeze(-1)
    return torch.where(temperature <= 0, greedy, sampled)


@torch.no_grad()
def generate_draws(model, prompts: list[list[int]], draws: list[tuple[float, float]], max_new: int, pad_id: int,
                   stop_id: int, generator: torch.Generator, device, dtype) -> list[list[list[int]]]:
    """Generated ids of every prompt for every ``(temperature, top_p)`` draw (temperature 0: greedy)."""
    n_prompts, n_draws, length = len(prompts), len(draws), max(map(len, prompts))
    total = length + max_new
    tokens = torch.full((n_prompts, length), pad_id, dtype=torch.long)
    present = torch.zeros((n_prompts, total), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = torch.tensor(p)
        present[i, length - len(p):] = True
    masks = get_causal_mask_from_padding_mask(present, target_seq_len=total).to(device)
    positions = get_position_ids_from_padding_mask(present).to(device)
    rows = n_prompts * n_draws  # row r: prompt r // n_draws, draw r % n_draws
    temperature = torch.tensor([t for _ in prompts for t, _ in draws], device=device)
    top_p = torch.tensor([p for _ in prompts for _, p in draws], device=device)
    out = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    with local_kv_cache(model, batch_size=n_prompts, device=device, dtype=dtype, decoder_max_seq_len=total), \
            last_position_logits(model):
        logits = model(tokens.to(device), input_pos=positions[:, :length], mask=masks[:, :length])[:, -1]
        for cache in (m for m in model.modules() if isinstance(m, KVCache)):  # the prompt's cache, once per draw
            cache.k_cache = cache.k_cache.repeat_interleave(n_draws, dim=0)
            cache.v_cache = cache.v_cache.repeat_interleave(n_draws, dim=0)
            cache.batch_size = rows
        logits = logits.repeat_interleave(n_draws, dim=0)
        for step in range(max_new):
            uniform = torch.rand(rows, generator=generator, dtype=torch.float64).to(device)
            chosen = pick_tokens(logits, temperature, top_p, uniform.float())
            for r, (t, finished) in enumerate(zip(chosen.tolist(), done.tolist())):
                if not finished and t != stop_id:
                    out[r].append(t)
            done |= chosen == stop_id
            if bool(done.all()) or step == max_new - 1:
                break
            logits = model(chosen[:, None], input_pos=positions[:, length + step].repeat_interleave(n_draws)[:, None],
                           mask=masks[:, length + step, None, :].repeat_interleave(n_draws, dim=0))[:, -1]
    return [out[i * n_draws:(i + 1) * n_draws] for i in range(n_prompts)]
