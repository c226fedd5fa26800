"""
The optimizers and their schedules: which parameters get weight decay and which optimizer, Muon
(with the AdamW it runs for the embedding and norms), torch's AdamW, the LR schedules (cosine,
warmup-stable-decay), Muon's momentum warmup, and `set_lrs`, which applies them to the groups
every step. Changing the schedule or the optimizer touches this file alone.

    from optim import build_optimizer, build_schedule, set_lrs
    opt, sched = build_optimizer(model, args, device), build_schedule(args)
    for step in range(args.max_steps):
        set_lrs(opt, sched, step, args)
        ...; opt.step()
"""
from __future__ import annotations

import math

import torch

from model import unwrap

# -----------------------------------------------------------------------------------------------
# the parameter groups


def weight_decay_split(model) -> tuple[list[str], list[str]]:
    """(decay, no_decay) parameter names: decay only 2-D matmul weights, never the embedding,
    norms or any 1-D parameter."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("tok_emb.weight") else no_decay).append(name)
    return decay, no_decay


def param_groups(model, weight_decay: float) -> list[dict]:
    params = dict(unwrap(model).named_parameters())
    decay, no_decay = weight_decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def configure_optimizers(model, weight_decay=0.1, lr=5e-4, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
    """torch's AdamW over param_groups (the fused CUDA kernel does the whole update in one launch)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=device_type == "cuda")


def muon_split(model) -> tuple[list[str], list[str], list[str]]:
    """(muon, embed, norm) parameter names: Muon takes the matrices that get weight decay (the
    q/k/v/o and gate/up/down weights of every block); AdamW the tied embedding/head and every 1-D
    weight (RMSNorm)."""
    decay, no_decay = weight_decay_split(model)
    embed = [n for n in no_decay if n.endswith("tok_emb.weight")]
    return decay, embed, [n for n in no_decay if n not in embed]


def build_optimizer(model, args, device, rank: int = 0, world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW (torch's, fused on CUDA) for --optimizer adamw; else Muon for the hidden matrices and
    AdamW for the embedding and norms (muon_split), each group tagged with its role for set_lrs."""
    if args.optimizer == "adamw":
        return configure_optimizers(model, weight_decay=args.weight_decay, lr=args.lr,
                                    betas=(args.beta1, args.beta2), device_type=torch.device(device).type)
    params = dict(unwrap(model).named_parameters())
    muon, embed, norm = muon_split(model)
    groups = [{"params": [params[n] for n in muon], "use_muon": True, "role": "matrix",
               "weight_decay": args.weight_decay},
              {"params": [params[n] for n in embed], "role": "embed"},
              {"params": [params[n] for n in norm], "role": "norm"}]
    return Muon([g for g in groups if g["params"]], lr=args.lr, betas=(args.beta1, args.beta2),
                momentum=args.muon_momentum, rank=rank, world_size=world_size,
                compile=bool(getattr(args, "compile_optimizer", False)))


# -----------------------------------------------------------------------------------------------
# the schedules


class CosineSchedule:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at `max_steps`. A pure
    function of the step: the run's step counter is the only state, and it is the run's."""

    def __init__(self, lr: float, warmup: int, max_steps: int, min_lr_ratio: float = 0.1):
        self.lr, self.warmup, self.max_steps, self.min_lr_ratio = float(lr), int(warmup), int(max_steps), float(min_lr_ratio)

    def lr_at(self, step: int) -> float:
        min_lr = self.lr * self.min_lr_ratio
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        if step >= self.max_steps:
            return min_lr
        ratio = (step - self.warmup) / max(1, self.max_steps - self.warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - min_lr)

    def state_dict(self) -> dict:
        """The shape, recorded in checkpoints (plain numbers: torch.load(weights_only=True) safe)."""
        return {"lr": self.lr, "warmup": self.warmup, "max_steps": self.max_steps, "min_lr_ratio": self.min_lr_ratio}


class WSDSchedule(CosineSchedule):
    """Warmup-stable-decay: linear warmup to `lr`, constant, then a linear decay to `min_lr_ratio * lr`
    over the last `decay_frac` of `max_steps`. Up to `decay_start` the LR does not depend on
    max_steps, so a run resumed from its fishai-stable.pt with a larger --max-steps is exactly a
    longer WSD run (quick_train's "more steps" rounds continue this way)."""

    def __init__(self, lr: float, warmup: int, max_steps: int, min_lr_ratio: float = 0.1, decay_frac: float = 0.2):
        super().__init__(lr, warmup, max_steps, min_lr_ratio)
        self.decay_frac = float(decay_frac)

    @property
    def decay_start(self) -> int:
        """The first step of the decay (the LR of this step is still the peak)."""
        return max(self.warmup, self.max_steps - round(self.decay_frac * self.max_steps))

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        if step >= self.max_steps:
            return self.lr * self.min_lr_ratio
        done = (step - self.decay_start) / max(1, self.max_steps - self.decay_start)
        return self.lr * (1.0 - max(0.0, done) * (1.0 - self.min_lr_ratio))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kind": "wsd", "decay_frac": self.decay_frac}


def build_schedule(args) -> CosineSchedule:
    if args.schedule == "wsd":
        return WSDSchedule(args.lr, args.warmup, args.max_steps, args.min_lr_ratio, args.decay_frac)
    return CosineSchedule(args.lr, args.warmup, args.max_steps, args.min_lr_ratio)


def group_lrs(args) -> dict:
    """Peak LR per optimizer-group role (AdamW's own groups have no role: --lr)."""
    return {"matrix": args.lr, "embed": args.embed_lr, "norm": args.norm_lr, None: args.lr}


def set_lrs(optimizer, schedule: CosineSchedule, step: int, args) -> None:
    """Every group's LR for `step`: the schedule's shape, from the group's own peak (group_lrs)."""
    scale, peaks = schedule.lr_at(step) / schedule.lr, group_lrs(args)
    for g in optimizer.param_groups:
        g["lr"] = peaks[g.get("role")] * scale


# Muon's momentum warms up from 0.85 to --muon-momentum over its first 300 updates (Keller Jordan's
# modded-nanogpt recipe: a low momentum while the gradients still change direction fast)
MUON_MOMENTUM_START, MUON_MOMENTUM_WARMUP = 0.85, 300


def muon_momentum_at(update: int, target: float) -> float:
    """Muon's momentum at its `update`-th update (1-based, the optimizer's own count)."""
    warm = min(1.0, update / MUON_MOMENTUM_WARMUP)
    return MUON_MOMENTUM_START + warm * (target - MUON_MOMENTUM_START)


# -----------------------------------------------------------------------------------------------
# Muon

# Quintic Newton-Schulz coefficients from Keller Jordan's Muon write-up: in 5 steps they push every
# singular value above ~1/500 of the Frobenius norm into roughly [0.7, 1.2], orthogonal enough for an
# update direction (exact convergence to 1 would need more steps for no gain in training).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors, U V^T of g = U S V^T, by the
    quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X. g may be a stack (..., rows, cols) of
    same-shape matrices: each is orthogonalised on its own, in one batched matmul per term (Muon
    stacks the matrices of a shape, so a step is a few bmm launches instead of hundreds of small
    mm ones). bf16 on CUDA (the iteration tolerates it and runs on tensor cores), fp32 elsewhere."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (momentum + Newton-Schulz orthogonalisation) for groups with use_muon=True, AdamW for
    the others, in one optimizer: one state_dict for the exact resume, one GradScaler.unscale_.

    Muon update of a (rows x cols) matrix: m <- lerp(m, g, 1 - mu); Nesterov u = lerp(g, m, mu);
    p <- p (1 - lr wd) - lr * 0.2 sqrt(max(rows, cols)) * NS(u). The factor makes the update's RMS
    0.2, what AdamW's update has in practice (Moonlight, "Muon is scalable for LLM training"), so the
    two share LR scales and weight decay.

    Why not torch.optim.Muon (torch >= 2.9): it orthogonalises one matrix at a time. Here the
    matrices of one shape (a transposed one counts as the same: NS runs on the wide side) are
    stacked and orthogonalised in one batched call, and the element-wise parts are foreach ops, so
    a step of `small` is ~100 kernel launches instead of ~1,000 (on a GPU the per-matrix loop is
    launch-bound: docs/RESULTS.md). It also shares the NS work out under DDP: every rank keeps the
    (cheap, element-wise) momentum of every matrix, each matrix's NS runs on one rank only
    (i % world_size), which broadcasts the new weights; the state stays replicated (rank 0's
    state_dict is complete, so the exact resume works)."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                 ns_steps: int = 5, rank: int = 0, world_size: int = 1, compile: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps, weight_decay=0.0,
                        use_muon=False)
        super().__init__(groups, defaults)
        self.rank, self.world_size = rank, world_size
        # compile=True: the update math (muon_update, adamw_update) compiled once each, fullgraph with
        # fixed shapes; the LR, momentum and step count go in as 0-D tensors, so neither a new step
        # nor a new LR recompiles (modded-nanogpt's recipe). The bookkeeping around it stays Python.
        wrap = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if compile else (lambda fn: fn)
        self._muon_update, self._adamw_update = wrap(muon_update), wrap(adamw_update)
        self._scalars: dict = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending, index = [], 0
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw(group)
                continue
            owned = []
            for p in group["params"]:
                if p.grad is not None:
                    owner = index % self.world_size
                    owned.append((p, owner == self.rank))
                    if self.world_size > 1:
                        pending.append((p, owner))
                index += 1
            self._muon(owned, group)
        works = [torch.distributed.broadcast(p, src=owner, async_op=True) for p, owner in pending]
        for work in works:
            work.wait()
        return loss

    def _muon(self, owned: list[tuple[torch.Tensor, bool]], group: dict) -> None:
        """One Muon step of a group's matrices: owned = [(param, NS runs on this rank)]."""
        if not owned:
            return
        params = [p for p, _ in owned]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"], state["momentum_buffer"] = 0, torch.zeros_like(p)
            state["step"] += 1
        mu = muon_momentum_at(self.state[params[0]]["step"], group["momentum"])
        mine = [i for i, (_, m) in enumerate(owned) if m]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        by_shape: dict[tuple, list[int]] = {}
        for i in mine:  # a matrix and its transpose share a stack (NS runs on the wide side)
            rows, cols = params[i].shape
            by_shape.setdefault((min(rows, cols), max(rows, cols)), []).append(i)
        # every rank keeps every matrix's momentum; NS and the update run for the matrices it owns
        others = [i for i in range(len(params)) if i not in set(mine)]
        if others:
            torch._foreach_lerp_([bufs[i] for i in others], [params[i].grad for i in others], 1 - mu)
        for ks in by_shape.values():
            self._muon_update([params[i] for i in ks], [params[i].grad for i in ks], [bufs[i] for i in ks],
                              self._scalar("mu", mu, params[0]), self._scalar("lr", group["lr"], params[0]),
                              group["weight_decay"], group["ns_steps"])

    def _scalar(self, name: str, value: float, like: torch.Tensor) -> torch.Tensor:
        """value as a 0-D tensor on like's device, one buffer per name refilled in place: a compiled
        update sees the same input every step, whatever the value (no recompile, no new allocation)."""
        t = self._scalars.get((name, like.device))
        if t is None:
            t = self._scalars[(name, like.device)] = torch.zeros((), dtype=torch.float32, device=like.device)
        t.fill_(value)
        return t

    def _adamw(self, group: dict) -> None:
        """AdamW of a group (the embedding, the norms) with foreach ops: a few launches per step."""
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
        t = self.state[params[0]]["step"]
        self._adamw_update(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                           [self.state[p]["exp_avg_sq"] for p in params], self._scalar("lr", group["lr"], params[0]),
                           self._scalar("t", t, params[0]), beta1, beta2, group["eps"], group["weight_decay"])


def muon_update(params: list, grads: list, bufs: list, mu: torch.Tensor, lr: torch.Tensor, weight_decay: float,
                ns_steps: int) -> None:
    """Muon's step for same-shape matrices (a transposed one counts as the same): m <- lerp(m, g, 1 -
    mu); Nesterov u = lerp(g, m, mu); p <- p (1 - lr wd) - lr * 0.2 sqrt(long side) * NS(u). On a GPU
    one batched NS call for the stack (a few launches instead of one set per matrix); on a CPU a
    loop (its mm is 15-20% faster than bmm here, measured). mu and lr are 0-D tensors."""
    torch._foreach_lerp_(bufs, grads, 1 - mu)
    nesterov = [g.lerp(b, mu) for g, b in zip(grads, bufs)]
    wide = [u if u.size(0) <= u.size(1) else u.mT for u in nesterov]
    if wide[0].is_cuda:
        ortho = list(newton_schulz(torch.stack(wide), ns_steps).unbind(0))
    else:
        ortho = [newton_schulz(w, ns_steps) for w in wide]
    updates = [o if u.size(0) <= u.size(1) else o.mT for u, o in zip(nesterov, ortho)]
    scale = lr * (0.2 * max(params[0].shape) ** 0.5)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_mul(updates, -scale))


def adamw_update(params: list, grads: list, exp_avg: list, exp_avg_sq: list, lr: torch.Tensor, t: torch.Tensor,
                 beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """AdamW's step with foreach ops (a few launches per step); lr and the step count t are 0-D tensors."""
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, torch.sqrt(1 - beta2 ** t))
    torch._foreach_add_(denom, eps)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_div(torch._foreach_mul(exp_avg, -lr / (1 - beta1 ** t)), denom))
