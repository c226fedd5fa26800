"""optim.py: the parameter groups, Muon, the LR schedules and Muon's momentum warmup."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optim
import train

ROOT = Path(__file__).resolve().parents[1]
ENV1 = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_lr_schedule_warmup_cosine_floor():
    s = optim.CosineSchedule(1e-3, warmup=10, max_steps=110, min_lr_ratio=0.1)
    warm = [s.lr_at(i) for i in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert s.lr_at(9) < 1e-3
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the cosine
    assert s.lr_at(110) == pytest.approx(1e-4)
    assert s.lr_at(500) == pytest.approx(1e-4)
    decay = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_newton_schulz_gives_singular_values_near_one():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 96), (96, 32)]:
        # a badly conditioned input: singular values spread over two orders of magnitude (5 steps
        # lift values down to ~1/500 of the Frobenius norm; a gradient's spectrum is within that)
        u, _, v = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
        s_in = torch.logspace(0, -2, min(shape))
        out = optim.newton_schulz(u @ torch.diag(s_in) @ v)
        s = torch.linalg.svdvals(out)
        assert out.shape == shape and out.dtype == torch.float32
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())
        assert abs(s.mean() - 1) < 0.15
        # the same singular vectors: close to U V^T, the exact orthogonal factor
        cos = torch.nn.functional.cosine_similarity((u @ v).flatten(), out.flatten(), dim=0)
        assert cos > 0.95


def test_muon_parameter_groups_by_name(tiny_model):
    muon, embed, norm = optim.muon_split(tiny_model)
    assert embed == ["tok_emb.weight"]
    assert all(n.endswith("norm.weight") for n in norm) and len(norm) == 2 * tiny_model.config.n_layers + 1
    kinds = {n.split(".")[-2] for n in muon}
    assert kinds == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    assert len(muon) == 7 * tiny_model.config.n_layers
    args = train.make_args(optimizer="muon", lr=1e-3, embed_lr=2e-3, norm_lr=3e-3, weight_decay=0.1)
    opt = optim.build_optimizer(tiny_model, args, torch.device("cpu"))
    roles = {g["role"]: g for g in opt.param_groups}
    assert roles["matrix"]["use_muon"] and roles["matrix"]["weight_decay"] == 0.1
    assert not roles["embed"]["use_muon"] and roles["embed"]["weight_decay"] == 0.0
    assert roles["norm"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tiny_model.parameters()))
    assert optim.group_lrs(args) == {"matrix": 1e-3, "embed": 2e-3, "norm": 3e-3, None: 1e-3}
    adamw = optim.build_optimizer(tiny_model, train.make_args(optimizer="adamw", lr=1e-3), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW)


def test_muon_update_rms_matches_adamw_scale():
    p = torch.nn.Parameter(torch.zeros(64, 256))
    opt = optim.Muon([{"params": [p], "use_muon": True}], lr=1.0)
    p.grad = torch.randn(64, 256)
    opt.step()
    # 0.2 * sqrt(max(rows, cols)) * an orthogonal 64x256 matrix: RMS 0.2 (AdamW's typical update)
    assert p.detach().pow(2).mean().sqrt().item() == pytest.approx(0.2, rel=0.2)


def test_wsd_lr_at_the_boundaries():
    s = optim.WSDSchedule(1e-3, warmup=10, max_steps=100, min_lr_ratio=0.1, decay_frac=0.2)
    assert s.decay_start == 80
    assert s.lr_at(0) == pytest.approx(1e-3 / 11) and s.lr_at(9) == pytest.approx(1e-3 * 10 / 11)
    assert s.lr_at(10) == s.lr_at(50) == s.lr_at(79) == s.lr_at(80) == 1e-3  # stable, decay starts after 80
    assert s.lr_at(90) == pytest.approx(1e-3 * (1 - 0.5 * 0.9))
    assert s.lr_at(100) == s.lr_at(500) == pytest.approx(1e-4)
    assert s.lr_at(99) > s.lr_at(100)
    # extending the run moves only the decay: the stable phase is the same
    longer = optim.WSDSchedule(1e-3, warmup=10, max_steps=200, min_lr_ratio=0.1, decay_frac=0.2)
    assert [longer.lr_at(i) for i in range(81)] == [s.lr_at(i) for i in range(81)]
    assert longer.decay_start == 160 and s.state_dict()["kind"] == "wsd"


MUON_WORKER = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import optim
rank, world, init, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(*s)) for s in [(8, 4), (6, 6), (4, 10), (5, 7), (3, 3)]]
emb = torch.nn.Parameter(torch.randn(10, 4))
opt = optim.Muon([{"params": ps, "use_muon": True, "weight_decay": 0.1}, {"params": [emb]}], lr=0.02,
                 rank=rank, world_size=world)
for step in range(3):
    g = torch.Generator().manual_seed(step)  # the all-reduced gradient: the same on every rank
    for p in ps + [emb]:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
torch.save([p.detach() for p in ps + [emb]], out)
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
"""


def test_muon_shares_newton_schulz_across_two_gloo_ranks(tmp_path):
    def launch(rank, world):
        return subprocess.Popen([sys.executable, "-c", MUON_WORKER, str(ROOT), str(rank), str(world),
                                 str(tmp_path / "init"), str(tmp_path / f"w{world}r{rank}.pt")],
                                env=ENV1, stderr=subprocess.PIPE, text=True)
    procs = [launch(r, 2) for r in (0, 1)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    assert launch(0, 1).wait(timeout=120) == 0
    single, r0, r1 = (torch.load(tmp_path / n) for n in ("w1r0.pt", "w2r0.pt", "w2r1.pt"))
    for a, b, c in zip(single, r0, r1):
        assert torch.equal(a, b) and torch.equal(b, c)  # each rank did half the NS work, same weights


# ----------------------------------------------------------------------------- on a GPU (pytest -m cuda)

def test_weight_decay_groups_by_name(net):
    decay, no_decay = optim.weight_decay_split(net)
    assert "tok_emb.weight" in no_decay and "norm.weight" in no_decay
    assert "layers.0.attn_norm.weight" in no_decay and "layers.1.mlp_norm.weight" in no_decay
    assert {"layers.0.attn.wq.weight", "layers.0.attn.wk.weight", "layers.0.attn.wv.weight",
            "layers.0.attn.wo.weight", "layers.1.mlp.w_gate.weight", "layers.1.mlp.w_up.weight",
            "layers.1.mlp.w_down.weight"} <= set(decay)
    assert len(decay) == 7 * net.config.n_layers
    opt = optim.configure_optimizers(net, weight_decay=0.1, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))




def _muon_run(compile: bool, steps: int = 4):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*s)) for s in [(8, 4), (6, 6), (4, 10), (10, 4)]]
    emb = torch.nn.Parameter(torch.randn(10, 4))
    opt = optim.Muon([{"params": ps, "use_muon": True, "weight_decay": 0.1}, {"params": [emb], "weight_decay": 0.1}],
                     lr=0.02, compile=compile)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        for p in ps + [emb]:
            p.grad = torch.randn(p.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = 0.02 / (step + 1)  # a new LR every step, as the schedule gives
        opt.step()
    return [p.detach().clone() for p in ps + [emb]]


def test_compiled_optimizer_step_is_one_graph_that_never_recompiles(monkeypatch):
    """--compile-optimizer: Muon's and AdamW's update math compiled once each (fullgraph), the same
    numbers as eager, and no recompile across steps, LR changes or the momentum warmup. Dynamo's
    own tracing with the 'eager' backend: what it would hand inductor, without a minute of C++."""
    import torch._dynamo
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))
    torch._dynamo.reset()
    eager = _muon_run(compile=False)
    _muon_run(compile=True, steps=1)  # the first step compiles each function (one graph per shape group)
    with torch._dynamo.config.patch(error_on_recompile=True):  # ...and no later step may compile again
        compiled = _muon_run(compile=True)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-6), float((a - b).abs().max())
