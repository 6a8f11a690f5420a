"""The causal speech-to-video DiT of Live Avatar (Wan2.2-S2V-14B architecture, spec §2).

Parameter names equal the published checkpoint's (1260 tensors for the 14B model). The model runs
in two modes over the caches of `kv_cache.py`:

* `prefill_sink`: the reference frame and FramePack motion tokens alone (t = 0 modulation, no
  audio) pass through every layer; their keys/values fill the cond region of the caches.
* `denoise_block`: one block of 3 noisy latent frames at one denoising step attends to the
  step's ring cache plus the cond region, gets audio injected after the injector layers, and
  returns the flow-matching velocity.

Precision follows the official code: weights and activations between blocks in the model dtype
(bf16 on GPU), modulation arithmetic, residual additions, norms, timestep embedding and head in
float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import block_ops, rope
from .block_ops import linear_weights
from .config import DiTConfig
from .fp8 import quantize_static
from .fp8_attention import fp8_attention
from .kv_cache import CacheLayout, KVCacheBank, StepCache, token_major
from .layers import AttentionWeights, CrossAttention, attention, layer_norm
from .model_audio import AudioInjector, CausalAudioEncoder

ROLE_NOISY, ROLE_REFERENCE, ROLE_MOTION = 0, 1, 2     # rows of trainable_cond_mask (spec §2.2)
FRAMEPACK_BUCKETS = (16, 2, 1)                         # oldest → newest motion latents (spec §2.6)


class SelfAttention(AttentionWeights):
    """Self-attention weights; the computation is `block_ops.attention_inputs` + the caller's `attend`."""


class DiTBlock(nn.Module):
    """Wan 2.x block: modulated self-attention (RoPE, over the caches), text cross-attention, FFN.

    The arithmetic lives in `block_ops` (compilable pure functions); this module holds the
    weights and the published parameter names."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.num_heads = cfg.num_heads
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, cos, sin, attend, text_kv, raw_keys: bool = False):
        """x [1, L, dim]; e0 [6, dim] float32 (one modulation set for all tokens of the call);
        `attend(q_rot, k_rot, k_raw, v) -> out` decides which keys/values the tokens see (out as
        `block_ops.attention_output` takes it); k_raw is None unless `raw_keys`."""
        sa, ca = self.self_attn, self.cross_attn
        q_rot, k_rot, k_raw, v = block_ops.compiled("attention_inputs")(
            x, e0, self.modulation, linear_weights(sa.q), linear_weights(sa.k), linear_weights(sa.v),
            sa.norm_q.weight, sa.norm_k.weight, cos, sin, self.num_heads, self.eps, raw_keys)
        out = attend(q_rot, k_rot, k_raw, v)
        return block_ops.compiled("finish_block")(
            x, out, e0, self.modulation, linear_weights(sa.o), self.norm3.weight, self.norm3.bias,
            linear_weights(ca.q), ca.norm_q.weight, linear_weights(ca.o), text_kv[0], text_kv[1],
            linear_weights(self.ffn[0]), linear_weights(self.ffn[2]), self.num_heads, self.eps)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation[0].float() + e).unbind(0)
        h = layer_norm(x, self.eps).to(x.dtype).float() * (1 + scale) + shift
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


class FramePacker(nn.Module):
    """Motion latents → tokens at three resolutions: newest 1 frame ×1, next 2 frames ×2, oldest 16 ×4."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        c = cfg.in_dim
        self.proj = nn.Conv3d(c, cfg.dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, cfg.dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, cfg.dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [C, T, H8, W8] (newest last; zero-padded on the left to 19) -> tokens [1, N, dim]."""
        total = sum(FRAMEPACK_BUCKETS)
        padded = motion.new_zeros(motion.shape[0], total, *motion.shape[2:])
        keep = min(total, motion.shape[1])
        if keep:
            padded[:, -keep:] = motion[:, -keep:]
        oldest, middle, newest = padded.unsqueeze(0).split(FRAMEPACK_BUCKETS, dim=2)
        tokens = [self.proj(newest), self.proj_2x(middle), self.proj_4x(oldest)]
        return torch.cat([t.flatten(2).transpose(1, 2) for t in tokens], dim=1)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t·ω_i), sin(t·ω_i)], ω_i = 10000^(−i/half), in float64 then float32 (spec §2.2)."""
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(t.to(torch.float64).cpu(), omega)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


class LiveAvatarDiT(nn.Module):
    """Causal Wan2.2-S2V DiT with the Live Avatar streaming interface."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.trainable_cond_mask = nn.Embedding(3, d)
        self.casual_audio_encoder = CausalAudioEncoder(cfg.audio_dim, cfg.audio_layers, d, cfg.num_audio_token)
        self.audio_injector = AudioInjector(d, cfg.num_heads, len(cfg.audio_inject_layers), cfg.eps)
        self.frame_packer = FramePacker(cfg)
        self.injector_of_layer = {layer: j for j, layer in enumerate(cfg.audio_inject_layers)}
        self._time_cache: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------- conditioning, computed once
    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def time_modulation(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(e [dim] for the head, e0 [6, dim] for the blocks), float32, cached per timestep value."""
        if t not in self._time_cache:
            sinusoid = sinusoidal_embedding(torch.tensor([float(t)]), self.cfg.freq_dim).to(self.device)
            lin1, lin2 = self.time_embedding[0], self.time_embedding[2]
            e = F.linear(F.silu(F.linear(sinusoid, lin1.weight.float(), lin1.bias.float())),
                         lin2.weight.float(), lin2.bias.float())
            proj = self.time_projection[1]
            e0 = F.linear(F.silu(e), proj.weight.float(), proj.bias.float())
            self._time_cache[t] = (e[0], e0[0].unflatten(0, (6, self.cfg.dim)))
        return self._time_cache[t]

    def text_context_kv(self, text_states: torch.Tensor, layers: range | None = None) -> list:
        """umT5 states [L, text_dim] -> per-layer cross-attention (k, v), computed once per prompt
        (None for layers outside `layers`, which another device holds).

        Rows are zero-padded to text_len before the embedding and all text_len rows are attended,
        as in the official model (spec §2.2)."""
        layers = layers if layers is not None else range(self.cfg.num_layers)
        rows = text_states[: self.cfg.text_len].to(self.device, self.dtype)
        padded = rows.new_zeros(self.cfg.text_len, rows.shape[1])
        padded[: rows.shape[0]] = rows
        context = self.text_embedding(padded.unsqueeze(0))
        return [block.cross_attn.context_kv(context) if i in layers else None for i, block in enumerate(self.blocks)]

    def encode_audio_block(self, features: torch.Tensor, history: int, history_latents: int):
        """wav2vec2 features of one block [layers, audio_dim, 12] -> (tokens [3, n+1, dim], global [3, dim]).

        The block is left-padded with `history` copies of its first frame and encoded alone; the
        first `history_latents` outputs are dropped (spec §2.5.3)."""
        feats = features.to(self.device).float().unsqueeze(0)
        feats = torch.cat([feats[..., :1].expand(*feats.shape[:-1], history), feats], dim=-1)
        glob, local = self.casual_audio_encoder(feats)
        glob, local = glob[:, history_latents:], local[:, history_latents:]
        return local[0].to(self.dtype), glob[0, :, 0].to(self.dtype)

    # ----------------------------------------------------------------------------- sink prefill
    def cond_tokens(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor) -> torch.Tensor:
        """[1, cond_len, dim]: reference frame tokens then FramePack motion tokens, with role embeddings."""
        ref = self.patch_embedding(ref_latent.to(self.device, self.dtype).unsqueeze(0)).flatten(2).transpose(1, 2)
        motion = self.frame_packer(motion_latents.to(self.device, self.dtype))
        roles = torch.tensor([ROLE_REFERENCE] * ref.shape[1] + [ROLE_MOTION] * motion.shape[1], device=self.device)
        return torch.cat([ref, motion], dim=1) + self.trainable_cond_mask(roles).to(self.dtype)

    def prefill_sink(self, ref_latent, motion_latents, text_kv, bank: KVCacheBank,
                     layers: range | None = None, x: torch.Tensor | None = None):
        """Run the cond tokens through `layers` (default: all) and fill the cond region of every step.

        Returns the hidden states after the last layer run, so a caller that shards layers over
        devices can hand them to the next range."""
        layout = bank.layout
        layers = layers if layers is not None else range(self.cfg.num_layers)
        if x is None:
            x = self.cond_tokens(ref_latent, motion_latents)
        positions = torch.cat([rope.reference_positions(30, layout.h, layout.w),
                               rope.motion_positions(layout.h, layout.w)])
        cos, sin = rope.rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.device)
        _, e0_zero = self.time_modulation(0.0)
        scales = bank.scales
        for i in layers:
            def attend(q_rot, k_rot, k_raw, v, i=i):
                ref_k = k_raw[:, :, : layout.ref_len]
                if i in bank.sink_ref_k:      # refill in place: captured CUDA graphs keep pointing at it
                    bank.sink_ref_k[i].copy_(ref_k)
                else:
                    bank.sink_ref_k[i] = token_major(ref_k).clone()     # rotated into token-major caches
                motion_k, cond_v = k_rot[:, :, layout.ref_len:], v
                if scales is not None:        # e4m3 caches (FP8 attention); the sink's own attention stays bf16
                    motion_k, cond_v = quantize_static(motion_k, scales.key[i]), quantize_static(v, scales.value[i])
                for cache in bank.all_steps():
                    cache.write_cond(i, motion_k, cond_v)
                return attention(q_rot, k_rot, v)
            x = self.blocks[i](x, e0_zero, cos, sin, attend, text_kv[i], raw_keys=True)   # compiled: on the TTFF path
        return x

    # ------------------------------------------------------------------------- streaming blocks
    def embed_noisy(self, latents: torch.Tensor) -> torch.Tensor:
        """Noisy block latents [C, F, H8, W8] -> tokens [1, F*h*w, dim] with pose/role terms.

        Without a pose video the pose latents are zero, so `cond_encoder` contributes its bias."""
        x = self.patch_embedding(latents.to(self.device, self.dtype).unsqueeze(0)).flatten(2).transpose(1, 2)
        # contiguous: elementwise ops (eager and Inductor alike) keep their input's layout, so a
        # transposed x would stay transposed through all 40 layers and every LayerNorm would
        # reduce over strided memory (at 704*384 on an H200 the norm after the text attention took
        # 148 µs instead of 51, docs/PERFORMANCE.md)
        x = x.contiguous()
        return x + self.cond_encoder.bias.to(self.dtype) + self.trainable_cond_mask.weight[ROLE_NOISY].to(self.dtype)

    def rope_tables(self, first_frame: int, frames: int, reference_frame: int, layout: CacheLayout):
        """(cos, sin) of the noisy tokens and (cos, sin) of the re-rotated reference keys."""
        noisy = rope.rope_cos_sin(rope.noisy_positions(first_frame, frames, layout.h, layout.w),
                                  self.cfg.head_dim, self.cfg.rope_theta, self.device)
        ref = rope.rope_cos_sin(rope.reference_positions(reference_frame, layout.h, layout.w),
                                self.cfg.head_dim, self.cfg.rope_theta, self.device)
        return (*noisy, *ref)

    def run_layers(self, x, layers: range, t: float, first_frame: int, tables, bank: KVCacheBank,
                   cache: StepCache, text_kv, audio) -> torch.Tensor:
        """Streaming pass of noisy tokens through `layers`, reading/writing `cache` (one step's).

        Pure GPU work (no host transfers), so a whole pass can be captured in a CUDA graph;
        `tables` come from `rope_tables`."""
        _, e0 = self.time_modulation(t)
        cos, sin, ref_cos, ref_sin = tables
        audio_tokens, audio_global = audio
        scales = bank.scales                  # set: the caches hold e4m3 and attention runs in FP8
        for i in layers:
            def attend(q_rot, k_rot, k_raw, v, i=i):
                key_scale = None if scales is None else scales.key[i]
                if scales is not None:        # e4m3 q (with its inverse scale), k and v
                    q_rot, q_inverse, k_rot, v = block_ops.compiled("fp8_attention_inputs")(
                        q_rot, k_rot, v, key_scale, scales.value[i])
                cache.write_block(i, first_frame, k_rot, v)
                cache.write_reference(i, block_ops.compiled("reference_keys")(bank.sink_ref_k[i], ref_cos, ref_sin,
                                                                               key_scale))
                keys, values = cache.active(i, first_frame, k_rot.shape[2])
                if scales is None:
                    return attention(q_rot, keys, values)
                return fp8_attention(q_rot, q_inverse, keys, values, scales, i), scales.output_inverse[i]
            x = self.blocks[i](x, e0, cos, sin, attend, text_kv[i])
            if i in self.injector_of_layer:
                x = self.audio_injector.inject(self.injector_of_layer[i], x, audio_tokens, audio_global)
        return x

    def unembed(self, x: torch.Tensor, t: float, layout: CacheLayout) -> torch.Tensor:
        """Head and unpatchify: tokens [1, F*h*w, dim] -> velocity [C, F, H8, W8] (model dtype)."""
        e, _ = self.time_modulation(t)
        out = self.head(x[0], e)                                  # [F*h*w, pt*ph*pw*C], float32
        pt, ph, pw = self.cfg.patch_size
        frames = x.shape[1] // layout.frame_tokens
        out = out.view(frames, layout.h, layout.w, pt, ph, pw, self.cfg.out_dim)
        out = torch.einsum("fhwpqrc->cfphqwr", out)
        return out.reshape(self.cfg.out_dim, frames * pt, layout.h * ph, layout.w * pw).to(self.dtype)

    def denoise_block(self, latents, t: float, first_frame: int, reference_frame: int,
                      bank: KVCacheBank, cache: StepCache, text_kv, audio) -> torch.Tensor:
        """One denoising step of one block on one device: returns the velocity [C, 3, H8, W8]."""
        x = self.embed_noisy(latents)
        tables = self.rope_tables(first_frame, latents.shape[1], reference_frame, bank.layout)
        x = self.run_layers(x, range(self.cfg.num_layers), t, first_frame, tables, bank, cache, text_kv, audio)
        cache.advance(first_frame)
        return self.unembed(x, t, bank.layout)
