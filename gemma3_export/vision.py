"""The Gemma 3 image side (../shared/reference/GEMMA3.md, "Vision"), as plain nn.Modules.

SigLIP encoder: 14x14 patches of a 896x896 image -> 4096 patch vectors of width 1152 (27 pre-norm
layers, no pooling head). Projector: 4x4 average pool of the 64x64 patch grid -> 256 vectors, an
RMSNorm of the (1+w) form, a matmul to the text width (no bias). The result stands in the prompt where
the image soft tokens are, NOT multiplied by sqrt(hidden_size) (model.Gemma3TextModel).

Module and parameter names follow transformers' `Gemma3ForConditionalGeneration` (under `model.` in
newer checkpoints, at the top in older ones), so its state dicts load as is (weights.load_vision_state).
Image files and Pan & Scan are in images.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SiglipVisionConfig, VisionConfig
from .model import RMSNorm


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side**2, c.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, P, D], patches row-major
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        d = c.hidden_size
        self.n_heads, self.head_dim = c.num_attention_heads, d // c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        N, P, _ = x.shape
        q, k, v = (p(x).view(N, P, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        probs = ((q @ k.transpose(2, 3)) * self.head_dim**-0.5).float().softmax(-1).to(q.dtype)  # [N, H, P, P]
        return self.out_proj((probs @ v).transpose(1, 2).flatten(2))


class SiglipMLP(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(c) for _ in range(c.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)  # [N, P, D]


class SiglipVisionModel(nn.Module):
    """transformers' `SiglipVisionModel` without the pooling head (Gemma 3 has none)."""

    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(c)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vision_model(pixels)


class MultiModalProjector(nn.Module):
    """Average-pool the patch grid to `mm_tokens_per_image`, RMSNorm, project to the text width."""

    def __init__(self, config: VisionConfig, text_hidden: int):
        super().__init__()
        c = config.vision_config
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(c.hidden_size, text_hidden))
        self.mm_soft_emb_norm = RMSNorm(c.hidden_size, c.layer_norm_eps)
        self.side = c.patches_per_side
        self.kernel = self.side // round(config.mm_tokens_per_image**0.5)

    def forward(self, patches: Tensor) -> Tensor:
        N, _, D = patches.shape
        grid = patches.transpose(1, 2).reshape(N, D, self.side, self.side)  # [N, D, 64, 64]
        pooled = F.avg_pool2d(grid, self.kernel, stride=self.kernel).flatten(2).transpose(1, 2)  # [N, 256, D]
        return self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight  # [N, 256, text hidden]


class Gemma3Vision(nn.Module):
    """pixels float32[N, 3, S, S] (preprocessed, images.py) -> image embeddings [N, tokens, text hidden]."""

    def __init__(self, config: VisionConfig, text_hidden: int):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config, text_hidden)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.multi_modal_projector(self.vision_tower(pixels))
