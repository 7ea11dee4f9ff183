"""Shape-based recipes on a model built under `zeroshard.Init` (2 gloo ranks).

nanoGPT's `configure_optimizers` puts parameters with `p.dim() >= 2` in the weight-decay
group and the rest in the no-decay group. A parameter partitioned by `Init` must answer
`dim()` / `shape` / `numel()` as the full tensor, or every weight silently lands in no-decay.
Trained at stage 3 through `zeroshard.initialize`, the recipe's run must match one process of
`torch.optim.AdamW` with the same groups; the all-no-decay run is shown to be far off, so the
comparison can tell the two apart. Also: `zeroshard.stage3.full_shape` / `full_numel`
(DeepSpeed's `ds_shape` / `ds_numel`), the released placeholders' metadata and bytes, and a
full-tensor `state_dict()` before `initialize`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zeroshard.demo.tiny_gpt import BigramLanguage

WORLD = 2
STEPS = 6
LR, BETAS, WD = 1e-2, (0.9, 0.95), 0.1
GLOBAL_BATCH = 8
VOCAB, BLOCK, EMBD, LAYERS, HEADS = 64, 16, 32, 2, 2
TOL = 1e-5


# -- a small nanoGPT (karpathy/nanoGPT model.py, bias=False: no parameter whose gradient is
# exactly zero, like a key bias, where Adam would turn rounding noise into whole steps) ------
class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(EMBD, 3 * EMBD, bias=False)
        self.c_proj = nn.Linear(EMBD, EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(EMBD, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(EMBD, bias=False)
        self.attn = CausalSelfAttention()
        self.ln_2 = LayerNorm(EMBD, bias=False)
        self.c_fc = nn.Linear(EMBD, 4 * EMBD, bias=False)
        self.c_proj = nn.Linear(4 * EMBD, EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(VOCAB, EMBD), wpe=nn.Embedding(BLOCK, EMBD),
            h=nn.ModuleList([Block() for _ in range(LAYERS)]), ln_f=LayerNorm(EMBD, bias=False),
        ))  # fmt: skip
        self.lm_head = nn.Linear(EMBD, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * LAYERS))
        self.n_params = sum(p.numel() for p in self.parameters())  # nanoGPT prints this

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def configure_optimizers(self, weight_decay: float) -> list[dict]:
        """nanoGPT's param groups (the optimizer itself is built by the caller)."""
        param_dict = {pn: p for pn, p in self.named_parameters()}
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        return [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]


def _config() -> dict:
    return {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 700,
                              "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW",
                      "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WD}},
    }  # fmt: skip


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return BigramLanguage(VOCAB).batch(GLOBAL_BATCH, BLOCK, seed=step)


def _metadata(model: nn.Module) -> dict[str, tuple]:
    """What shape-based code reads from each parameter, and what the parameter holds."""
    from zeroshard.stage3 import full_numel, full_shape

    return {
        n: (tuple(p.shape), p.dim(), p.numel(), tuple(full_shape(p)), full_numel(p),
            p.untyped_storage().nbytes(), bool(torch.isnan(p.detach()).all()))
        for n, p in model.named_parameters()
    }  # fmt: skip


def init_recipe_job() -> dict:
    """Build under Init, group with nanoGPT's recipe, train STEPS steps at stage 3."""
    import torch.distributed as dist

    import zeroshard

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _config()
    torch.manual_seed(0)
    with zeroshard.Init(cfg):
        model = GPT()
    out: dict = {"n_params": model.n_params, "built": _metadata(model)}
    groups = model.configure_optimizers(WD)
    out["decay_shapes"] = sorted(tuple(p.shape) for p in groups[0]["params"])
    built_sd = model.state_dict()  # before initialize: full tensors, gathered per module
    changed = {**built_sd, "transformer.ln_f.weight": torch.full((EMBD,), 2.0)}
    model.load_state_dict(changed)  # and loading writes each rank's chunks
    out["loaded"] = model.state_dict()["transformer.ln_f.weight"]
    model.load_state_dict(built_sd)
    model, opt = zeroshard.initialize(model, cfg, model_parameters=groups)
    losses = []
    n = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = _batch(step)
        loss = model(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    out["released"] = _metadata(model)  # every unit is released between steps
    head = model.lm_head.weight
    try:
        with torch.no_grad():
            head.mul_(2.0)  # a write into a placeholder must not pass silently
        out["write_error"] = ""
    except RuntimeError as e:
        out["write_error"] = str(e)
    sd = model.state_dict()
    if rank == 0:
        out["built_sd"] = built_sd
        out["params"] = {k: sd[k].clone() for k, _ in model.named_parameters()}
        out["losses"] = losses
    return out


def _reference(split: bool) -> tuple[dict[str, torch.Tensor], list[float], GPT]:
    """One process, torch.optim.AdamW; `split`: nanoGPT's groups, else all no-decay."""
    torch.manual_seed(0)
    model = GPT()
    groups = (model.configure_optimizers(WD) if split
              else [{"params": list(model.parameters()), "weight_decay": 0.0}])  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    losses = []
    for step in range(STEPS):
        x, y = _batch(step)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {k: p.detach().clone() for k, p in model.named_parameters()}, losses, model


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def results(dist_run) -> list[dict]:
    return dist_run(WORLD, init_recipe_job)


def test_nanogpt_param_groups_under_init_match_torch_adamw(results):
    split, split_losses, _ = _reference(split=True)
    flat, flat_losses, _ = _reference(split=False)
    # the decay split matters here: all-no-decay is far outside the tolerance
    assert _max_diff(split, flat) > 10 * TOL
    assert abs(flat_losses[-1] - split_losses[-1]) > 10 * TOL * abs(split_losses[-1])
    got = results[0]
    assert _max_diff(got["params"], split) <= TOL, _max_diff(got["params"], split)
    for ours, ref in zip(got["losses"], split_losses, strict=True):
        assert abs(ours - ref) <= TOL * abs(ref)
    decay_ref = sorted(tuple(g.shape) for g in GPT().configure_optimizers(WD)[0]["params"])
    assert got["decay_shapes"] == decay_ref  # weights and embeddings, nothing 1-D


def test_placeholders_answer_full_shapes_and_hold_one_element(results):
    from zeroshard.stage3 import full_numel, full_shape

    torch.manual_seed(0)
    ref = GPT()
    expected = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    for r in results:
        assert r["n_params"] == sum(p.numel() for p in ref.parameters())
        for when in ("built", "released"):
            meta = r[when]
            assert meta.keys() == expected.keys()
            for name, (shape, dim, numel, fshape, fnumel, nbytes, nan) in meta.items():
                full = expected[name]
                assert shape == fshape == full and dim == len(full), (when, name)
                assert numel == fnumel == ref.get_parameter(name).numel(), (when, name)
                assert nbytes == 4  # one fp32 element, whatever the full size
                assert nan  # values read outside a gather are NaN, not plausible numbers
        assert "more than one element" in r["write_error"]
    # state_dict() / load_state_dict() between Init and initialize: full values, as built
    built = results[0]["built_sd"]
    assert _max_diff({k: built[k] for k in expected}, dict(ref.named_parameters())) == 0
    for r in results:
        assert torch.equal(r["loaded"], torch.full((EMBD,), 2.0))
    # the accessors on tensors zeroshard does not shard: their own shape
    t = torch.zeros(3, 4)
    assert full_shape(t) == torch.Size([3, 4]) and full_numel(t) == 12
