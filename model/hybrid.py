"""The hybrid text model: embed -> N x [Gated DeltaNet | gated attention] + [MoE | MLP] -> norm ->
lm_head. One class serves Qwen3.5 MoE, Qwen3.5 dense and Qwen3-Next (whose grouped on-disk
projections the checkpoint loader un-groups into this layout).

A step reads a packed batch (model/batch.py) and reads/writes the hybrid cache; logits are only
computed for the rows the batch asks for.

Legend: T packed new tokens, H hidden, L rows that need logits, Vocab vocabulary rows.
"""
from __future__ import annotations

import torch
from torch import nn

from model.attention import GatedAttention
from model.batch import ForwardBatch, HybridCache
from model.config import ModelConfig
from model.deltanet import GatedDeltaNet
from model.moe import MLP, SparseMoE
from model.norm import RMSNorm
from model.rotary import RotaryEmbedding
from model.vision import VisionModel


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, experts: range | None = None):
        super().__init__()
        self.index, H = index, cfg.hidden_size
        self.is_linear = cfg.layer_types[index] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(H, cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                                             cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                                             cfg.linear_conv_kernel_dim, cfg.rms_norm_eps)
        else:
            self.self_attn = GatedAttention(H, cfg.num_attention_heads, cfg.num_key_value_heads,
                                            cfg.head_dim, cfg.rms_norm_eps)
        if cfg.layer_is_moe(index):
            self.mlp = SparseMoE(H, cfg.num_experts, cfg.num_experts_per_tok,
                                 cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
                                 cfg.norm_topk_prob, experts)
        else:
            self.mlp = MLP(H, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, x_TH, cos_TR, sin_TR, batch: ForwardBatch, cache: HybridCache,
                keep_L: torch.Tensor | None = None):
        """-> [T, H], or only the rows keep_L [L, H]: the mixer still reads every row (it writes
        the cache), the feed-forward runs on the rows kept."""
        mixed_TH = self.mix(self.input_layernorm(x_TH), cos_TR, sin_TR, batch, cache, keep_L)
        h_TH = (x_TH if keep_L is None else x_TH[keep_L]) + mixed_TH
        return h_TH + self.mlp(self.post_attention_layernorm(h_TH))

    def mix(self, x_TH, cos_TR, sin_TR, batch: ForwardBatch, cache: HybridCache, keep_L=None):
        i = self.index
        if self.is_linear:
            mixed_TH = self.linear_attn(x_TH, batch, cache.conv[i], cache.ssm[i])
            return mixed_TH if keep_L is None else mixed_TH[keep_L]
        return self.self_attn(x_TH, cos_TR, sin_TR, batch, cache.kv[i], keep_L)


class TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: range | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    def forward(self, x_TH, batch: ForwardBatch, cache: HybridCache) -> torch.Tensor:
        """-> the final-norm hidden rows batch.logits_indices [L, H] (every row [T, H] when None).
        Nothing reads the last layer's output of the other rows, so its feed-forward (and, in a
        full-attention layer, the queries, attention and o_proj) runs on the L rows only."""
        cos_TR, sin_TR = self.rotary.cos_sin(batch.positions, x_TH.dtype)
        *body, last = self.layers
        for layer in body:
            x_TH = layer(x_TH, cos_TR, sin_TR, batch, cache)
        return self.norm(last(x_TH, cos_TR, sin_TR, batch, cache, keep_L=batch.logits_indices))


def scatter(x_TH: torch.Tensor, input_ids_T: torch.Tensor, rows_MH: torch.Tensor | None,
            mask_T: torch.Tensor | None, token_id: int, kind: str) -> None:
    """Write `rows_MH` into x_TH's rows where mask_T (default: input_ids_T == token_id)."""
    if rows_MH is None:
        return
    if mask_T is None:
        mask_T = input_ids_T == token_id
    if int(mask_T.sum()) != rows_MH.shape[0]:
        raise ValueError(f"{int(mask_T.sum())} {kind} placeholder rows but "
                         f"{rows_MH.shape[0]} vision tokens")
    x_TH[mask_T.to(x_TH.device)] = rows_MH.to(x_TH.dtype)


class HybridForCausalLM(nn.Module):
    """`model(input_ids_T, batch, cache)` -> logits [L, Vocab] for batch.logits_indices;
    `model.hidden(...)` -> the hidden rows [L, H] those logits come from."""

    def __init__(self, cfg: ModelConfig, experts: range | None = None):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg, experts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.vision is not None:          # under model.visual, as in the checkpoint
            self.model.visual = VisionModel(cfg.vision)

    def forward(self, input_ids_T: torch.Tensor, batch: ForwardBatch, cache: HybridCache,
                inputs_embeds_TH: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids_T, batch, cache, inputs_embeds_TH))

    def hidden(self, input_ids_T: torch.Tensor, batch: ForwardBatch, cache: HybridCache,
               inputs_embeds_TH: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states [L, H] of the rows that need logits (forward without the
        lm_head): the engine turns them into logits only where it needs the whole distribution."""
        x_TH = self.model.embed_tokens(input_ids_T) if inputs_embeds_TH is None else inputs_embeds_TH
        return self.model(x_TH, batch, cache)

    def encode_images(self, pixel_values_NP: torch.Tensor, grid_thw_I3: torch.Tensor) -> torch.Tensor:
        """Vision tokens [M, H] for preprocessed images (model/image_processor.py), in order."""
        w = self.model.embed_tokens.weight
        return self.model.visual(pixel_values_NP.to(w.device), grid_thw_I3).to(w.dtype)

    def encode_videos(self, pixel_values_videos_NP: torch.Tensor,
                      video_grid_thw_V3: torch.Tensor) -> torch.Tensor:
        """Vision tokens [M, H] for preprocessed videos (model/video.py), in order: the same
        tower, attention within each temporal patch."""
        return self.encode_images(pixel_values_videos_NP, video_grid_thw_V3)

    def embed(self, input_ids_T: torch.Tensor, pixel_values_NP: torch.Tensor | None = None,
              grid_thw_I3: torch.Tensor | None = None, image_embeds_MH: torch.Tensor | None = None,
              image_mask_T: torch.Tensor | None = None, *,
              pixel_values_videos_NP: torch.Tensor | None = None,
              video_grid_thw_V3: torch.Tensor | None = None,
              video_embeds_MH: torch.Tensor | None = None,
              video_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [T, H] with vision tokens written into the image placeholder rows.

        Pass either the preprocessed images or their precomputed `encode_images` rows (M rows,
        in order; e.g. one chunk's slice). image_mask_T (bool [T]) picks the rows to overwrite;
        default: every image_token_id, which is wrong only when a packed step also holds a
        generated <|image_pad|> token of another sequence (MultimodalPrompt.image_mask avoids it).
        Videos likewise, into the video_token_id rows (MultimodalPrompt.video_mask/video_rows).
        """
        x_TH = self.model.embed_tokens(input_ids_T)
        if pixel_values_NP is not None:
            image_embeds_MH = self.encode_images(pixel_values_NP, grid_thw_I3)
        if pixel_values_videos_NP is not None:
            video_embeds_MH = self.encode_videos(pixel_values_videos_NP, video_grid_thw_V3)
        scatter(x_TH, input_ids_T, image_embeds_MH, image_mask_T, self.config.image_token_id, "image")
        scatter(x_TH, input_ids_T, video_embeds_MH, video_mask_T, self.config.video_token_id, "video")
        return x_TH

    @staticmethod
    def empty(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
              experts: range | None = None) -> "HybridForCausalLM":
        """Allocated but uninitialised parameters (no init pass), for loading or random fill."""
        with torch.device("meta"):
            model = HybridForCausalLM(cfg, experts)
        model = model.to(dtype).to_empty(device=device)
        if cfg.tie_word_embeddings:                   # to_empty gives each name its own tensor
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary = RotaryEmbedding(cfg).to(device)     # buffers are computed, not loaded
        return model

    def store_lm_head_by_column(self) -> None:
        """Keep an untied lm_head weight [V, H] in column-major storage (a transposed view of a
        contiguous [H, V]): the CPU GEMMs of a decode step then read plain [H, V] blocks instead
        of transposing row-major ones (benchmarks/engine.py (b)). Tied weights stay row-major:
        the embedding lookup reads rows."""
        w = self.lm_head.weight
        if not self.config.tie_word_embeddings and w.stride(-1) == 1:
            w.data = w.data.t().contiguous().t()

    def new_cache(self, num_blocks: int, block_size: int, num_slots: int) -> HybridCache:
        p = self.lm_head.weight
        return HybridCache(self.config, num_blocks, block_size, num_slots, p.dtype, p.device)
