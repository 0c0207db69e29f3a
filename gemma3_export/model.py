"""The Gemma 3 text decoder (../shared/reference/GEMMA3.md), as plain nn.Modules.

Module and parameter names follow transformers' `Gemma3ForCausalLM`, so its state dicts load as is.
Two ways to run it:
- `model(tokens)`: full-sequence logits [B, T, vocab], no cache (reference, training);
- `model(tokens, input_pos)` after `setup_caches(...)`: one cached step over tokens[1, T] starting at
  absolute position input_pos[0], returning the last token's logits [1, vocab].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache, RingKVCache
from .config import Gemma3Config

IMAGE_TOKEN_ID = 262144  # Gemma 3's image soft token (GEMMA3.md)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32; checkpoints store w (init 0)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; `scaling` divides positions (linear scaling of 4b+ global layers)."""

    def __init__(self, head_dim: int, base: float, scaling: float = 1.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq / scaling, persistent=False)

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        freqs = pos.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
        return emb.cos(), emb.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply rotate-half RoPE to x [B, H, T, D] with cos/sin [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, blocks: Tensor | None = None) -> Tensor:
    """Boolean [T, S]: query at p sees keys at p-window+1..p (local) or 0..p (global).

    `blocks` [T] (image_blocks) numbers the image blocks of this chunk: a query inside one also sees the
    block's later keys (bidirectional), as transformers does: (causal OR same block) AND window. A block
    never straddles chunks (the runner's chunk plan), so only keys of this chunk can share one.
    """
    q, k = q_pos[:, None], k_pos[None, :]
    allowed = torch.logical_and(k <= q, k >= 0)
    if blocks is not None:
        start, T = q_pos[0], q_pos.shape[0]
        in_chunk = torch.logical_and(k_pos >= start, k_pos < start + T)
        k_blocks = torch.where(in_chunk, blocks[(k_pos - start).clamp(0, T - 1)], 0)  # [S]
        same = torch.logical_and(blocks[:, None] == k_blocks[None, :], blocks[:, None] > 0)
        allowed = torch.logical_or(allowed, same)
    if window is not None:
        allowed = torch.logical_and(allowed, k > q - window)
    return allowed


def image_blocks(is_image: Tensor) -> Tensor:
    """[T] bool -> [T] int: 0 for text, k for a token of the k-th run of image soft tokens."""
    previous = torch.cat([torch.zeros_like(is_image[:1]), is_image[:-1]])
    starts = torch.logical_and(is_image, torch.logical_not(previous))
    return torch.where(is_image, torch.cumsum(starts.to(torch.int64), 0), 0)


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.scaling = c.query_pre_attn_scalar**-0.5
        self.window = c.sliding_window if c.is_local(layer) else None
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, pos: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor | None,
                blocks: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = rotate(self.q_norm(q), *rope)  # QK-norm comes before RoPE
        k = rotate(self.k_norm(k), *rope)
        if input_pos is None:
            keys, values, k_pos = k, v, pos
        else:
            keys, values, k_pos = self.cache.update(input_pos, k, v)  # [1, Hkv, S, D], [S]
        mask = attention_mask(pos, k_pos, self.window, blocks)  # [T, S]
        # GQA without copying the cache: fold the query heads sharing a kv head into the rows.
        rep = self.n_heads // self.n_kv
        q = q.reshape(B, self.n_kv, rep * T, self.head_dim)
        scores = (q @ keys.transpose(2, 3)) * self.scaling  # [B, Hkv, rep*T, S]
        scores = scores.view(B, self.n_kv, rep, T, -1)
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(dim=-1).to(values.dtype).view(B, self.n_kv, rep * T, -1)
        out = (probs @ values).view(B, self.n_heads, T, self.head_dim)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: Tensor, pos: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor | None,
                blocks: Tensor | None = None) -> Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), pos, rope, input_pos, blocks))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3TextModel(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        c = config
        self.rope_local = RotaryEmbedding(c.head_dim, c.rope_local_base_freq)  # never scaled
        self.rope_global = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling_factor)
        self.embed_scale = config.embed_scale
        self.image_token_id = IMAGE_TOKEN_ID  # multimodal checkpoints say which (VisionConfig)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, image_embeds: Tensor | None = None) -> Tensor:
        T = tokens.shape[1]
        pos = torch.arange(T, device=tokens.device)
        if input_pos is not None:
            pos = pos + input_pos
        rope = {None: self.rope_global(pos)}
        blocks = None
        if image_embeds is None:
            x = self.embed_tokens(tokens) * self.embed_scale
        else:
            x, blocks = self._embed_with_images(tokens, image_embeds)
        for layer in self.layers:
            w = layer.self_attn.window
            if w not in rope:
                rope[w] = self.rope_local(pos)
            x = layer(x, pos, rope[w], input_pos, blocks)
        return self.norm(x)

    def _embed_with_images(self, tokens: Tensor, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Token embeddings with image_embeds [1, T, H] where the image soft tokens stand (not scaled by
        sqrt(hidden)); the soft token's own row is never read (it may lie outside the vocabulary)."""
        is_image = tokens == self.image_token_id  # [1, T]
        x = self.embed_tokens(torch.where(is_image, 0, tokens)) * self.embed_scale
        x = torch.where(is_image[..., None], image_embeds.to(x.dtype), x)
        # One token is its own block at most, which causality already allows (and Core ML's T = 1
        # decode function does not convert the block gather).
        return x, image_blocks(is_image[0]) if tokens.shape[1] > 1 else None


class Gemma3ForCausalLM(nn.Module):
    """The decoder with its tied LM head (one Parameter shared with the embedding)."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def setup_caches(self, max_context: int, dtype: torch.dtype = torch.float32) -> None:
        """Give every layer its static cache: global layers `max_context` slots, local layers a ring."""
        c = self.config
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            if c.is_local(i) and c.sliding_window < max_context:
                attn.cache = RingKVCache(c.num_key_value_heads, c.sliding_window, c.head_dim, dtype)
            else:
                attn.cache = KVCache(c.num_key_value_heads, max_context, c.head_dim, dtype)

    @property
    def caches(self) -> list[KVCache]:
        return [layer.self_attn.cache for layer in self.model.layers]

    def reset_caches(self) -> None:
        for cache in self.caches:
            cache.k.zero_()
            cache.v.zero_()

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, image_embeds: Tensor | None = None) -> Tensor:
        """Full-sequence logits [B, T, V] without input_pos; last-token logits [1, V] with it.
        `image_embeds` [1, T, H] (vision.Gemma3Vision's output, placed where tokens hold the image soft
        token; other rows ignored) makes it a multimodal step, batch 1."""
        h = self.model(tokens, input_pos, image_embeds)
        if input_pos is not None:
            h = h[:, -1]  # a 262k vocabulary makes full-sequence logits expensive
        return self.lm_head(h)
