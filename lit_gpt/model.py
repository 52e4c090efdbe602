"""One model file for GPT-2, Pythia (GPT-NeoX), Llama-family and SmolLM2 models, with Selective Self-Attention (SSA).

Every difference between the families is a field of `Config`. The attention temperatures (SSA and the baselines it
is compared with) are per-(token, head) scalars that multiply queries, keys or values before
`scaled_dot_product_attention`, so no T x T matrix is ever built; docs/method.md gives the method and our choices.

Reading order: GPT, Block, CausalSelfAttention (with the explicit attention path the fused one must equal), the
temperatures with their autograd function, the KV cache, the MLPs, norms and RoPE. Loading lives in
lit_gpt/checkpoint.py, the output layer's loss and the inference linear in lit_gpt/kernels.py, the analysis hooks in
lit_gpt/analysis.py.
"""

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt.config import Config
from lit_gpt.kernels import LinearCrossEntropy, gelu

WEIGHTS_FILENAME = "model.safetensors"


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=build_norm(config),
            )
        )
        if config.position_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.tie_weights()
        self.init_weights()
        self.max_seq_length = config.block_size

    def init_weights(self) -> None:
        """GPT-2 initialisation of the backbone, then what SSA, a baseline or a gate adds: the backbone draws the same
        random numbers whatever the attention's additions, so every variant of a model starts from the same weights."""
        added = [m for m in self.modules() if isinstance(m, ADDED_MODULES)]
        inside = {id(sub) for t in added for sub in t.modules()}
        for module in self.modules():
            if id(module) not in inside:
                self._init_weights(module)
        for block in self.transformer.h:  # scaled residual projections, as in GPT-2
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        for module in added:
            module.reset_parameters()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 initialisation of one backbone module."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """The longest sequence the RoPE cache (and KV cache) covers; at most `block_size` for learned positions."""
        if self.config.position_embedding == "learned" and value > self.config.block_size:
            raise ValueError(f"This model learned {self.config.block_size} positions; cannot serve {value}.")
        self._max_seq_length = value
        self.reset_rope_cache()

    def reset_rope_cache(self, device: torch.device | None = None) -> None:
        device = device or self.lm_head.weight.device
        cos, sin = build_rope_cache(self.max_seq_length, self.config, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        only_last: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids. input_pos: (T,) the tokens' slots in the KV cache, for decoding with it (and only
        then); the causal mask compares slots. Without a cache the slots are 0..T-1.
        mask: an extra attention mask, boolean (True = attend) or additive, broadcastable to (B, nh, T, keys).
        targets: (B, T) next-token ids (-100 where no loss is taken); then the mean cross-entropy is returned
        instead of the logits, computed without materialising them.
        only_last: return the logits of the last position only, (B, 1, vocab): a prompt's prefill needs no more, and
        the output layer over every position would cost a (B, T, vocab) tensor.
        position_ids: (B, T) positions of each row's tokens where they differ from their slots: a left-padded batch
        numbers each row's real tokens from 0. Positions drive RoPE, learned position embeddings and the
        temperatures' log(n); by default they are the slots."""
        B, T = idx.shape
        if T == 0:
            raise ValueError(f"Expected at least one token per sequence, got input of shape {tuple(idx.shape)}.")
        has_cache = self.transformer.h[0].attn.kv_cache is not None
        if input_pos is None:
            if has_cache:
                raise RuntimeError("A KV cache is set: pass input_pos to decode with it, or call"
                                   " `model.clear_kv_cache()` first.")
            if T > self.max_seq_length:
                raise ValueError(f"Sequence length {T} exceeds the model's max_seq_length {self.max_seq_length}.")
            input_pos = torch.arange(T, device=idx.device)
        elif not has_cache:
            raise RuntimeError("input_pos is for decoding with the KV cache: call `model.set_kv_cache(...)` first.")
        if position_ids is None:
            position_ids = input_pos
        elif position_ids.shape != idx.shape:
            raise ValueError(f"position_ids must have the shape of idx {tuple(idx.shape)}, got"
                             f" {tuple(position_ids.shape)}.")
        cos, sin = self.cos[position_ids], self.sin[position_ids]
        if position_ids.dim() == 2:  # per row: (B, 1, T, d) against q and k of (B, heads, T, hs)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.position_embedding == "learned":
            x = x + self.transformer.wpe(position_ids)
        for block in self.transformer.h:
            x = block(x, cos, sin, position_ids, input_pos, mask)
        x = self.transformer.ln_f(x)
        if targets is not None:
            # autograd runs a Function's forward with grad mode off, so whether gradients are wanted is decided here
            wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
            return LinearCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, self.lm_head.bias, targets.flatten(),
                                            -100, wants_grad)
        return self.lm_head(x[:, -1:] if only_last else x)  # (B, T or 1, vocab)

    def compile_blocks(self, **kwargs) -> "GPT":
        """torch.compile each transformer block in place (`nn.Module.compile`): parameter names, state_dict and
        checkpoints stay as they are. The first steps pay the compilation; see benchmarks/compile.py for what it
        gains on each path."""
        for block in self.transformer.h:
            block.compile(**kwargs)
        return self

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, dtype: torch.dtype | None = None):
        """Allocate a KV cache of `max_seq_length` positions (default: the model's max_seq_length)."""
        length = max_seq_length or self.max_seq_length
        if length > self.max_seq_length:
            raise ValueError(
                f"A KV cache of {length} positions exceeds the model's max_seq_length {self.max_seq_length}."
            )
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(self.config, batch_size, length, self.lm_head.weight, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def temperature_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() if isinstance(m, TEMPERATURES) for p in m.parameters()]

    def added_parameters(self) -> list[nn.Parameter]:
        """What the attention's additions (temperatures, gates) add to the backbone."""
        return [p for m in self.modules() if isinstance(m, ADDED_MODULES) for p in m.parameters()]

    def added_parameter_names(self) -> set[str]:
        ids = {id(p) for p in self.added_parameters()}
        return {name for name, p in self.named_parameters() if id(p) in ids}

    def added_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The added parameters by what they set, for their own learning rates: "position" (SSA's slopes and the
        baselines' scales), "token" (SSA's token-term weights u, and its separate projections) and "gate"."""
        groups = {"position": [], "token": [], "gate": []}
        for module in self.modules():
            if isinstance(module, AttentionGate):
                groups["gate"] += list(module.parameters())
            elif isinstance(module, BaselineTemperature) and module.scale is not None:
                groups["position"].append(module.scale)
            elif isinstance(module, SSATemperature):
                if module.position_param is not None:
                    groups["position"].append(module.position_param)
                groups["token"] += [p for name, p in module.named_parameters() if name != "position_param"]
        return groups


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = build_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = build_norm(config)
        self.mlp = GptNeoxMLP(config) if config.mlp_class_name == "GptNeoxMLP" else LLaMAMLP(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x, cos, sin, position_ids, input_pos, mask=None) -> torch.Tensor:
        h = self.attn(self.norm_1(x), cos, sin, position_ids, input_pos, mask)
        if self.parallel_residual:  # GPT-NeoX: x + attn(norm_1(x)) + mlp(norm_2(x))
            return x + h + self.mlp(self.norm_2(x))
        x = x + h
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
        self.qkv = nn.Linear(config.n_embd, (nh + 2 * ng) * hs, bias=config.bias or config.attn_bias)  # [q; k; v]
        if config.norm_qk:  # Qwen3: RMSNorm of each head's q and k
            self.norm_q = nn.RMSNorm(hs, eps=config.norm_eps)
            self.norm_k = nn.RMSNorm(hs, eps=config.norm_eps)
        self.proj = nn.Linear(nh * hs, config.n_embd, bias=config.bias)
        self.query_temperature = build_temperature(config, "query")
        self.key_temperature = build_temperature(config, "key")
        self.value_temperature = build_temperature(config, "value")
        self.gate = AttentionGate(config) if config.attention_gate != "none" else None
        sides = [t for t in (self.query_temperature, self.key_temperature, self.value_temperature) if t is not None]
        # SSA whose token terms read this side's own projection: without gradients, one pass over all sides' heads
        self.scales_together = bool(sides) and all(isinstance(t, SSATemperature) and t.token_proj is None
                                                   for t in sides)
        self.kv_cache: KVCache | None = None
        self.records: list[dict] | None = None  # set by lit_gpt.analysis.recording_attention: explicit path, recorded
        self.config = config

    def forward(self, x, cos, sin, position_ids, input_pos, mask=None) -> torch.Tensor:
        """x: (B, T, C); position_ids: (T,) absolute positions, or (B, T) per row; input_pos: (T,) where the tokens go
        in the KV cache, and what the causal mask compares."""
        B, T, _ = x.shape
        nh, ng, hs = self.config.n_head, self.config.n_query_groups, self.config.head_size
        q, k, v = self.qkv(x).split((nh * hs, ng * hs, ng * hs), dim=-1)
        q, k, v = q.view(B, T, nh, hs), k.view(B, T, ng, hs), v.view(B, T, ng, hs)
        if self.config.norm_qk:  # before the temperatures, which the norm would otherwise undo
            q, k = self.norm_q(q), self.norm_k(k)

        temperatures = (self.query_temperature, self.key_temperature, self.value_temperature)
        taus = [None, None, None]
        dtype = torch.promote_types(x.dtype, torch.float32)  # temperatures in float32 at least, whatever x's dtype
        # a per-(token, head) scalar commutes with RoPE: scale first, rotate after
        if self.scales_together and self.records is None and not torch.is_grad_enabled():  # decoding, evaluation
            q, k, v = scale_together(temperatures, (q, k, v), position_ids, self.kv_cache, dtype)
        elif any(t is not None for t in temperatures):
            log_n = torch.log1p(position_ids.to(dtype))  # log(n), n = absolute position + 1
            if self.records is not None:  # the temperatures themselves, for analysis: (B or 1, heads, T)
                taus = [None if t is None else t.tau(x, f, log_n).expand(-1, T, -1).transpose(1, 2)
                        for t, f in zip(temperatures, (q, k, v))]
            q, k, v = (f if t is None else t(f, x, log_n) for t, f in zip(temperatures, (q, k, v)))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh or ng, T, hs)
        if self.config.rope_n_elem:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.kv_cache is not None:
            k, v = self.kv_cache(input_pos, k, v)  # (B, ng, S, hs), S = keys seen so far
        attn_mask = build_attention_mask(T, k.size(2), input_pos, self.kv_cache is not None, mask,
                                         self.config.sliding_window)
        selective = None
        if self.config.selective_mask != "none":  # every head's logits minus F (B, T, S)
            selective = selective_mask(q, k, allowed_keys(T, k.size(2), input_pos, attn_mask), input_pos, self.kv_cache)
            attn_mask = subtract_from_logits(attn_mask, selective, T, k.size(2), input_pos, q.dtype)
        if self.records is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1, enable_gqa=nh != ng
            )
        else:
            y, probs = explicit_attention(q, k, v, attn_mask)
            self.records.append(dict(attention=probs, selective_mask=selective, **dict(zip(TAU_NAMES, taus))))
        y = y.transpose(1, 2)  # (B, T, nh, hs)
        if self.gate is not None:
            y = self.gate(y, x)
        return self.proj(y.reshape(B, T, nh * hs))


TAU_NAMES = ("query_temperature", "key_temperature", "value_temperature")


def build_attention_mask(T: int, S: int, input_pos, cached: bool, mask, window: int | None = None
                         ) -> torch.Tensor | None:
    """Causal mask (T, S), within the sliding window where there is one, combined with an optional extra mask; None
    where plain causal attention suffices."""
    windowed = window is not None and S > window
    if mask is None and (not cached or T == 1) and not windowed:
        return None  # causal without a cache: `is_causal`; a single new token sees every cached key
    keys = torch.arange(S, device=input_pos.device)
    causal = keys <= input_pos.unsqueeze(-1)  # (T, S)
    if windowed:
        causal = causal & (keys > input_pos.unsqueeze(-1) - window)
    if mask is None:
        return causal
    if mask.shape[-2:] != (T, S):
        raise ValueError(f"The extra attention mask must end in (queries, keys) = {(T, S)}, got {tuple(mask.shape)}.")
    if mask.dtype == torch.bool:
        return causal & mask
    return mask.masked_fill(~causal, float("-inf"))


def allowed_keys(T: int, S: int, input_pos, attn_mask) -> torch.Tensor:
    """Which keys each query may see, boolean (T, S) or (B, T, S)."""
    if attn_mask is None:  # plain causal attention (a single cached token sees every key)
        return torch.arange(S, device=input_pos.device) <= input_pos.unsqueeze(-1)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    return allowed[:, 0] if allowed.dim() == 4 else allowed


def selective_mask(q, k, allowed, input_pos, cache) -> torch.Tensor:
    """F of selective attention (Leviathan, Kalman & Matias 2024), (B, T, S): S = ReLU of head 0's logits, nothing
    masks the first token (a left-padded row's first real one) or itself, and F sums S over the strictly earlier
    queries, so a token's decision affects only later ones. With a KV cache the running per-key sum of the earlier
    chunks is added. Float32 at least."""
    with float32_region(q.device):
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = q[:, 0].to(acc) @ k[:, 0].to(acc).transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, T, S)
        keys = torch.arange(k.size(2), device=q.device)
        first = allowed.int().argmax(dim=-1, keepdim=True)  # each row's first visible key: slot 0 unless padded
        keep = allowed & (keys != first) & (keys != input_pos.unsqueeze(-1))
        s = F.relu(scores).masked_fill(~keep, 0.0)
        f = torch.cat((torch.zeros_like(s[:, :1]), s[:, :-1]), dim=1).cumsum(dim=1)  # earlier queries of this pass
        if cache is not None:
            f = f + cache.add_selective_sums(input_pos, s)
    return f


def subtract_from_logits(attn_mask, selective, T: int, S: int, input_pos, dtype) -> torch.Tensor:
    """The additive mask (B, 1, T, S) that subtracts F where a key is visible and is -inf where it is not."""
    bias = -selective.unsqueeze(1)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        return (attn_mask + bias).to(dtype)
    allowed = allowed_keys(T, S, input_pos, attn_mask)
    allowed = allowed.unsqueeze(1) if allowed.dim() == 3 else allowed
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def explicit_attention(q, k, v, attn_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised attention for analysis; equals the fused path. Returns (output, probabilities)."""
    T, S = q.size(2), k.size(2)
    if k.size(1) != q.size(1):  # grouped-query attention
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask
    probs = scores.softmax(dim=-1)
    return probs @ v, probs


class UninitializedLinear(nn.Linear):
    """nn.Linear that draws no random numbers when built: `GPT.init_weights` initialises it, so adding it never
    shifts the random stream the backbone is initialised from, on any device."""

    def reset_parameters(self) -> None:
        pass


class SSATemperature(nn.Module):
    """SSA's temperature of one side (query, key or value): one scalar per (token, head),

        tau = 1 + slope * log(n) + tanh(u . gelu(f(x)))          (either term may be off)

    slope = exp(p), sigmoid(p) or exp(-exp(p)) (Config.ssa_slope_form), one per head; f is this side's own projection
    (shared weights) or a projection of its own (separate). Computed in float32 at least, whatever the weights' dtype.
    """

    def __init__(self, config: Config, n_heads: int, position: bool, token: bool) -> None:
        super().__init__()
        self.config, self.n_heads = config, n_heads
        hs = config.head_size
        self.position_param = nn.Parameter(torch.empty(n_heads)) if position else None
        self.token_weight = nn.Parameter(torch.empty(n_heads, hs)) if token else None
        self.token_proj = None
        if token and config.ssa_token_weights == "separate":
            self.token_proj = UninitializedLinear(config.n_embd, n_heads * hs, bias=config.bias)

    def reset_parameters(self) -> None:
        """The start of a model that behaves as its vanilla model: slope = ssa_position_init, u = 0 (tanh(0) = 0)."""
        with torch.no_grad():
            if self.position_param is not None:
                start = torch.tensor(self.config.ssa_position_init, dtype=torch.float64, device="cpu")
                self.position_param.fill_(slope_parameter(start, self.config.ssa_slope_form).item())
            if self.token_weight is not None:
                self.token_weight.zero_()
            if self.token_proj is not None:
                nn.init.normal_(self.token_proj.weight, std=0.02)
                if self.token_proj.bias is not None:
                    self.token_proj.bias.zero_()

    def token_features(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """What the token term reads: this side's own projection (shared) or a projection of its own (separate)."""
        if self.token_weight is None:
            return None
        if self.token_proj is not None:
            return self.token_proj(x).view(*x.shape[:2], self.n_heads, -1)
        return features

    def tau(self, x: torch.Tensor, features: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C); features: (B, T, heads, hs) this side's projection before RoPE; log_n: (T,) in float32 or
        float64. Returns tau, (B or 1, T, heads)."""
        with float32_region(x.device):  # float32 under mixed precision too
            token_features = self.token_features(features, x)
            return ssa_temperature(token_features, self.token_weight, self.position_param, per_token(log_n),
                                   self.config.ssa_slope_form)[0]

    def forward(self, target: torch.Tensor, x: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
        """target * tau for target (B, T, heads, hs), the queries, keys or values this temperature belongs to.
        Under mixed precision (autocast) the temperature is still computed in float32; only the product is cast."""
        if not torch.is_grad_enabled():  # decoding, evaluation: the product alone, no autograd bookkeeping
            return (target * self.tau(x, target, log_n).unsqueeze(-1)).to(target.dtype)
        features = self.token_features(target, x)
        with float32_region(target.device):  # the shared form reads target itself: passed once (see the Function)
            return ScaleByTemperature.apply(target, None if features is target else features, self.token_weight,
                                            self.position_param, log_n, self.config.ssa_slope_form)


def scale_together(temperatures, targets, position_ids: torch.Tensor, cache: "KVCache | None", dtype: torch.dtype
                   ) -> list[torch.Tensor]:
    """SSATemperature.forward of every side (query, key, value) at once, without gradients: the sides' heads are
    concatenated, so that tau = 1 + slope log(n) + tanh(u . gelu(f)) costs one pass of a few small operations per
    layer instead of one per side (a decoded token's time goes to such passes). With a KV cache, 1 + slope log(n) is
    tabulated once per generation for every position the cache holds, with the sides' token weights concatenated,
    and kept with the cache; a decoding step then reads its row."""
    if cache is not None and cache.temperature_constants is not None:
        table, weights, heads = cache.temperature_constants
    else:
        slopes, weights, heads = temperature_constants(temperatures, [f.size(2) for f in targets], dtype)
        positions = torch.arange(cache.k.size(2), device=slopes.device) if cache is not None else position_ids
        table = 1 + torch.log1p(positions.to(dtype)).unsqueeze(-1) * slopes  # (positions, heads), or (B, T, heads)
        if cache is not None:
            cache.temperature_constants = table, weights, heads
    if cache is None:
        base = table  # computed at the tokens' own positions
    else:  # the rows of the tokens' positions, (T, heads) or (B, T, heads)
        base = table.index_select(0, position_ids) if position_ids.dim() == 1 else table[position_ids]
    features = torch.cat([f for t, f in zip(temperatures, targets) if t is not None], dim=2)  # (B, T, heads, hs)
    tau = torch.tanh((gelu(features.to(dtype)) * weights).sum(-1)) + base  # tanh(0) = 0 where u is off
    taus = iter(tau.split(heads, dim=-1))
    return [f if t is None else (f * next(taus).unsqueeze(-1)).to(f.dtype) for t, f in zip(temperatures, targets)]


def temperature_constants(temperatures, side_heads: list[int], dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The slopes (heads,) and token weights (heads, hs) of the SSA temperatures present, side after side, in
    `dtype`; a side without a position (token) term contributes zeros, and one slope for all heads (the official
    code's) is repeated. And each present side's number of heads."""
    slopes, weights, heads = [], [], []
    for t, n in zip(temperatures, side_heads):
        if t is None:
            continue
        p, u = t.position_param, t.token_weight
        device = (p if p is not None else u).device
        slopes.append(torch.zeros(n, dtype=dtype, device=device) if p is None else
                      slope_and_derivative(p.to(dtype), t.config.ssa_slope_form)[0].expand(n))
        weights.append(torch.zeros(n, t.config.head_size, dtype=dtype, device=device) if u is None else u.to(dtype))
        heads.append(n)
    return torch.cat(slopes), torch.cat(weights), heads


class BaselineTemperature(nn.Module):
    """The temperatures SSA is compared with, on the queries; log_n (1, T, 1), scale (heads,)."""

    FORMULAS = {
        "logn": lambda log_n, scale, config: (log_n / math.log(config.logn_length)).clamp(min=1.0),  # Qwen's logn
        "ssmax": lambda log_n, scale, config: scale * log_n,  # Scalable-Softmax: s log(n)
        "constant": lambda log_n, scale, config: scale.expand(1, log_n.size(1), -1),  # a learned constant per head
    }

    def __init__(self, config: Config, kind: str, n_heads: int) -> None:
        super().__init__()
        self.config, self.kind = config, kind
        self.scale = nn.Parameter(torch.empty(n_heads)) if kind in ("ssmax", "constant") else None

    def reset_parameters(self) -> None:
        if self.scale is not None:
            with torch.no_grad():
                self.scale.fill_(self.config.ssmax_init if self.kind == "ssmax" else self.config.constant_init)

    def tau(self, x: torch.Tensor, features: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
        scale = None if self.scale is None else self.scale.to(log_n.dtype)
        return self.FORMULAS[self.kind](per_token(log_n), scale, self.config)

    def forward(self, target: torch.Tensor, x: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
        with float32_region(target.device):  # float32 under mixed precision too
            return (target * self.tau(x, target, log_n).unsqueeze(-1)).to(target.dtype)


TEMPERATURES = (SSATemperature, BaselineTemperature)


class AttentionGate(nn.Module):
    """Gated attention (Qiu et al., NeurIPS 2025): the attention output y (B, T, nh, hs) times
    scale * sigmoid(x W_g), x the block's normalised input; one scalar per (token, head) (headwise) or per channel
    (elementwise). W_g starts at zero (no random draws, so the backbone's initialisation is unchanged): the gate
    starts at scale / 2, the identity with scale 2 (what fine-tuning uses)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.per_channel = config.head_size if config.attention_gate == "elementwise" else 1
        self.proj = UninitializedLinear(config.n_embd, config.n_head * self.per_channel, bias=False)
        self.scale = config.attention_gate_scale

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x in the gate's dtype: a float32 gate on a bf16 transformers model (hf_ssa keeps added modules float32)
        gate = torch.sigmoid(self.proj(x.to(self.proj.weight.dtype))).view(*x.shape[:2], -1, self.per_channel)
        return y * (self.scale * gate).to(y.dtype)


ADDED_MODULES = (*TEMPERATURES, AttentionGate)  # what the attention adds to a backbone, initialised after it


def float32_region(device: torch.device):
    """Autocast off (mixed precision computes the temperatures in float32 too); nothing to switch off on other devices
    (the meta device that counts FLOPs)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()


def per_token(log_n: torch.Tensor) -> torch.Tensor:
    """log(n) of (T,) or (B, T) as (1 or B, T, 1), against temperatures of (B, T, heads)."""
    return log_n.view(1, -1, 1) if log_n.dim() == 1 else log_n.unsqueeze(-1)


def build_temperature(config: Config, side: str) -> nn.Module | None:
    """The temperature of one side (query, key or value) of an attention layer, or None where it has none."""
    mode = config.attention_temperature
    heads = config.n_head if side == "query" else config.n_query_groups
    if mode == "ssa":
        position, token = config.ssa_terms(side)
        return SSATemperature(config, heads, position, token) if position or token else None
    if side != "query" or mode == "none":
        return None
    if mode == "ssa_position":  # the official code: one slope per layer, query side only
        return SSATemperature(config, 1, position=True, token=False)
    return BaselineTemperature(config, mode, heads)


def slope_and_derivative(param: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SSA's position slope from its parameter p, and d slope / d p."""
    if form == "log":
        slope = param.exp()
        return slope, slope
    if form == "sigmoid":
        slope = torch.sigmoid(param)
        return slope, slope * (1 - slope)
    rate = param.exp()  # official: exp(-exp(p))
    slope = torch.exp(-rate)
    return slope, -rate * slope


def slope_parameter(slope: torch.Tensor, form: str) -> torch.Tensor:
    """The parameter p that gives `slope` (the inverse of slope_and_derivative)."""
    if form == "log":
        return slope.log()
    if form == "sigmoid":
        return torch.logit(slope)
    return (-slope.log()).log()


def ssa_temperature(features, token_weight, position_param, log_n, form) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SSA's tau = 1 + slope log(n) + tanh(u . gelu(features)) in log_n's dtype (float32 or float64), broadcastable
    to (B, T, h), and its token term (None when off). features: (B, T, h, d) or None; token_weight: (h, d) or None;
    position_param: (h,), (1,) or None; log_n: (T, 1) or (1, T, 1)."""
    if position_param is not None:
        tau = slope_and_derivative(position_param.to(log_n.dtype), form)[0] * log_n + 1  # (T, h) or (1, T, h)
    else:
        tau = torch.ones_like(log_n)
    token_term = None
    if token_weight is not None:
        pre = (gelu(features.to(log_n.dtype)) * token_weight.to(log_n.dtype)).sum(-1)  # u . gelu(f) per head
        token_term = torch.tanh(pre)  # (B, T, h)
        tau = tau + token_term
    return tau, token_term


class ScaleByTemperature(torch.autograd.Function):
    """target * tau, tau = 1 + slope log(n) + tanh(u . gelu(features)) per (token, head), tau in log_n's dtype.

    Written out by hand so that backward keeps only its inputs (views of the qkv projection, which attention keeps
    anyway) and recomputes gelu(features), instead of the feature-sized intermediates autograd would save."""

    @staticmethod
    def forward(ctx, target, features, token_weight, position_param, log_n, form):
        # target, features: (B, T, h, d); token_weight: (h, d); position_param: (h,) or (1,); log_n: (T,) or (B, T).
        # features None with token weights: the token term reads target itself (SSA's shared form), which is passed
        # once, since torch.compile cannot trace a Function given one tensor twice (a graph break per temperature)
        ctx.shared = features is None and token_weight is not None
        features = target if ctx.shared else features
        tau, token_term = ssa_temperature(features, token_weight, position_param, log_n[..., None], form)
        ctx.save_for_backward(target, features, token_weight, position_param, log_n, token_term, tau)
        ctx.form = form
        return (target * tau.unsqueeze(-1)).to(target.dtype)

    @staticmethod
    def backward(ctx, grad):
        target, features, token_weight, position_param, log_n, token_term, tau = ctx.saved_tensors
        acc = log_n.dtype
        grad_target = grad_features = grad_weight = grad_param = None
        if ctx.needs_input_grad[0]:
            grad_target = (grad * tau.unsqueeze(-1)).to(target.dtype)
        d_tau = torch.einsum("bthd,bthd->bth", grad.to(acc), target.to(acc))
        if position_param is not None and ctx.needs_input_grad[3]:
            d_slope = slope_and_derivative(position_param.to(acc), ctx.form)[1]
            grad_param = (d_tau * log_n[..., None]).sum((0, 1)).sum_to_size(position_param.shape) * d_slope
            grad_param = grad_param.to(position_param.dtype)
        if token_weight is not None:
            d_pre = d_tau * (1 - token_term**2)  # through tanh
            features = features.to(acc)
            if ctx.needs_input_grad[2]:
                grad_weight = torch.einsum("bth,bthd->hd", d_pre, gelu(features)).to(token_weight.dtype)
            if ctx.needs_input_grad[1] or ctx.shared and ctx.needs_input_grad[0]:
                grad_features = torch.ops.aten.gelu_backward(d_pre.unsqueeze(-1) * token_weight.to(acc), features)
                grad_features = grad_features.to(target.dtype)
        if ctx.shared:  # target's gradient through both of its uses, as autograd would sum them
            grad_target = None if grad_target is None else grad_target + grad_features
            grad_features = None
        return grad_target, grad_features, grad_weight, grad_param, None, None


class KVCache(nn.Module):
    """Keys (after RoPE and key temperature) and values (after value temperature) of the positions seen so far."""

    def __init__(self, config: Config, batch_size: int, max_seq_length: int, like: torch.Tensor, dtype=None) -> None:
        super().__init__()
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        dtype = dtype or like.dtype
        self.register_buffer("k", torch.zeros(shape, device=like.device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=like.device, dtype=dtype), persistent=False)
        sums = None  # selective attention: per key, the sum of S over the queries seen so far
        if config.selective_mask != "none":
            sums = torch.zeros(batch_size, max_seq_length, device=like.device,
                               dtype=torch.promote_types(dtype, torch.float32))
        self.register_buffer("selective_sums", sums, persistent=False)
        self.queries_summed = 0
        self.temperature_constants = None  # scale_together's table, for this generation (the weights do not change)

    def add_selective_sums(self, input_pos: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The sums of the earlier chunks (B, 1, S), then this chunk's s (B, T, S) added to them. Chunks come in
        order: a chunk at slot 0 starts a new sequence."""
        B, S, start = s.size(0), s.size(-1), int(input_pos[0])
        if start == 0:
            self.selective_sums.zero_()
            self.queries_summed = 0
        if start != self.queries_summed:
            raise ValueError(f"Selective attention's cache holds the sums of slots 0..{self.queries_summed - 1}: decode"
                             f" slot {self.queries_summed} next (got {start}), or start again at slot 0.")
        before = self.selective_sums[:B, :S].clone()
        self.selective_sums[:B, :S] += s.detach().sum(dim=1).to(self.selective_sums.dtype)
        self.queries_summed = int(input_pos[-1]) + 1
        return before.unsqueeze(1).to(s.dtype)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B, end = k.size(0), int(input_pos[-1]) + 1
        if end > self.k.size(2):
            raise ValueError(f"Position {end - 1} is beyond the KV cache's length {self.k.size(2)}.")
        self.k[:B].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[:B].index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:B, :, :end], self.v[:B, :, :end]


class GptNeoxMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(gelu(self.fc(x), approximate=self.approximate))


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


def build_norm(config: Config) -> nn.Module:
    if config.norm_class_name == "RMSNorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def build_rope_cache(seq_len: int, config: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, rope_n_elem) in the rotate-half layout of GPT-NeoX and Llama."""
    n_elem = config.rope_n_elem
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    if config.rope_adjustments is not None:
        inv_freq = llama3_scale_frequencies(inv_freq, **config.rope_adjustments)
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (seq_len, n_elem / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def llama3_scale_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_seq_len):
    """Llama-3.1 RoPE scaling: long wavelengths are divided by `factor`, short ones kept, the middle blended."""
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) channels of x (B, heads, T, hs); the rest pass through (partial rotary)."""
    n_elem = cos.size(-1)
    x_rope, x_pass = x[..., :n_elem], x[..., n_elem:]
    x1, x2 = x_rope.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    roped = (x_rope * cos + rotated * sin).to(x.dtype)
    return roped if x_pass.size(-1) == 0 else torch.cat((roped, x_pass), dim=-1)


