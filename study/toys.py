"""Two toy problems that isolate one term of SSA each (study/reproduce.py runs them).

Dilution: one attention head must read the values of its target keys among n. Trained at n in [8, 64] and tested up
to n = 4,096, it shows whether a temperature that grows with log(n) helps, and when it hurts.

Value selectivity: average the relevant tokens of a sequence and ignore the noisy ones. The value temperature can
switch noisy tokens off; controls with the same number of parameters (a nonlinear score on the keys, unbounded and
bounded like SSA's token term) and an oracle (the true relevance as the value's factor) place it.
"""

import math

import torch
import torch.nn.functional as F

DILUTION_ARMS = ("vanilla", "constant", "ssa", "ssmax")
FIXED_SLOPE = "ssa, slope fixed at "  # + the slope: SSA's 1 + slope log n with the slope not trained


class DilutionHead(torch.nn.Module):
    """Scores q^T W k_j / sqrt(d) times a temperature: 1 (vanilla), a learned constant c, SSA's position term
    1 + exp(p) log(n), Scalable-Softmax's s log(n), or 1 + slope log(n) with a fixed slope (FIXED_SLOPE + "0.5")."""

    def __init__(self, dim: int, arm: str) -> None:
        super().__init__()
        self.arm = arm
        self.weight = torch.nn.Parameter(torch.eye(dim) * 0.5)
        if arm.startswith(FIXED_SLOPE):
            self.register_buffer("temperature", torch.tensor(float(arm[len(FIXED_SLOPE):])))
        else:
            start = {"vanilla": 0.0, "constant": 1.0, "ssa": math.log(1e-2), "ssmax": 1 / math.log(64)}[arm]
            self.temperature = torch.nn.Parameter(torch.tensor(start), requires_grad=arm != "vanilla")

    def tau(self, n: int) -> torch.Tensor:
        log_n = torch.tensor(math.log(n))
        if self.arm.startswith(FIXED_SLOPE):
            return 1 + self.temperature * log_n
        formulas = {"vanilla": lambda: torch.ones(()), "constant": lambda: self.temperature,
                    "ssa": lambda: 1 + self.temperature.exp() * log_n, "ssmax": lambda: self.temperature * log_n}
        return formulas[self.arm]()

    def learned(self) -> float | None:
        """The temperature's learned value as the text states it: c, SSA's slope exp(p), or Scalable-Softmax's s."""
        if self.arm in ("constant", "ssmax"):
            return self.temperature.item()
        return self.temperature.exp().item() if self.arm == "ssa" else None

    def forward(self, q: torch.Tensor, keys: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
        """Log attention probabilities (B, n) of query q (B, d) over keys (B, n, d)."""
        scores = torch.einsum("bd,de,bne->bn", q, self.weight, keys) / math.sqrt(q.size(-1))
        return (scores * (self.tau(keys.size(1)) if tau is None else tau)).log_softmax(-1)


def dilution_batch(size: int, n: int, settings: dict, variant: str, generator: torch.Generator):
    """Queries (B, d), keys (B, n, d), values (B, n, d) and the target output (B, d).

    "cluster": `targets` keys near the query direction (similarity 2 +- 0.5) among distractors of similarity in
    [-1, 1]; the target is the mean of the targets' values, so the head must be sharp enough to shut the distractors
    out and soft enough to average its targets: the best sharpness grows with n. "single": one key of similarity
    `target_similarity` among independent Gaussian keys (similarity ~ N(0, 1)); the target is its value. The
    strongest distractors catch up with it as n grows, so more sharpness eventually hurts."""
    d = settings["dim"]
    unit = F.normalize(torch.randn(size, d, generator=generator), dim=-1)
    q = unit * math.sqrt(d)
    noise = torch.randn(size, n, d, generator=generator)
    values = torch.randn(size, n, d, generator=generator)
    along = (noise * unit[:, None]).sum(-1, keepdim=True)  # each key's component along the query
    if variant == "cluster":
        m = settings["targets"]
        similarity = torch.rand(size, n, 1, generator=generator) * 2 - 1  # distractors: [-1, 1]
        similarity[:, :m] = 2.0 + settings["target_noise"] * torch.randn(size, m, 1, generator=generator)
        keys = noise - along * unit[:, None] + similarity * unit[:, None]
        target = values[:, :m].mean(1)
    else:
        keys = noise.clone()
        keys[:, :1] = noise[:, :1] - along[:, :1] * unit[:, None] + settings["target_similarity"] * unit[:, None]
        target = values[:, 0]
    return q, keys, values, target


def dilution_error(log_probs: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of the attention output against the target, over the target's squared norm (per batch)."""
    output = torch.einsum("bn,bnd->bd", log_probs.exp(), values)
    return ((output - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean()


def train_dilution(arm: str, variant: str, settings: dict, seed: int) -> DilutionHead:
    """Adam with W at `learning_rate` and the temperature at its own `temperature_lr`, cosine decay to zero."""
    torch.manual_seed(seed)
    head = DilutionHead(settings["dim"], arm)
    groups = [dict(params=[head.weight], lr=settings["learning_rate"])]
    if isinstance(head.temperature, torch.nn.Parameter) and head.temperature.requires_grad:
        groups.append(dict(params=[head.temperature], lr=settings["temperature_lr"]))
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings["steps"])
    generator = torch.Generator().manual_seed(seed)
    low, high = settings["train_n"]
    for _ in range(settings["steps"]):
        n = int(torch.randint(low, high + 1, (), generator=generator))
        q, keys, values, target = dilution_batch(settings["batch"], n, settings, variant, generator)
        loss = dilution_error(head(q, keys), values, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return head


@torch.no_grad()
def dilution_errors(head: DilutionHead, variant: str, settings: dict, seed: int, tau=None) -> dict[int, float]:
    """Normalised error per test n; `tau(n)` overrides the head's temperature."""
    errors = {}
    for n in settings["test_n"]:
        generator = torch.Generator().manual_seed(100_000 + seed * 97 + n)
        q, keys, values, target = dilution_batch(settings["test_batch"], n, settings, variant, generator)
        log_probs = head(q, keys, None if tau is None else torch.tensor(tau(n)))
        errors[n] = dilution_error(log_probs, values, target).item()
    return errors


def oracle_errors(head: DilutionHead, variant: str, settings: dict, seed: int) -> dict[int, float]:
    """The best fixed sharpness per n for a vanilla head: the lowest error over a grid of temperatures."""
    grid = [2**k for k in torch.arange(-2, 4.01, 0.25).tolist()]
    per_tau = [dilution_errors(head, variant, settings, seed, tau=lambda n, t=t: t) for t in grid]
    return {n: min(errors[n] for errors in per_tau) for n in settings["test_n"]}


VALUE_KINDS = ("vanilla attention", "value temperature", "key gate, unbounded", "key gate, bounded",
               "oracle value temperature")


class ValueToyAttention(torch.nn.Module):
    """One attention head reading a sequence with a learned query. "value temperature": tau_j = 1 + tanh(u .
    gelu(v_j)) scales each value token (SSA's value temperature, token term). The controls, with the same number of
    parameters: "key gate, unbounded" adds u . gelu(x_j) to the logits, "key gate, bounded" adds tanh(u . gelu(x_j)),
    bounded like SSA's token term. "oracle value temperature" multiplies each value by 1 (relevant) or 0 (noise)."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.query = torch.nn.Parameter(torch.randn(dim) * 0.1)
        self.key, self.value = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.u = torch.nn.Parameter(torch.zeros(dim)) if kind != "vanilla attention" else None

    def forward(self, x: torch.Tensor, relevant: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.key(x) @ self.query / math.sqrt(x.size(-1))  # (B, T)
        if self.kind == "key gate, unbounded":
            scores = scores + F.gelu(x) @ self.u
        elif self.kind == "key gate, bounded":
            scores = scores + torch.tanh(F.gelu(x) @ self.u)
        v = self.value(x)
        if self.kind == "value temperature":
            v = v * (1 + torch.tanh(F.gelu(v) @ self.u)).unsqueeze(-1)
        elif self.kind == "oracle value temperature":
            v = v * relevant.unsqueeze(-1).to(v.dtype)
        return (scores.softmax(-1).unsqueeze(-1) * v).sum(1)


def value_batch(n: int, settings: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relevant tokens are one signal plus small noise; the others are pure noise of a larger scale. Returns the
    sequences, the target (the mean of the relevant tokens) and which tokens are relevant."""
    T, d = settings["tokens"], settings["dim"]
    signal = torch.randn(n, 1, d, generator=generator)
    relevant = torch.rand(n, T, generator=generator) >= settings["noise_share"]
    relevant[:, 0] = True
    clean = signal + 0.1 * torch.randn(n, T, d, generator=generator)
    noise = settings["noise_scale"] * torch.randn(n, T, d, generator=generator)
    x = torch.where(relevant.unsqueeze(-1), clean, noise)
    target = (x * relevant.unsqueeze(-1)).sum(1) / relevant.sum(1, keepdim=True)
    return x, target, relevant


def value_errors(settings: dict, seed: int) -> dict[str, float]:
    """Test error / target variance of the naive average and of each attention variant, for one seed."""
    test_x, test_y, test_relevant = value_batch(settings["test_sequences"], settings,
                                                torch.Generator().manual_seed(10_000 + seed))
    scale = test_y.var().item()
    errors = {"naive average": F.mse_loss(test_x.mean(1), test_y).item() / scale}
    for kind in VALUE_KINDS:
        torch.manual_seed(seed)
        model = ValueToyAttention(settings["dim"], kind)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(settings["steps"]):
            x, y, relevant = value_batch(256, settings, generator)
            loss = F.mse_loss(model(x, relevant), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            errors[kind] = F.mse_loss(model(test_x, test_relevant), test_y).item() / scale
    return errors
