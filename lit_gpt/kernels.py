"""Kernels the model uses that are not part of its architecture: the chunked output layer + cross-entropy of
training, and the oneDNN linear layer of CPU inference. Neither changes what the model computes."""

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets`, computed a chunk of rows at a time.

    The (tokens x vocabulary) logits are never materialised: each chunk's softmax gradient is turned into the
    gradients of hidden, weight and bias during the forward pass (the matrix products a plain linear + cross-entropy
    would do in its backward), so memory traffic drops from a few passes over N x V floats to one over a chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int = -100, wants_grad: bool = True):
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        # under no_grad / inference_mode (validation) needs_input_grad still says True for weights that require grad
        needs_grad = wants_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        device = hidden.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):  # bf16-mixed: the products in bf16
            with torch.autocast(device, enabled=False):
                total, grad_hidden, grad_weight, grad_bias = chunked_loss(
                    hidden, weight, bias, targets, valid, count, needs_grad, torch.get_autocast_dtype(device))
        else:
            total, grad_hidden, grad_weight, grad_bias = chunked_loss(hidden, weight, bias, targets, valid, count,
                                                                      needs_grad, weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output
        return (
            grad_hidden * scale.to(grad_hidden.dtype),
            (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None,
            None,
            None,
        )


def loss_gradient_(probs: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, count) -> torch.Tensor:
    """The mean cross-entropy's gradient with respect to a chunk's logits, made in place from its softmax `probs`:
    probs - one_hot(targets), each row times keep / count (zero for positions without loss)."""
    probs[torch.arange(probs.size(0)), targets] -= 1.0
    probs *= (keep.to(probs.dtype) / count)[:, None]
    return probs


# Logits whose softmax is taken at a time (float32 elements). On the CPU 4 MB, which stays in the caches while the
# softmax and its gradient pass over it several times; on a GPU 256 MB, so that a GPT-2 micro-batch of 12 x 1,024
# tokens takes 10 chunks rather than hundreds (each chunk is some 20 kernel launches, which a GPU pays for and a
# CPU hardly does).
LOSS_CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}
# Logits one matrix product computes (bytes, in the products' dtype): the three products with the output layer's
# weight (logits, input gradient, weight gradient) each pass over the whole (vocabulary x width) weight, so they are
# made once per LOSS_BUFFER_BYTES of logits, not once per softmax chunk. On two Intel Xeon cores this took a training
# step of pythia-70m (4 x 512 tokens) to 0.836x its time (benchmarks/results/loss_chunks_intel.md), for 256 MB more.
LOSS_BUFFER_BYTES = 2**28


def loss_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """How many tokens' softmax the fused loss computes at a time on `device`."""
    return max(1, LOSS_CHUNK_ELEMENTS.get(device.type, LOSS_CHUNK_ELEMENTS["cpu"]) // vocab_size)


def loss_buffer_rows(vocab_size: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many tokens' logits the fused loss computes with one matrix product: a whole number of softmax chunks."""
    chunk = loss_chunk_rows(vocab_size, device)
    return max(1, LOSS_BUFFER_BYTES // (vocab_size * dtype.itemsize * chunk)) * chunk


def chunked_loss(hidden, weight, bias, targets, valid, count, needs_grad: bool, dtype: torch.dtype):
    """LinearCrossEntropy's forward: the summed loss and, where wanted, the gradients of hidden, weight and bias.

    The three matrix products run in `dtype` (the weight's, or bf16 under bf16-mixed autocast, the weight cast once)
    on a buffer of `loss_buffer_rows` tokens' logits; softmax, log-sum-exp and every sum are float32 at least, a
    cache-sized chunk of rows at a time (`softmax_chunks_`). The weight gradient adds one product per buffer in
    float32."""
    V, N = weight.size(0), hidden.size(0)
    rows = max(1, min(N, loss_buffer_rows(V, hidden.device, dtype)))  # at least 1: no tokens is a loss of 0
    acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax and sums in float32 at least
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    grad_hidden = torch.empty_like(hidden) if needs_grad else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if needs_grad else None
    grad_bias = torch.zeros_like(bias, dtype=acc) if needs_grad and bias is not None else None
    total = hidden.new_zeros((), dtype=acc)
    for first in range(0, N, rows):
        last = min(N, first + rows)
        h = hidden[first:last].to(dtype)
        logits = F.linear(h, w, b)  # (rows, V) in dtype
        total += softmax_chunks_(logits, targets[first:last], valid[first:last], count, needs_grad, acc, grad_bias)
        if needs_grad:  # logits now holds their gradient
            grad_hidden[first:last] = (logits @ w).to(hidden.dtype)
            if dtype == acc:
                grad_weight.addmm_(logits.t(), h)
            else:  # the product in dtype with float32 accumulation inside, added in float32
                grad_weight += logits.t() @ h
        del logits  # before the next buffer's logits exist: one buffer at a time
    return total, grad_hidden, grad_weight, grad_bias


def softmax_chunks_(logits, targets, valid, count, needs_grad: bool, acc: torch.dtype, grad_bias) -> torch.Tensor:
    """The summed cross-entropy of a buffer of logits, a `loss_chunk_rows` chunk at a time in `acc`; where gradients
    are wanted, each chunk's softmax gradient replaces its logits (in their dtype, as a plain autocast backward keeps
    it) and its column sums are added to `grad_bias`."""
    chunk = loss_chunk_rows(logits.size(1), logits.device)
    total = logits.new_zeros((), dtype=acc)
    for start in range(0, logits.size(0), chunk):
        part = logits[start : start + chunk]
        t, keep = targets[start : start + chunk], valid[start : start + chunk]
        x = part.to(acc)  # the buffer itself where its dtype is acc
        safe_t = t.masked_fill(~keep, 0)
        target_logit = x.gather(1, safe_t[:, None]).squeeze(1)
        peak = x.amax(dim=-1, keepdim=True)
        exp = x.sub_(peak).exp_()  # in place: one exp per logit serves the loss and the gradient
        norm = exp.sum(dim=-1, keepdim=True)
        total += ((peak.squeeze(1) + norm.log().squeeze(1) - target_logit) * keep).sum()
        if not needs_grad:
            continue
        grad = loss_gradient_(exp.div_(norm), safe_t, keep, count)
        if grad_bias is not None:
            grad_bias += grad.sum(0)
        if x is not part:  # a float32 copy of a bf16 buffer's chunk
            part.copy_(grad)
    return total


ONEDNN_GELU_FROM = 1 << 15  # elements: below this PyTorch's own GELU is the faster one on the CPUs measured


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu, kept off oneDNN for small tensors (decoding's, SSA's token term). PyTorch hands the CPU's GELU to
    oneDNN, which on two AMD EPYC cores (torch 2.13, benchmarks/results/gelu.md) takes 8.9 us on 576 values where
    PyTorch's own takes 1.5 us, 12.4 against 9.9 on 8,192, and wins from about 65,536 (34 against 39): training's
    activations keep oneDNN. On a loaded machine a oneDNN call on a small tensor took up to 12 ms (its second thread
    waiting for a core). Greedy decoding of pythia-70m runs 1.20x as fast with this."""
    if x.device.type != "cpu" or x.numel() >= ONEDNN_GELU_FROM or torch.compiler.is_compiling():
        return F.gelu(x, approximate=approximate)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.gelu(x, approximate=approximate)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


class OneDNNLinear(nn.Linear):
    """nn.Linear whose product runs in oneDNN when no gradient is wanted, on the CPU, in float32 (see
    `use_onednn_linear`); otherwise (and inside torch.compile, which lowers it its own way) exactly nn.Linear."""

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "OneDNNLinear":
        """A OneDNNLinear holding `linear`'s own parameters (no copy: a tied weight stays tied)."""
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not torch.compiler.is_compiling()):  # inductor: its own
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


LINEAR_PATH_VARIABLE = "LIT_GPT_LINEAR"  # onednn or torch: skip the probe and take that path
_probed: dict[tuple, str] = {}  # (weight shape, threads) -> the faster path, once per process


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def faster_linear_path(weight: torch.Tensor, rounds: int = 5, repeats: int = 3, timer=None) -> str:
    """"onednn" or "torch": whichever multiplies a token's vector by `weight` faster on this machine, the fastest of
    `rounds` interleaved timings of each (a busy machine only slows a timing down). Neither path wins everywhere:
    on a 2-core AMD EPYC oneDNN decoded pythia-70m 1.77x as fast as PyTorch's own product; on a 2-core Intel Xeon
    with AMX, PyTorch's own was faster (1.03x LitGPT's speed against oneDNN's 0.94x; benchmarks/results/generation.md).
    A few hundred milliseconds for a 50k-row output layer; the answer is kept for the process. `timer(path)` replaces
    the measurement (tests)."""
    forced = os.environ.get(LINEAR_PATH_VARIABLE)
    if forced is not None:
        if forced not in ("onednn", "torch"):
            raise ValueError(f"{LINEAR_PATH_VARIABLE}={forced!r}: expected onednn or torch (or leave it unset to"
                             " measure which is faster here).")
        return forced
    key = (tuple(weight.shape), torch.get_num_threads())
    if timer is None and key in _probed:
        return _probed[key]
    x = torch.randn(1, weight.size(1))
    run = {"onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
           "torch": lambda: F.linear(x, weight)}

    def measure(path: str) -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            run[path]()
        return time.perf_counter() - started

    timer = timer or measure
    best = dict.fromkeys(run, float("inf"))
    for path in run:
        timer(path)  # the first call of each sets up its kernels
    for _ in range(rounds):
        for path in run:
            best[path] = min(best[path], timer(path))
    chosen = min(best, key=best.get)
    _probed[key] = chosen
    return chosen


def use_onednn_linear(model: nn.Module) -> nn.Module:
    """Run the linear layers' inference-time products (no gradient, CPU, float32) in oneDNN where that is the faster
    path on this machine (`faster_linear_path`, measured on the model's largest weight): each nn.Linear is then
    replaced by a `OneDNNLinear` sharing its parameters, so names, state_dict and results (to float32 rounding)
    stay. Decoding is a chain of matrix-vector products bound by how fast the weights stream from memory: on two AMD
    EPYC cores PyTorch's own product reads a (50304 x 512) weight at about 16 GB/s and oneDNN's at about 48, so
    pythia-70m decodes about twice as fast, while on an Intel Xeon with AMX PyTorch's own path is the faster one.
    Training (gradients on) takes PyTorch's path as before. Does nothing where PyTorch was built without oneDNN or
    where the model is not float32 on the CPU."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if not onednn_available() or not linears:
        return model
    largest = max(linears, key=lambda m: m.weight.numel()).weight
    if largest.device.type != "cpu" or largest.dtype != torch.float32:
        return model
    if faster_linear_path(largest.detach()) != "onednn":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear.sharing(child))
    return model
