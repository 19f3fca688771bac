"""A Llama-family transformer (llama, mistral, phi3, qwen2) that loads Hugging Face checkpoints, scores per-token
log-probs without ever building a (B, T, V) tensor, and samples with a KV cache.

Top to bottom: the architecture (ModelArgs, RoPE, attention, MLP, block, Transformer); scoring (token_logprobs);
sampling (generate); LoRA adapters; the tokenizer; Hugging Face I/O (config.json, load, save, PEFT adapters).
Parameter names follow the HF checkpoint minus its "model." prefix, so loading and saving copy tensors name for name.
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Architecture

@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096                 # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008            # intermediate_size
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False          # qwen2 (and llama with attention_bias) has biases on q, k, v
    o_bias: bool = False            # llama with attention_bias also biases o_proj
    mlp_bias: bool = False
    max_seq_len: int = 4096         # max_position_embeddings
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # {"rope_type": ..., factor, ...}; empty = plain RoPE
    eos_token_ids: list = field(default_factory=list)  # every end-of-turn id (Llama 3.1 has three)

    @classmethod
    def from_hf_config(cls, hf_config, source="config.json"):
        return from_hf_config(hf_config, source)  # config.json parsing lives with the rest of the HF I/O, below


# RoPE. Convention: Hugging Face's "rotate_half", where dimensions i and i + D/2 of a head form a pair. HF checkpoints
# store q/k projections in that layout, so no permutation of their rows is needed - and none is done. Tables are fp32:
# bf16 angles lose precision at long positions.

def rope_frequencies(args):
    """Inverse frequencies (head_dim/2,) for short sequences, those for long ones (longrope only, else None), and the
    factor longrope multiplies cos/sin by. Computed as transformers does, in fp32, for parity past position 8192."""
    d = args.head_dim
    base = args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)    # (head_dim/2,)
    inv_freq = 1.0 / base
    s = args.rope_scaling
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / s["factor"], None, 1.0
    if kind == "llama3":  # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        orig = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / lo, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
        return torch.where(medium, blended, scaled), None, 1.0
    if kind == "longrope":  # Phi-3.5: per-frequency factors, one set for short and one for long sequences
        orig = s["original_max_position_embeddings"]
        factor = s.get("factor") or args.max_seq_len / orig
        attn = s.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        short, long = (1.0 / (torch.tensor(s[k], dtype=torch.float32) * base) for k in ("short_factor", "long_factor"))
        return short, long, attn
    return inv_freq, None, 1.0


class RoPE(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.reset()

    def reset(self, device=None):
        """(Re)builds the frequency tables; called after a meta-device build, when buffers hold no data."""
        short, long, self.attention_factor = rope_frequencies(self.args)
        self.register_buffer("inv_freq", short.to(device), persistent=False)
        self.register_buffer("inv_freq_long", None if long is None else long.to(device), persistent=False)

    def forward(self, positions):
        """positions (B, T) long -> cos, sin (B, T, head_dim) fp32."""
        inv_freq = self.inv_freq
        if self.inv_freq_long is not None:
            # longrope switches to the long factors once the sequence outgrows the original context; like
            # transformers, the choice is made per call from the largest position (no host sync).
            orig = self.args.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(positions.max() + 1 > orig, self.inv_freq_long, self.inv_freq)
        angles = positions[..., None].float() * inv_freq          # (B, T, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)                # (B, T, head_dim)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x, cos, sin):
    """x (B, H, T, D); rotates pairs (i, i + D/2) in fp32, returns x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # normalise in fp32, scale in the model dtype (as HF does)


class Attention(nn.Module):
    def __init__(self, args, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # this layer's slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # Write this step's keys/values at each row's own positions, then attend to every cached key at or
            # before the query's position. The mask comes from positions, never from token values.
            k, v = cache.write(self.layer_idx, positions, k, v)                          # (B, Hkv, S, D)
            mask = torch.arange(k.shape[2], device=x.device) <= positions[:, :, None]    # (B, T, S)
        if mask is None:  # plain causal forward over the whole (right-padded) sequence
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # mask (B, T, S): True where query t may attend to key s
            y = decode_attention(q, k, v, mask) if T == 1 else masked_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                          # (B, T, dim)


def decode_attention(q, k, v, mask):
    """Attention for one query per row: q (B, H, 1, D), k/v (B, Hkv, S, D), mask (B, 1, S) -> (B, H, 1, D). The query
    heads that share a KV head form one matrix, so GQA needs no copy of the cache; softmax in fp32."""
    # On CPU ~1.3x (fp32) to ~10x (bf16) faster than SDPA at this shape.
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    q = q.view(B, n_kv, H // n_kv, D)                                       # (B, Hkv, G, D)
    scores = (q @ k.transpose(-1, -2)).float() * D ** -0.5                  # (B, Hkv, G, S)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)


def masked_attention(q, k, v, mask):
    """SDPA under a boolean mask (B, T, S). CUDA's kernels that take a mask take no grouped KV heads, so the KV heads
    are repeated there; else SDPA would fall back to its math kernel, which holds (B, H, T, S) fp32 scores."""
    if q.is_cuda and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, args, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args, hf_config=None):
        super().__init__()
        self.args = args
        self.hf_config = hf_config or {}  # the raw config.json, written back unchanged on save
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied models (SmolLM2, Llama 3.2) reuse the embedding as the output layer: no second parameter to tie.
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RoPE(args)
        self.checkpoint_layers = False  # activation checkpointing per block (train.py's flag)

    def output_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, tokens, positions=None, cache=None, mask=None):
        """tokens (B, T) -> final-normed hidden states (B, T, dim). With `cache` (a KVCache), keys and values are
        written at `positions` (B, T) and attention covers the cache; with `mask` (B, T, T) bool, token t attends to
        the tokens s where mask[:, t, s] (packed sequences, latro.pack); else a plain causal forward."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        elif positions.dim() == 1:
            positions = positions.expand(B, T)
        cos, sin = self.rope(positions)
        x = self.embed_tokens(tokens)                                                    # (B, T, dim)
        for layer in self.layers:
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, None, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, positions, mask)
        return self.norm(x)

    def forward(self, tokens, positions=None, targets=None, target_mask=None, temperature=1.0, mask=None):
        """Without targets: logits (B, T, V). With targets (B, T) and target_mask (B, T) bool: the fp32 log-prob of
        targets[b, t] under the logits at position t where target_mask is set, else 0 - computed chunk by chunk,
        never as (B, T, V). Scoring lives in forward() so that DDP and FSDP hooks see it. positions and mask: see
        hidden_states."""
        h = self.hidden_states(tokens, positions, mask=mask)                             # (B, T, dim)
        if targets is None:
            return F.linear(h, self.output_weight())                                     # (B, T, V)
        if target_mask is None:  # every position is a target (the memory plan's worst case: no data to index by)
            B, T = targets.shape
            lp = fused_logprobs(h.flatten(0, 1), self.output_weight(), targets.flatten(), temperature)     # (B*T,)
            return lp.view(B, T).clone()  # not a view: FSDP2 hooks a module's output for backward
        lp = fused_logprobs(h[target_mask], self.output_weight(), targets[target_mask], temperature)   # (N,)
        return torch.zeros(target_mask.shape, device=h.device, dtype=torch.float32).masked_scatter(target_mask, lp)


# ----------------------------------------------------------------------------------------------------------------
# Scoring: log p(target) = logit[target]/tau - logsumexp(logits/tau), chunk by chunk (tau: the temperature)

class FusedLogProbs(torch.autograd.Function):
    """lm_head + fp32 log-softmax + gather for N rows, `chunk` rows at a time. Only (chunk, V) logits exist at
    once; backward recomputes them instead of saving them. d logp / d logits = (onehot - softmax) / temperature."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk):
        out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            logits = F.linear(h[i:i + chunk], weight).float().div_(temperature)          # (c, V) fp32
            out[i:i + chunk] = logits.gather(1, targets[i:i + chunk, None])[:, 0] - logits.logsumexp(-1)
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        device = h.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if ctx.needs_input_grad[1] else None
        # Recompute under the forward's autocast state (as torch.amp.custom_bwd does): a backward run outside autocast
        # would otherwise recompute fp32 logits for a forward that used bf16 ones.
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i in range(0, h.shape[0], chunk):
                hc, g = h[i:i + chunk], grad[i:i + chunk]
                logits = F.linear(hc, weight)                                           # (c, V) recomputed
                mm_dtype = logits.dtype                                                 # bf16 under autocast
                dlogits = logits.float().div_(tau).softmax(-1).mul_(-g[:, None] / tau)  # in place: one fp32 (c, V)
                del logits
                dlogits.scatter_add_(1, targets[i:i + chunk, None], g[:, None] / tau)
                dlogits = dlogits.to(mm_dtype)
                if grad_h is not None:
                    grad_h[i:i + chunk] = dlogits @ weight                              # (c, dim)
                if grad_w is not None:  # fp32 accumulation straight from the matmul: no extra .float() copy of it
                    grad_w += dlogits.t() @ hc                                          # (V, dim)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def fused_logprobs(h, weight, targets, temperature=1.0, chunk=None):
    """h (N, dim), weight (V, dim), targets (N,) -> (N,) fp32 log-probs. The chunk keeps each logits block near
    16M floats (64 MB), whatever the vocabulary: big enough for an efficient matmul, small next to the model."""
    chunk = chunk or max(16, (1 << 24) // weight.shape[0])
    return FusedLogProbs.apply(h, weight, targets, float(temperature), chunk)


def token_logprobs(model, tokens, starts, ends, temperature=1.0, dense=False, positions=None, mask=None):
    """Per-token log-probs of chosen spans - the one scoring function for policy, reference and reward.

    tokens (B, T) long, right-padded (padding after a row's end is never read: attention is causal).
    starts, ends (B,) long: score positions starts[b] <= t < ends[b] (starts >= 1: token 0 has no prefix).
    Returns (B, T) fp32 with out[b, t] = log softmax(logits[b, t-1] / temperature)[tokens[b, t]] inside the span and
    0 outside, so out.sum(1) is the span's log-likelihood. Differentiable; `model` may be wrapped in DDP/FSDP.
    dense: score every position and zero those outside the spans, instead of gathering the span positions: no
    host sync and no data-dependent shape (the memory plan runs this on fake tensors, which hold no data).
    positions (B, T) and mask (B, T, T): for packed sequences (latro.pack), each token's position in its own row and
    what it attends to; default: 0..T-1 and causal.
    """
    B, T = tokens.shape
    starts, ends = torch.as_tensor(starts, device=tokens.device), torch.as_tensor(ends, device=tokens.device)
    if not dense and ((starts < 1).any() or (ends > T).any()):
        raise ValueError("token_logprobs: spans must satisfy 1 <= start and end <= tokens.shape[1]")
    t = torch.arange(1, T, device=tokens.device)
    context = {"positions": None if positions is None else positions[:, :-1],
               "mask": None if mask is None else mask[:, :-1, :-1]}
    scored = (t >= starts[:, None]) & (t < ends[:, None])                # (B, T-1): predicted by position t-1
    if dense:
        lp = model(tokens[:, :-1], targets=tokens[:, 1:], temperature=temperature, **context) * scored  # (B, T-1)
    else:
        lp = model(tokens[:, :-1], targets=tokens[:, 1:], target_mask=scored, temperature=temperature, **context)
    return F.pad(lp, (1, 0))                                              # (B, T)


# ----------------------------------------------------------------------------------------------------------------
# Sampling with a KV cache

def pad_right(rows, device):
    """Token lists -> a (len(rows), longest) long tensor, right-padded with 0. The padding is never read: spans or
    positions mask it."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, device=device)
    return out


class KVCache:
    """Preallocated keys/values (B, Hkv, S, D) per layer; each row writes at its own positions."""

    def __init__(self, args, batch, max_len, device, dtype):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.length = max_len  # attention reads slots [0, length); generate() narrows it to the longest row

    def write(self, layer_idx, positions, k, v):
        """positions (B, T); k, v (B, Hkv, T, D). Returns the layer's keys/values in slots [0, length)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        ck, cv = self.k[layer_idx], self.v[layer_idx]
        ck[rows, :, positions] = k.transpose(1, 2)  # advanced indexing puts (B, T) first: (B, T, Hkv, D)
        cv[rows, :, positions] = v.transpose(1, 2)
        return ck[:, :, :self.length], cv[:, :, :self.length]

    def select(self, rows):
        """Keeps only the given batch rows (a 1-D index tensor), e.g. to drop finished sequences. Layer by layer, so
        each old tensor is freed as its copy is made (never the whole old cache and the whole new one at once)."""
        for i in range(len(self.k)):
            self.k[i] = self.k[i].index_select(0, rows)
            self.v[i] = self.v[i].index_select(0, rows)


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, uniforms=None):
    """logits (B, V) fp32 -> next tokens (B,). Temperature 0 is greedy. uniforms: (B, 1) float64 draws in [0, 1)
    to sample with (generate() makes them from per-prompt generators), or None for torch's global RNG. Sampling is
    by inverse CDF: each row's uniform is looked up in its cumulative distribution."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p (>= 1 token)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Not torch.multinomial: it costs ~16 ms per step for 16 x 49k on a CPU.
    cdf = logits.softmax(-1).double().cumsum(-1)                                           # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) if uniforms is None else uniforms
    # right=True skips tokens of zero probability (flat steps of the cdf). If u * total rounds up to total, the
    # search runs off the end: take the first token where the cdf reaches its total, which has probability > 0.
    total = cdf[:, -1:]
    picked = torch.searchsorted(cdf, u * total, right=True)[:, 0]
    return torch.minimum(picked, (cdf >= total).int().argmax(-1))


def prefill(model, prompts, num_samples, max_new_tokens, round_to=1):
    """Prefills each prompt once (right-padded; padding sits after the prompt and is masked by position), then
    copies its cache into its K sample rows: the RL case samples 16 rationales of one question.
    -> (KVCache with B = P * K rows and room for max_new_tokens more, its length rounded up to a multiple of
    round_to; logits (B, V) fp32 of each row's next token)"""
    device, K, P = model.embed_tokens.weight.device, num_samples, len(prompts)
    max_prompt = max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache_len = -(-(max_prompt + max_new_tokens) // round_to) * round_to
    cache = KVCache(model.args, P * K, cache_len, device, model.embed_tokens.weight.dtype)
    per_prompt = KVCache(model.args, P, max_prompt, device, cache.k[0].dtype)
    positions = torch.arange(max_prompt, device=device).expand(P, max_prompt)
    h = model.hidden_states(pad_right(prompts, device), positions, per_prompt)              # (P, T, dim)
    last = h[torch.arange(P, device=device), lengths - 1]                                 # (P, dim)
    logits = F.linear(last, model.output_weight()).float().repeat_interleave(K, 0)        # (B, V)
    for i in range(model.args.n_layers):
        cache.k[i][:, :, :max_prompt] = per_prompt.k[i].repeat_interleave(K, 0)
        cache.v[i][:, :, :max_prompt] = per_prompt.v[i].repeat_interleave(K, 0)
    return cache, logits


def decode_step(model, tokens, pos, cache, length):
    """One decoding step: tokens (B,) at positions pos (B,), attending to cache slots [0, length) ->
    logits (B, V) fp32 of the next tokens."""
    cache.length = length
    h = model.hidden_states(tokens[:, None], pos[:, None], cache)                         # (B, 1, dim)
    return F.linear(h[:, 0], model.output_weight()).float()                               # (B, V)


def static_decode_step(model, tokens, pos, cache):
    """decode_step over every row and the whole preallocated cache (masked by position): its shapes never change
    during a generate() call, so torch.compile captures it once."""
    return decode_step(model, tokens, pos, cache, cache.k[0].shape[2])


@functools.cache
def compiled_decode_step(device_type):
    """static_decode_step compiled: inductor on CPU; on GPU with CUDA graphs ("reduce-overhead"), which replay the
    step's kernels without a launch each."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(static_decode_step, mode=mode, fullgraph=True, dynamic=False)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop=None, num_samples=1,
             seed=None, tokenizer=None, progress=None, compiled=False):
    """Samples continuations for a batch of prompts of different lengths.

    prompts: list[list[int]]. Returns list[list[int]] of new tokens, len(prompts) * num_samples rows, the samples
    of one prompt adjacent. stop: None = the model's end-of-turn ids; else a list of token ids and/or strings
    (strings need `tokenizer`; they may span token boundaries). A row ends with the token that completes its stop,
    or after max_new_tokens. Temperature 0 is greedy. seed: an int, or one int per prompt; a prompt's samples depend
    only on its seed, not on the rest of the batch. progress: called after every decoding step with keywords done,
    total (decoding steps), rows_finished, rows and tokens (generated so far). compiled: decode with
    compiled_decode_step (fixed shapes: finished rows stay in the batch, masked, instead of leaving it); the same
    tokens as the eager path.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    stop = list(model.args.eos_token_ids) if stop is None else list(stop)
    stop_ids = {s for s in stop if isinstance(s, int)}
    stop_strs = [s for s in stop if isinstance(s, str)]
    if stop_strs and tokenizer is None:
        raise ValueError("generate: stop strings need tokenizer=")
    window = max((len(s) for s in stop_strs), default=0) + 8  # tokens to decode when checking stop strings
    device = model.embed_tokens.weight.device
    P, K = len(prompts), num_samples
    generators = None
    if seed is not None:
        seeds = [seed + i for i in range(P)] if isinstance(seed, int) else list(seed)
        if len(seeds) != P:
            raise ValueError(f"generate: got {len(seeds)} seeds for {P} prompts")
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    B = P * K
    # compiled: the cache length rounded up to 256, so batches whose prompts differ a little in length share one
    # compiled graph (a new shape means a new compilation)
    cache, logits = prefill(model, prompts, K, max_new_tokens, round_to=256 if compiled else 1)   # logits (B, V)
    if compiled and device.type == "cuda":
        for t in cache.k + cache.v:  # written in place by the graph: CUDA graphs need them at fixed addresses
            torch._dynamo.mark_static_address(t)
    pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(K)    # (B,) next positions
    prompt_len = [len(prompts[b // K]) for b in range(B)]
    out = [[] for _ in range(B)]
    rows = list(range(B))                     # the output row of each batch row; finished rows leave the batch
    done = [False] * B
    n_tokens = 0
    for step in range(max_new_tokens):
        uniforms = None
        if generators is not None and temperature > 0:
            # every prompt draws K uniforms per step whatever its rows' state, so its samples depend on its seed only
            uniforms = torch.cat([torch.rand(K, 1, device=device, dtype=torch.float64, generator=g)
                                  for g in generators])[rows]                             # (rows, 1)
        tokens = sample_next(logits, temperature, top_k, top_p, uniforms)                 # (rows,)
        for b, t in zip(rows, tokens.tolist()):
            if done[b]:
                continue
            out[b].append(t)
            n_tokens += 1
            if t in stop_ids or (stop_strs and any(s in tokenizer.decode(out[b][-window:]) for s in stop_strs)):
                done[b] = True
        keep = [j for j, b in enumerate(rows) if not done[b]]
        if progress is not None:
            finished = B if step == max_new_tokens - 1 else B - len(keep)  # the last step ends every row
            progress(done=step + 1, total=max_new_tokens, rows_finished=finished, rows=B, tokens=n_tokens)
        if not keep or step == max_new_tokens - 1:
            break
        if not compiled and len(keep) <= 3 * len(rows) // 4:
            # Drop finished rows once a quarter of the batch has finished: later steps compute only live rows.
            # (Compacting copies the cache, so it is done in a few big steps rather than at every finish.)
            idx = torch.tensor(keep, device=device)
            cache.select(idx)
            tokens, pos, rows = tokens[idx], pos[idx], [rows[j] for j in keep]
        if compiled:  # fixed shapes: every row decodes every step; a finished row's tokens are ignored above
            logits = compiled_decode_step(device.type)(model, tokens, pos, cache)
        else:  # attend only to slots some row has filled: row b has written its prompt and `step` sampled tokens
            logits = decode_step(model, tokens, pos, cache, max(prompt_len[b] for b in rows) + step + 1)
        pos = pos + 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# LoRA: PEFT's parametrisation and parameter names, so adapters move between this code and PEFT unchanged

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r, base_layer frozen. lora_A starts kaiming-uniform and
    lora_B at zero (as in PEFT), so a fresh adapter changes nothing. The adapters are fp32 master weights; under
    autocast their matmuls run in the autocast dtype, else in fp32 with the sum cast back to the base's dtype."""

    def __init__(self, base_layer, r, alpha, dropout=0.0):
        super().__init__()
        self.base_layer, self.r, self.alpha, self.scaling = base_layer.requires_grad_(False), r, alpha, alpha / r
        self.enabled = True  # False: exactly base_layer (adapters_disabled)
        self.lora_dropout = nn.Dropout(dropout)
        like = dict(bias=False, device=base_layer.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base_layer.in_features, r, **like)        # weight (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, **like)       # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base_layer(x)
        if not self.enabled:
            return y
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        return (y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(y.dtype)


def add_lora(model, r, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Wraps the `targets` projections of every block in a LoRALinear of rank r (scaling alpha / r) and freezes every
    other parameter, so that only lora_A and lora_B train. Returns model."""
    if model.args.model_type == "phi3":  # PEFT's adapters for it sit on the fused qkv_proj and gate_up_proj
        raise ValueError("add_lora: phi3 is not supported (its checkpoint fuses q/k/v and gate/up projections)")
    if not set(targets) <= set(LORA_TARGETS) or not targets or not (isinstance(r, int) and r > 0):
        raise ValueError(f"add_lora: expected r >= 1 and targets among {', '.join(LORA_TARGETS)}; got r={r!r}, "
                         f"targets={list(targets)!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("add_lora: the model already has LoRA adapters")
    model.requires_grad_(False)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in targets:
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside the block the model computes exactly its base model (pi_ref, with no second copy of the weights). Use it
    without gradients: activation checkpointing would recompute a backward with the adapters on again."""
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in lora]
    for m in lora:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(lora, before):
            m.enabled = enabled


@torch.no_grad()
def merge_lora(model):
    """Folds each adapter into its base weight, W + B @ A * scaling computed in fp32 and stored in W's dtype, and puts
    the plain nn.Linear back: the result is a plain model (every parameter trainable) that save() writes."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base_layer.weight
                w.copy_(w.float() + child.lora_B.weight.float() @ child.lora_A.weight.float() * child.scaling)
                setattr(parent, name, child.base_layer)
    return model.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

def _token_text(tok):
    return tok.get("content") if isinstance(tok, dict) else tok  # special tokens may be serialised AddedTokens


class Tokenizer:
    """tokenizers' Tokenizer plus the Hugging Face rules around it: BOS/EOS from tokenizer_config.json and the
    model's chat template rendered with jinja2."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "generation_config.json")

    def __init__(self, directory):
        from tokenizers import Tokenizer as _Tk
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (expected a Hugging Face fast tokenizer file)")
        try:
            self.tk = _Tk.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.directory = directory
        tok_config = _read_json(os.path.join(directory, "tokenizer_config.json"), default={})
        special = _read_json(os.path.join(directory, "special_tokens_map.json"), default={})
        self.special = {k: _token_text(tok_config.get(k) or special.get(k))
                        for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id = self.token_to_id(self.special["bos_token"])
        self.pad_id = self.token_to_id(self.special["pad_token"])
        gen = _read_json(os.path.join(directory, "generation_config.json"), default={})
        eos = _as_list(self.token_to_id(self.special["eos_token"])) + _as_list(gen.get("eos_token_id"))
        self.eos_ids = list(dict.fromkeys(eos))  # in order, without repeats
        # BOS: tokenizer_config's add_bos_token wins; otherwise whatever tokenizer.json's post-processor does.
        with_special = self.tk.encode("a", add_special_tokens=True).ids
        post_processor_adds_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] and \
            self.tk.encode("a", add_special_tokens=False).ids[:1] != [self.bos_id]
        self.add_bos = tok_config.get("add_bos_token", post_processor_adds_bos)
        self.add_eos = tok_config.get("add_eos_token", False)
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            template = open(jinja_path).read()
        self.chat_template = template

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, text):
        return None if text is None else self.tk.token_to_id(text)

    def encode(self, text, add_special_tokens=True):
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids  # never a second BOS when a chat template already wrote one
        if add_special_tokens and self.add_eos and self.eos_ids:
            ids = ids + [self.eos_ids[0]]
        return ids

    @property
    def eot_id(self):
        """The token that closes an assistant turn (the answer template ends with it). Read off the chat template,
        since tokenizer_config's eos_token is not always it (Phi-3.5: eos <|endoftext|>, turn end <|end|>)."""
        if self.chat_template is not None:
            text = self.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                                            add_generation_prompt=False)
            for i in self.encode(text[text.rindex("A") + 1:], add_special_tokens=False):
                if i in self.eos_ids:
                    return i
        return self.eos_ids[0] if self.eos_ids else None

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        if self.chat_template is None:
            raise ValueError(f"{self.directory}: no chat_template in tokenizer_config.json or chat_template.jinja")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self.special.items() if v is not None}, **kwargs)


def _compile_template(source):
    # Same environment as transformers renders with, so templates written for it render identically.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from datetime import datetime

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face I/O: config.json, hub downloads, loading and saving (safetensors only; nothing is ever unpickled)

ALIASES = {  # short names for the paper's models and CPU-sized ones
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}
SUPPORTED_TYPES = ("llama", "mistral", "phi3", "qwen2")
ROPE_FIELDS = {  # the rope types we support, and the fields each needs
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "model*.safetensors", "model.safetensors.index.json"]
# "model*": the HF-layout weights only. Mistral-7B-Instruct-v0.3 also ships its 14 GB consolidated.safetensors.


def from_hf_config(hf_config, source="config.json"):
    """ModelArgs from a Hugging Face config.json dict. Fails with one line naming the field for anything we would
    silently get wrong."""
    get = hf_config.get
    mt = get("model_type")
    if "latro" in hf_config and "args" in hf_config:  # train.py's run record, not a model's config
        raise ValueError(f"{source}: this is a training run directory, not a model; pass one of its "
                         "checkpoint-NNNNNN directories")
    if mt not in SUPPORTED_TYPES:
        raise ValueError(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {get('hidden_act')!r} is not supported (expected 'silu')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(get(key), int):
            raise ValueError(f"{source}: field {key!r} must be an integer, got {get(key)!r}")
    n_heads, max_pos = get("num_attention_heads"), get("max_position_embeddings", 4096)
    # A sliding window changes attention only for sequences longer than the window. (Qwen2 configs carry a
    # window that use_sliding_window switches off.)
    window = get("sliding_window") if mt != "qwen2" or get("use_sliding_window") else None
    if window is not None and window < max_pos:
        raise ValueError(f"{source}: sliding_window={window} < max_position_embeddings={max_pos} is not "
                         f"supported (only full attention; expected sliding_window null or >= {max_pos})")
    rope_theta, scaling = _rope_config(hf_config, source)
    partial = get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (expected 1.0)")
    attention_bias = bool(get("attention_bias", False))
    return ModelArgs(
        model_type=mt, vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=get("num_key_value_heads") or n_heads,
        head_dim=get("head_dim") or get("hidden_size") // n_heads, ffn_dim=get("intermediate_size"),
        norm_eps=get("rms_norm_eps", 1e-5), tie_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or attention_bias, o_bias=mt != "qwen2" and attention_bias,
        mlp_bias=bool(get("mlp_bias", False)), max_seq_len=max_pos, rope_theta=rope_theta,
        rope_scaling=scaling, eos_token_ids=_as_list(get("eos_token_id")),
    )


def _rope_config(hf_config, source):
    """RoPE settings from either the classic keys (rope_theta, rope_scaling) or the newer rope_parameters."""
    scaling = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    theta = scaling.pop("rope_theta", None) or hf_config.get("rope_theta") or 10000.0
    kind = scaling.pop("rope_type", scaling.pop("type", None)) or "default"  # "type": the older key; drop both
    if kind not in ROPE_FIELDS:
        raise ValueError(f"{source}: rope type {kind!r} is not supported (supported: {', '.join(ROPE_FIELDS)})")
    if kind == "longrope":  # Phi-3 configs keep the original context length at the top level
        scaling.setdefault("original_max_position_embeddings", hf_config.get("original_max_position_embeddings"))
    for key in ROPE_FIELDS[kind]:
        if scaling.get(key) is None:
            raise ValueError(f"{source}: {kind} rope scaling needs field {key!r}")
    return float(theta), ({} if kind == "default" else {"rope_type": kind, **scaling})


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _read_json(path, default=None):
    if not os.path.isfile(path):
        if default is not None:
            return default
        raise FileNotFoundError(f"{path}: missing (expected a Hugging Face model directory)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def resolve(name_or_path):
    """A local directory, an alias from ALIASES, or a hub id -> a local directory. Hub downloads are limited to
    config, tokenizer and safetensors files; HF_TOKEN is used for gated repos; the cache works offline."""
    if os.path.isdir(name_or_path):
        return name_or_path
    repo = ALIASES.get(name_or_path, name_or_path)
    if name_or_path.startswith((".", "/", "~")) or os.path.exists(os.path.dirname(repo) or "/nonexistent"):
        raise FileNotFoundError(f"{name_or_path}: no such model directory")
    if repo.count("/") != 1:
        raise ValueError(f"model {name_or_path!r}: not a local directory, not an alias "
                         f"({', '.join(ALIASES)}), and not a hub id like 'org/name'")
    from huggingface_hub import snapshot_download
    token = os.environ.get("HF_TOKEN")
    try:
        return snapshot_download(repo, allow_patterns=HUB_FILES, token=token)
    except Exception as online_error:
        try:  # no network: the local cache may still have it
            return snapshot_download(repo, allow_patterns=HUB_FILES, token=token, local_files_only=True)
        except Exception:
            pass
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
        if isinstance(online_error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            # The hub was not reached (HF_HUB_OFFLINE=1 or no network); its own advice ("set HF_HUB_OFFLINE=0")
            # does not help someone who is offline.
            raise ValueError(f"model {name_or_path!r}: {repo} is not in the local Hugging Face cache and the hub "
                             "cannot be reached (offline); pass --model /path/to/a/local/HF/directory, or run once "
                             "with network to fill the cache") from None
        reason = (str(online_error).splitlines() or [type(online_error).__name__])[0]
        raise ValueError(f"model {name_or_path!r}: could not fetch {repo} from the Hugging Face hub and it is "
                         f"not in the local cache ({type(online_error).__name__}: {reason})") from None


def _weight_files(directory):
    """The safetensors files of a checkpoint: the shards its index lists, or the single model.safetensors."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object")
        return sorted({os.path.join(directory, f) for f in weight_map.values()})
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{single}: missing (expected model.safetensors or model.safetensors.index.json; "
                                f".bin/.pth checkpoints are not loaded because they would be unpickled)")
    return [single]


def _hf_to_ours(name, tensor, args):
    """One checkpoint tensor -> {our parameter name: tensor}; Phi-3's fused projections are split here."""
    name = name.removeprefix("model.")
    if name.endswith("self_attn.qkv_proj.weight"):  # Phi-3 stores [q; k; v]: (q + 2 * kv, dim)
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        prefix = name.removesuffix("qkv_proj.weight")
        return {prefix + "q_proj.weight": tensor[:q], prefix + "k_proj.weight": tensor[q:q + kv],
                prefix + "v_proj.weight": tensor[q + kv:]}
    if name.endswith("mlp.gate_up_proj.weight"):
        gate, up = tensor.chunk(2, dim=0)  # Phi-3 stores [gate; up]: (2 * ffn_dim, dim)
        prefix = name.removesuffix("gate_up_proj.weight")
        return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up}
    return {name: tensor}


def _hf_key(name):
    """Our parameter name -> its key in a Hugging Face checkpoint (everything but lm_head lives under "model.")."""
    return name if name.startswith("lm_head") else "model." + name


def _ours_to_hf(state, args):
    """Our state dict -> checkpoint names, Phi-3's projections fused again (transformers and vLLM expect them so)."""
    state = dict(state)
    if args.model_type == "phi3":
        for i in range(args.n_layers):
            attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
            state[attn + "qkv_proj.weight"] = torch.cat([state.pop(f"{attn}{x}_proj.weight") for x in "qkv"])
            state[mlp + "gate_up_proj.weight"] = torch.cat([state.pop(f"{mlp}{x}_proj.weight") for x in ("gate", "up")])
    return {_hf_key(name): t.contiguous() for name, t in state.items()}


def _safetensors(path, device):
    """(key, tensor) for each tensor of a safetensors file. Float weights only: a quantized checkpoint is refused here
    rather than cast to float."""
    from safetensors import safe_open
    try:
        f = safe_open(path, framework="pt", device=str(device))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (listed in model.safetensors.index.json)") from None
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable safetensors file ({msg})") from None
    with f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                raise ValueError(f"{path}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}; expected float "
                                 "weights (float32, bfloat16 or float16; quantized checkpoints are not supported)")
            yield key, t


def _read_weights(directory, args, device, dtype):
    """Every tensor of the checkpoint in `dtype` on `device`, under our parameter names. Names and shapes are not
    checked here: load_state_dict does that (_assign)."""
    state = {}
    for path in _weight_files(directory):
        for key, t in _safetensors(path, device):
            state.update({name: part.to(dtype) for name, part in _hf_to_ours(key, t, args).items()})
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints also store the copy; we have no lm_head
    return state


def _assign(model, state, directory):
    """model.load_state_dict(strict=True, assign=True): PyTorch checks every name and shape, and a meta-device model
    takes the tensors themselves (never two copies). torch's error lists every problem; ours is one line naming the
    first, under its checkpoint name."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        # torch's lines after the header: 'Missing key(s) in state_dict: "a", "b".', 'Unexpected key(s) ...' or
        # 'size mismatch for c: copying a param with shape ... from checkpoint, the shape in current model is ...'
        problem = str(e).splitlines()[1].strip()
        m = re.match(r'(Missing|Unexpected) key\(s\) in state_dict: "([^"]+)"|size mismatch for ([^:]+): (.*)', problem)
        if m and m[3]:
            problem = f"tensor {_hf_key(m[3])!r}: {m[4]}"
        elif m:
            problem = f"{m[1].lower()} tensor {_hf_key(m[2])!r}"
        raise ValueError(f"{directory}: the checkpoint does not match its config.json: {problem}") from None


def resolve_dtype(flag, device):
    """--dtype of train.py and eval.py: "float32" or "bfloat16" as given; "auto" = bf16 on a GPU and on a CPU with
    native bf16 matmuls (AVX512-BF16 or AMX), else fp32."""
    if flag != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[flag]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


def fingerprint(directory):
    """A fingerprint of a model's weights without reading them all: each safetensors file's name, size and header
    (names, dtypes, shapes, offsets), and 64 blocks of 4 KiB spread over its data, hashed. Equal for a copy of
    the model; different for another model, even one of the same shape."""
    h = hashlib.sha256()
    for path in sorted(p for p in os.listdir(directory) if p.endswith(".safetensors")):
        full = os.path.join(directory, path)
        size = os.path.getsize(full)
        h.update(f"{path} {size}".encode())
        with open(full, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 100_000_000)))
            for i in range(64):
                f.seek(8 + n + (size - 8 - n) * i // 64)
                h.update(f.read(4096))
    adapter = os.path.join(directory, "adapter_config.json")
    if os.path.isfile(adapter):  # an adapter's model is its base's weights too
        h.update(fingerprint(resolve(_read_json(adapter).get("base_model_name_or_path") or "")).encode())
    return h.hexdigest()[:16]


def load(name_or_path, device=None, dtype=None):
    """Loads a model and its tokenizer from a local HF directory, a hub id, an alias in ALIASES, or a LoRA adapter
    directory (PEFT's layout: its base model, base_model_name_or_path, with the adapters added). dtype defaults to
    bfloat16 on GPU and float32 on CPU. Returns (model in eval mode, tokenizer)."""
    adapter_config = os.path.join(name_or_path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        base = _read_json(adapter_config).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config}: no base_model_name_or_path (the model the adapter was trained on)")
        model, tokenizer = load(base, device, dtype)
        return load_adapter(model, name_or_path).eval(), tokenizer
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer, directory = build_on_meta(name_or_path)
    _assign(model, _read_weights(directory, model.args, device, dtype), directory)
    model.rope.reset(device)  # RoPE's tables are non-persistent buffers: not in the checkpoint, still on meta
    return model.eval(), tokenizer


def build_on_meta(name_or_path):
    """The model of a checkpoint, built on the meta device (shapes, no memory), its tokenizer and the local directory
    holding its weights (read them with read_state)."""
    directory = resolve(name_or_path)
    config_path = os.path.join(directory, "config.json")
    hf_config = _read_json(config_path)
    args = ModelArgs.from_hf_config(hf_config, config_path)
    tokenizer = Tokenizer(directory)
    # End-of-turn ids from every file that lists them count for both: the model stops sampling at them, and the
    # tokenizer appends y's end-of-turn. Each keeps its own ids first (dict.fromkeys: ordered, no repeats).
    args.eos_token_ids = list(dict.fromkeys(args.eos_token_ids + tokenizer.eos_ids))
    tokenizer.eos_ids = list(dict.fromkeys(tokenizer.eos_ids + args.eos_token_ids))
    if not args.eos_token_ids:  # sampling would never stop and y would have no end-of-turn token: fail now
        raise ValueError(f"{directory}: no end-of-sequence token (expected eos_token_id in config.json or "
                         "generation_config.json, or eos_token in tokenizer_config.json)")
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned: never two copies
        model = Transformer(args, hf_config)
    return model, tokenizer, directory


def read_state(directory, model, device, dtype):
    """The checkpoint as a state dict with `model`'s parameter names, in `dtype` on `device`, for a model that cannot
    take the tensors itself (train.py: FSDP-sharded; rank 0 reads, then broadcasts). Checked as load() checks: a
    meta-device twin built from model.args takes them, so PyTorch checks every name and shape."""
    state = _read_weights(directory, model.args, device, dtype)
    with torch.device("meta"):
        twin = Transformer(model.args)
    _assign(twin, state, directory)
    return state


@contextlib.contextmanager
def _atomic_dir(out_dir):
    """Yields a temporary directory that replaces out_dir once the block has filled it."""
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    replace_dir(tmp, out_dir)


def replace_dir(tmp, final, old=None):
    """A complete directory `tmp` takes the place of `final` by renames: a kill leaves either one whole, never a
    half-written `final` (an existing one waits aside as `old` until the new one is in place)."""
    old = old or f"{final.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save(model, tokenizer, out_dir, state_dict=None, max_shard_bytes=5 * 2**30):
    """Writes the Hugging Face layout (config.json, safetensors shards + index, tokenizer files) so transformers and
    vLLM load the result unchanged. Atomic: files go to a temporary directory that replaces out_dir at the end.
    state_dict: a full state dict to write instead of model.state_dict() (FSDP gathers one)."""
    from safetensors.torch import save_file
    state = state_dict if state_dict is not None else model.state_dict()
    if any(".lora_" in name for name in state):
        raise ValueError("save: the model has LoRA adapters: merge_lora(model) first, or save_adapter() them")
    state = _ours_to_hf(state, model.args)
    hf_config = dict(model.hf_config)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf_config["torch_dtype"] = hf_config["dtype"] = dtype  # the older and the newer key
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name], size = t.detach().cpu(), size + nbytes
    with _atomic_dir(out_dir) as tmp:
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(names, shards):
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        for name in Tokenizer.FILES:
            if os.path.isfile(os.path.join(tokenizer.directory, name)):
                shutil.copyfile(os.path.join(tokenizer.directory, name), os.path.join(tmp, name))
    return out_dir


def save_adapter(model, out_dir, base_model_name_or_path, state_dict=None):
    """Writes the model's LoRA adapters in PEFT's layout (adapter_config.json, adapter_model.safetensors), which
    PeftModel.from_pretrained, load_adapter and load read. Atomic, like save(). state_dict: a full state dict to take
    the adapters from instead of model.state_dict() (FSDP gathers one)."""
    from safetensors.torch import save_file
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not lora:
        raise ValueError("save_adapter: the model has no LoRA adapters (add_lora)")
    first = next(iter(lora.values()))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.lora_dropout.p,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in lora}), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "layers_to_transform": None}
    state = state_dict if state_dict is not None else model.state_dict()
    adapters = {"base_model.model.model." + name: t.detach().cpu().contiguous()   # PEFT's keys: no adapter name
                for name, t in state.items() if ".lora_" in name}
    with _atomic_dir(out_dir) as tmp:
        save_file(adapters, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return out_dir


def load_adapter(model, adapter_dir):
    """Adds the LoRA adapters of adapter_dir (PEFT's layout, from save_adapter or PEFT's save_pretrained) to model,
    on the device of its weights. Returns model."""
    config_path, weights = (os.path.join(adapter_dir, f) for f in ("adapter_config.json", "adapter_model.safetensors"))
    for path in (config_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (expected a PEFT LoRA adapter directory; .bin adapters are not "
                                    "loaded because they would be unpickled)")
    config = _read_json(config_path)
    targets = config.get("target_modules")
    plain_lora = {"peft_type": config.get("peft_type") == "LORA", "bias": config.get("bias", "none") == "none",
                  "target_modules": isinstance(targets, list) and set(targets) <= set(LORA_TARGETS)}
    changes = ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "modules_to_save")  # PEFT options that change the math or what is adapted
    bad = [k for k, ok in plain_lora.items() if not ok] + [k for k in changes if config.get(k)]
    if bad:
        raise ValueError(f"{config_path}: {bad[0]}={config.get(bad[0])!r} is not supported (plain LoRA on "
                         f"{', '.join(LORA_TARGETS)} only)")
    add_lora(model, config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0), targets)
    params = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    device = next(iter(params.values())).device
    state = {key.removeprefix("base_model.model.model."): t for key, t in _safetensors(weights, device)}
    shape = lambda t: "absent" if t is None else tuple(t.shape)  # noqa: E731
    for name in sorted(params.keys() | state.keys()):
        if shape(params.get(name)) != shape(state.get(name)):
            raise ValueError(f"{weights}: tensor 'base_model.model.model.{name}' is {shape(state.get(name))} here but "
                             f"{shape(params.get(name))} in the model (r={config['r']}, target_modules={targets})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return model
