"""Forecast generation for ``gdt-tune evaluate``: one prefill per prompt, every draw decodes from it.

The prompts of a batch are left-padded and prefilled once (only the last position is projected onto
the vocabulary) into torchtune's KV cache. The draws (greedy first, then the sampled ones) then
decode together with *shared-prefix attention* (:func:`_shared_prefix_attention`): each row's
query attends to its prompt's cached keys and values, read once per prompt for all its draws (no
copy per draw, GQA heads grouped instead of expanded), and to its own generated tokens; the two
parts meet in one softmax. Sampling is GDT's temperature and top-p, with one uniform number
per row and step from ``generator``: a batch draws the same tokens wherever it runs (data-parallel
evaluate), and the greedy row equals the one-prefill-per-draw reference::

    tokens = generate_draws(model, prompts, [(0.0, 1.0)] + [(0.9, 0.85)] * 10, max_new=600, pad_id=pad,
                            stop_id=eot, generator=torch.Generator().manual_seed(0), device=dev, dtype=dt)
    tokens[prompt][draw]   # generated ids, up to (not including) the stop token
"""

from __future__ import annotations

import math
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import MultiHeadAttention
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


@dataclass
class _Decode:
    """One attention layer's decode state: the prompts' cached keys and values [prompts, kv heads,
    prompt length, head dim] with their padding (True: a real token), and each row's generated ones."""

    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    prefix_present: torch.Tensor
    draws: int
    suffix_k: torch.Tensor
    suffix_v: torch.Tensor
    filled: int = 0


def _shared_prefix_attention(self, x, y=None, *, mask=None, input_pos=None):
    """``MultiHeadAttention.forward`` for one decode step of rows = prompts x draws (``self._decode``)."""
    state: _Decode = self._decode
    rows, n_kv, dim = x.shape[0], self.num_kv_heads, self.head_dim
    group, prompts = self.num_heads // n_kv, rows // state.draws
    q = self.q_proj(x).view(rows, 1, self.num_heads, dim)
    k = self.k_proj(x).view(rows, 1, n_kv, dim)
    v = self.v_proj(x).view(rows, 1, n_kv, dim)
    if self.pos_embeddings is not None:
        q, k = self.pos_embeddings(q, input_pos=input_pos), self.pos_embeddings(k, input_pos=input_pos)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if self.q_norm is not None:
        q = self.q_norm(q)
    if self.k_norm is not None:
        k = self.k_norm(k)
    state.suffix_k[:, :, state.filled] = k[:, :, 0]
    state.suffix_v[:, :, state.filled] = v[:, :, 0]
    state.filled += 1
    scale = 1.0 / math.sqrt(dim)
    # the prompt part, once per prompt: [prompts, kv, draws x group, prompt length]
    q_prompt = q.reshape(prompts, state.draws, n_kv, group, dim).transpose(1, 2).reshape(prompts, n_kv, -1, dim)
    on_prompt = (q_prompt @ state.prefix_k.transpose(-1, -2)).float() * scale
    on_prompt = on_prompt.masked_fill(~state.prefix_present[:, None, None, :], float("-inf"))
    # each row's generated part: [rows, kv, group, generated]
    q_rows = q.reshape(rows, n_kv, group, dim)
    suffix_k, suffix_v = state.suffix_k[:, :, :state.filled], state.suffix_v[:, :, :state.filled]
    on_own = (q_rows @ suffix_k.transpose(-1, -2)).float() * scale
    prompt_len = on_prompt.shape[-1]
    on_prompt = on_prompt.reshape(prompts, n_kv, state.draws, group, prompt_len).transpose(1, 2)
    weights = torch.softmax(torch.cat([on_prompt.reshape(rows, n_kv, group, prompt_len), on_own], dim=-1), dim=-1)
    w_prompt = weights[..., :prompt_len].reshape(prompts, state.draws, n_kv, group, prompt_len).transpose(1, 2)
    out = (w_prompt.reshape(prompts, n_kv, -1, prompt_len).to(q.dtype) @ state.prefix_v)  # [prompts, kv, draws x group, dim]
    out = out.reshape(prompts, n_kv, state.draws, group, dim).transpose(1, 2).reshape(rows, n_kv, group, dim)
    out = out + weights[..., prompt_len:].to(q.dtype) @ suffix_v
    return self.output_proj(out.reshape(rows, 1, self.num_heads * dim))


@contextmanager
def shared_prefix_decode(model, draws: int, present: torch.Tensor, max_new: int):
    """Every attention layer decodes ``draws`` rows per prompt from its prefilled KV cache."""
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    for attn in layers:
        cache = attn.kv_cache
        rows, shape = cache.k_cache.shape[0] * draws, cache.k_cache.shape
        attn._decode = _Decode(cache.k_cache, cache.v_cache, present, draws,
                               cache.k_cache.new_empty(rows, shape[1], max_new, shape[3]),
                               cache.v_cache.new_empty(rows, shape[1], max_new, shape[3]))
        attn.forward = types.MethodType(_shared_prefix_attention, attn)
    try:
        yield
    finally:
        for attn in layers:
            del attn.forward, attn._decode


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
    tokens = torch.full((n_prompts, length), pad_id, dtype=torch.long)
    present = torch.zeros((n_prompts, length + max_new), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = torch.tensor(p)
        present[i, length - len(p):] = True
    positions = get_position_ids_from_padding_mask(present).to(device)
    prompt_mask = get_causal_mask_from_padding_mask(present[:, :length]).to(device)
    rows = n_prompts * n_draws  # row r: prompt r // n_draws, draw r % n_draws
    temperature = torch.tensor([t for _ in prompts for t, _ in draws], device=device)
    top_p = torch.tensor([p for _ in prompts for _, p in draws], device=device)
    out = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    with local_kv_cache(model, batch_size=n_prompts, device=device, dtype=dtype, decoder_max_seq_len=length), \
            last_position_logits(model):
        logits = model(tokens.to(device), input_pos=positions[:, :length], mask=prompt_mask)[:, -1]
        logits = logits.repeat_interleave(n_draws, dim=0)
        unused_mask = prompt_mask[:1, -1:].expand(rows, 1, length)  # the decoder wants one; the attention has its own
        with shared_prefix_decode(model, n_draws, present[:, :length].to(device), max_new):
            for step in range(max_new):
                uniform = torch.rand(rows, generator=generator, dtype=torch.float64).to(device)
                chosen = pick_tokens(logits, temperature, top_p, uniform.float())
                for r, (t, finished) in enumerate(zip(chosen.tolist(), done.tolist())):
                    if not finished and t != stop_id:
                        out[r].append(t)
                done |= chosen == stop_id
                if bool(done.all()) or step == max_new - 1:
                    break
                pos = positions[:, length + step].repeat_interleave(n_draws)[:, None]
                logits = model(chosen[:, None], input_pos=pos, mask=unused_mask)[:, -1]
    return [out[i * n_draws:(i + 1) * n_draws] for i in range(n_prompts)]
