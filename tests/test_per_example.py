"""PerExampleGradNorms against exact per-example gradients from torch.func.vmap(grad(...)).

The reference runs an fp64 copy of the model on one example at a time (vmap), with that
example's own loss l_i; the hooks run the fp32 model on the whole batch with the batch loss
(mean or sum of the l_i). Every check is relative error <= 1e-4 per example and per layer.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fastscale
from fastscale import PerExampleGradNorms, per_example
from fastscale.per_example.hooks import _FusedCall

# The CPU kernel of fastscale::linear_example_sq (a fused Linear's norms one example at a time).
NATIVE = fastscale._extension.load() and "cpu" in fastscale._extension.native_device_types()

RTOL = 1e-4


# ---------------------------------------------------------------------------- reference


def reference(model, inputs, target, per_example_loss):
    """Exact {module path: [B] squared norm of grad l_i} over trainable parameters (fp64)."""
    m64 = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in m64.named_parameters() if p.requires_grad}
    x64 = inputs.double() if inputs.is_floating_point() else inputs

    def loss_one(p, x, y):
        out = functional_call(m64, p, (x.unsqueeze(0),))
        return per_example_loss(out, y.unsqueeze(0)).sum()

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x64, target)
    out = {}
    for name, g in grads.items():
        layer = name.rpartition(".")[0] or "<root>"
        out[layer] = out.get(layer, 0) + g.flatten(1).square().sum(1)
    return out


def run_hooks(model, inputs, target, per_example_loss, reduction, **kw):
    norms = PerExampleGradNorms(model, loss_reduction=reduction, **kw)
    losses = per_example_loss(model(inputs), target)
    loss = losses.mean() if reduction == "mean" else losses.sum()
    loss.backward()
    return norms


def assert_close(got, want, what=""):
    got, want = got.double(), want.double().to(got.device)
    err = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert err <= RTOL, f"{what}: max relative error {err:.3g} (got {got.tolist()}, want {want.tolist()})"


def check(model, inputs, target, per_example_loss, reduction="mean", **kw):
    want = reference(model, inputs, target, per_example_loss)
    norms = run_hooks(model, inputs, target, per_example_loss, reduction, **kw)
    got = norms.per_layer()
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        assert_close(got[name], want[name], name)
    total = sum(want.values())
    sq = norms.squared_norms()
    assert sq.dtype == torch.float32 and sq.shape == (inputs.shape[0],)
    assert_close(sq, total, "total")
    norms.detach()
    return norms


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def token_ce(out, y):  # mean over an example's tokens: l_i
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


# ---------------------------------------------------------------------------- models


def mlp():
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(inplace=True), nn.Linear(32, 31), nn.Tanh(), nn.Linear(31, 5))


class CNN2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 6, 3, padding="same", dilation=2, groups=2)
        self.c3 = nn.Conv2d(6, 4, (2, 3), stride=(1, 2), padding=1, padding_mode="reflect", bias=False)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))
        x = torch.tanh(self.c3(F.relu(self.c2(x))))
        return self.head(x.mean((2, 3)))


class CNN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 5, stride=2, padding=2)
        self.gn = nn.GroupNorm(3, 6)
        self.c2 = nn.Conv1d(6, 6, 3, groups=3, padding="same", dilation=2, padding_mode="circular")
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.tanh(self.c2(F.gelu(self.gn(self.c1(x)))))
        return self.head(x.mean(2))


class Block(nn.Module):
    """Embedding + pre-norm causal attention from nn.Linear on [B, T, d] + MLP. The final
    norm is the same LayerNorm as the first (a module used twice in one forward)."""

    def __init__(self, vocab=11, d=16, heads=2, t=9):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(t, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.RMSNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).expand(b, t)
        x = self.tok(ids) + self.pos(pos)
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1), float("-inf"))
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        x = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return self.head(self.ln1(x))


def cnn2d_data(b=6):
    return torch.randn(b, 3, 11, 10), torch.randint(0, 5, (b,))


def cnn1d_data(b=5):
    return torch.randn(b, 4, 23), torch.randint(0, 5, (b,))


def block_data(b=4, t=9, vocab=11):
    return torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t))


METHODS = ["auto", "gram", "materialize"]


# ---------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp(reduction):
    torch.manual_seed(0)
    check(mlp(), torch.randn(7, 13), torch.randint(0, 5, (7,)), ce, reduction)


def test_mlp_on_sequences_uses_both_forms(monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 3))
    x = torch.randn(4, 5, 2, 6)  # extra dims flattened into T = 10

    def loss(out, y):
        return (out - y).square().sum((1, 2, 3))

    y = torch.randn(4, 5, 2, 3)
    # Which form reduced each layer's weight gradient, seen from the two functions that compute
    # them (each layer's (d_in, d_out) is distinct, so the shapes name the layer).
    layer_of = {(m.in_features, m.out_features): name for name, m in model.named_modules()
                if isinstance(m, nn.Linear)}
    forms = {}

    def spy(form, compute):
        def wrapped(a, d):
            forms.setdefault(layer_of[(a.shape[-1], d.shape[-1])], []).append(form)
            return compute(a, d)

        return wrapped

    forms_of = per_example.common  # where the Linear and Conv rules find the two forms
    monkeypatch.setattr(forms_of, "_gram_sq", spy("gram", forms_of._gram_sq))
    monkeypatch.setattr(forms_of, "_materialised_sq", spy("materialise", forms_of._materialised_sq))
    # "auto" takes the Gram form where T (d_in + d_out) < d_in d_out, with T = 10:
    # 6->40: 460 > 240 and 40->3: 430 > 120 materialise; 40->40: 800 < 1600 is Gram.
    want = {
        "auto": {"0": ["materialise"], "2": ["gram"], "4": ["materialise"]},
        "gram": {"0": ["gram"], "2": ["gram"], "4": ["gram"]},
        "materialize": {"0": ["materialise"], "2": ["materialise"], "4": ["materialise"]},
    }
    for method in METHODS:
        forms.clear()
        check(model, x, y, loss, "mean", method=method, fused_linear=False)  # fused: its own test
        assert forms == want[method], f"method={method!r}: forms taken {forms}"
        model.zero_grad()


@pytest.mark.parametrize("fused_conv", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cnn2d(method, reduction, fused_conv):
    torch.manual_seed(2)
    x, y = cnn2d_data()
    check(CNN2d(), x, y, ce, reduction, method=method, fused_conv=fused_conv)


@pytest.mark.parametrize("fused_conv", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cnn1d(method, reduction, fused_conv):
    torch.manual_seed(3)
    x, y = cnn1d_data()
    check(CNN1d(), x, y, ce, reduction, method=method, fused_conv=fused_conv)


@pytest.mark.parametrize("fused_linear", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_transformer_block(method, reduction, fused_linear):
    torch.manual_seed(4)
    ids, y = block_data()
    ids[0, :4] = 3  # repeated ids in one example
    ids[1, 2:5] = 0  # padding_idx rows get no gradient
    check(Block(), ids, y, token_ce, reduction, method=method, fused_linear=fused_linear)


@pytest.mark.parametrize("sums", ["kernel", "torch"])
@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("stats", ["forward", "recomputed"])
def test_group_norm_from_its_forwards_statistics(monkeypatch, stats, offset, frozen, sums):
    # GroupNorm's rule takes each (example, group)'s mean and rstd from the forward (autograd
    # saved them) and never forms xhat: rstd (sum x d - mean sum d). Where they are not
    # available it recomputes xhat. Both exact, also where every group's mean is ~100x its
    # std (the fp32 cancellation in that difference). The two sums come from the CPU kernel
    # (fastscale::row_dot_sums, one read of x and d) where it is built, else from torch.
    from fastscale.per_example import norm, registry

    rows, row_dot_sums = [], fastscale.ops.row_dot_sums
    monkeypatch.setattr(fastscale.ops, "row_dot_sums", lambda x, d: rows.append(x.shape) or row_dot_sums(x, d))
    if sums == "torch":
        monkeypatch.setattr(norm, "_cpu_kernel", lambda *tensors: False)

    keep, kept = registry.KEEPS[nn.GroupNorm], []

    def spy(mod, output):
        got = keep(mod, output) if stats == "forward" else None
        kept.append(got is not None)
        return got

    monkeypatch.setitem(registry.KEEPS, nn.GroupNorm, spy)
    torch.manual_seed(23)
    model = CNN2d()
    with torch.no_grad():
        model.c1.bias.add_(offset * model.c1(cnn2d_data()[0]).std())
    if frozen:
        getattr(model.gn, frozen).requires_grad_(False)
    check(model, *cnn2d_data(), ce, fused_norm=False)  # the hooked rule (fused: test_fused_norm)
    assert kept == [stats == "forward" and frozen != "weight"]  # a frozen weight needs no statistics
    assert len(rows) == (1 if kept[0] and sums == "kernel" and NATIVE else 0)


@pytest.mark.parametrize("case", ["channels_last", "called_twice", "autocast_bf16"])
def test_group_norm_statistics_path_equals_the_recompute(monkeypatch, case):
    # Where no fp64 reference applies (autocast) or the layout differs: the forward's statistics
    # and the recomputed xhat give the same norms on the same run, and the statistics were used.
    from fastscale.per_example import registry

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Linear(8, 5)

        def forward(self, x):
            h = torch.relu(self.gn(self.conv(x)))
            if case == "called_twice":
                h = torch.relu(self.gn(h))
            return self.head(h.mean((2, 3)))

    torch.manual_seed(26)
    model = Net()
    x, y = cnn2d_data()
    if case == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    keep, kept = registry.KEEPS[nn.GroupNorm], []
    results = {}
    for stats in ("forward", "recomputed"):
        def spy(mod, output, stats=stats):
            got = keep(mod, output) if stats == "forward" else None
            kept.append(got is not None)
            return got

        monkeypatch.setitem(registry.KEEPS, nn.GroupNorm, spy)
        norms = PerExampleGradNorms(model, fused_norm=False)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast_bf16"):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        results[stats] = norms.per_layer()["gn"]
        norms.detach()
    calls = 2 if case == "called_twice" else 1
    assert kept == [True] * calls + [False] * calls
    torch.testing.assert_close(results["forward"], results["recomputed"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("fused_norm", [False, True])
def test_group_norm_under_activation_checkpointing_reads_no_saved_tensor(fused_norm):
    # Under non-reentrant checkpointing, reading a saved tensor in the forward would recompute
    # the checkpointed block at once (and keep what it computed): the rule then recomputes xhat
    # in the backward, and the block runs twice in all (forward, backward), as without hooks.
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
            self.head = nn.Linear(8, 5)
            self.runs, self.checkpointed = 0, False

        def run_block(self, x):
            self.runs += 1
            return self.block(x)

        def forward(self, x):
            h = checkpoint(self.run_block, x, use_reentrant=False) if self.checkpointed else self.run_block(x)
            return self.head(h.mean((2, 3)))

    torch.manual_seed(25)
    model = Checkpointed()
    x, y = cnn2d_data()
    want = reference(model, x, y, ce)  # torch.func does not run under saved-tensor hooks
    model.runs, model.checkpointed = 0, True
    norms = run_hooks(model, x, y, ce, "mean", fused_norm=fused_norm)
    assert model.runs == 2
    for name, got in norms.per_layer().items():
        assert_close(got, want[name], name)


def test_token_mean_loss_is_mean_reduction():
    # cross_entropy averaged over all B*T tokens == mean over examples of the per-example token mean
    torch.manual_seed(5)
    model = Block()
    ids, y = block_data()
    want = sum(reference(model, ids, y, token_ce).values())
    norms = PerExampleGradNorms(model, "mean")
    F.cross_entropy(model(ids).flatten(0, 1), y.flatten()).backward()
    assert_close(norms.squared_norms(), want)


def test_frozen_parameters_are_ignored():
    torch.manual_seed(6)
    model = mlp()
    model[0].requires_grad_(False)  # frozen module: no hooks
    model[2].bias.requires_grad_(False)  # frozen bias only
    norms = check(model, torch.randn(5, 13), torch.randint(0, 5, (5,)), ce, "mean")
    assert set(norms.per_layer()) == {"2", "4"}


@pytest.mark.parametrize("d,t", [(8, 4), (40, 5)], ids=["holds", "too_many_to_hold"])
def test_linear_reused_in_one_forward(d, t, arrivals):
    # A layer called twice: its examples' gradients are summed over the calls before squaring,
    # so no call can take its norms alone. Fused calls hand over every example's gradient where
    # B of them may be held (d=8, T=4: 64 <= 4 * 16), and otherwise (d=40, T=5: 1600 > 5 * 80)
    # nothing: the rule then works from the output gradients, as for unfused calls. The head,
    # called once, takes its norms with the CPU kernel.
    torch.manual_seed(7)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(d, d)
            self.head = nn.Linear(d, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    lin = "examples" if d == 8 else "neither"
    expect = {  # arrivals in backward order: head, then the second and the first lin call
        ("auto", True): ["sq", lin, lin] if NATIVE else ["examples"] + (["examples"] * 2 if d == 8 else []),
        ("materialize", True): ["sq" if NATIVE else "examples", "examples", "examples"],
    }
    for method in METHODS:
        for fused_linear in (True, False):  # fused: both calls bring their per-example gradients
            arrivals.clear()
            check(Twice(), torch.randn(5, t, d), torch.randn(5, t, 3), lambda o, y: (o - y).square().sum((1, 2)),
                  "sum", method=method, fused_linear=fused_linear)
            assert arrivals == expect.get((method, fused_linear), []), (method, fused_linear)


def test_state_resets_on_next_forward():
    torch.manual_seed(8)
    model = mlp()
    norms = PerExampleGradNorms(model, attach=False)
    for _ in range(2):
        x, y = torch.randn(6, 13), torch.randint(0, 5, (6,))
        norms.detach()  # the reference deep-copies the model, hooks included
        want = sum(reference(model, x, y, ce).values())
        norms.attach()
        model.zero_grad()
        ce(model(x), y).mean().backward()
        assert_close(norms.squared_norms(), want)
    with torch.no_grad():
        model(x)  # an evaluation forward does not clear the step
    assert_close(norms.squared_norms(), want)


def test_context_manager_detaches():
    model = mlp()
    with PerExampleGradNorms(model) as norms:
        ce(model(torch.randn(3, 13)), torch.tensor([0, 1, 2])).mean().backward()
        assert norms.squared_norms().shape == (3,)
    assert not any(m._forward_hooks for m in model.modules())
    cnn = CNN2d()
    with PerExampleGradNorms(cnn):
        assert "forward" in cnn.c1.__dict__  # the fused conv forward, on the instance
    assert not any("forward" in m.__dict__ for m in cnn.modules())


def test_read_before_backward_raises():
    model = mlp()
    norms = PerExampleGradNorms(model)
    with pytest.raises(RuntimeError, match="no forward"):
        norms.squared_norms()
    model(torch.randn(3, 13))
    with pytest.raises(RuntimeError, match="backward"):
        norms.squared_norms()


# ---------------------------------------------------------------------------- fused conv backward


class ConvEdges(nn.Module):
    """Conv cases beyond CNN2d/CNN1d: an even kernel with padding="same" (asymmetric pad),
    a conv called twice (two spatial sizes), a frozen weight with a trainable bias, and a
    grouped Conv1d with "valid" padding."""

    def __init__(self):
        super().__init__()
        self.same_even = nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(1, 2))
        self.twice = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.weight.requires_grad_(False)
        self.c1d = nn.Conv1d(4, 6, 3, groups=2, padding="valid", dilation=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.tanh(self.same_even(x))
        x = torch.tanh(self.twice(x)) + F.interpolate(torch.tanh(self.twice(x[..., ::2, ::2])), size=x.shape[-2:])
        x = F.relu(self.frozen(x)).flatten(2)
        return self.head(torch.tanh(self.c1d(x)).mean(2))


def fused_case(case):
    """(model, x, y, per-example loss) whose conv or sequence-Linear calls run fused."""
    if case == "conv":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                              nn.Flatten(), nn.Linear(8 * 3 * 3, 5))
        return model, torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)), ce
    (x, y), model = seq_data(), seq_mlp()
    return model, x, y, seq_loss


@pytest.mark.parametrize("form", ["held", "kernel"])
@pytest.mark.parametrize("case", ["conv", "linear"])
def test_fused_example_gradients_are_freed_once_reduced(case, form, monkeypatch, arrivals):
    # Every example's weight gradient ([B, *weight.shape]) is needed only until its layer's
    # norms are taken: none may outlive that while the graph lives (the loss still referenced).
    # "held": the form without the CPU kernel, which hands all B of them over.
    import gc

    if form == "held":
        monkeypatch.setattr(per_example.linear, "_cpu_kernel", lambda *tensors: False)
        monkeypatch.setattr(per_example.conv, "_native_example_sq", lambda *args: None)
    elif not NATIVE:
        pytest.skip("the CPU kernels are not built")
    torch.manual_seed(24)
    model, x, y, loss_fn = fused_case(case)
    fused = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    shapes = {(x.shape[0], *m.weight.shape) for m in fused}
    with PerExampleGradNorms(model, method="materialize") as norms:
        loss = loss_fn(model(x), y).mean()
        loss.backward()
        assert norms.squared_norms().shape == (x.shape[0],)
        gc.collect()
        # plain tensors only: fake tensors left by earlier compiles in this process have symbolic shapes
        alive = [tuple(t.shape) for t in gc.get_objects()
                 if type(t) is torch.Tensor and not t.is_meta and tuple(t.shape) in shapes]
        assert alive == [], f"per-example gradients still held after their layers were reduced: {alive}"
        del loss
    assert arrivals and set(arrivals) == {"examples" if form == "held" else "sq"}, arrivals


def conv_grad_fns(model):
    """Record, per conv call, whether its weight is trainable and which backward it runs."""
    calls = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            m.register_forward_hook(
                lambda mod, args, out: calls.append((mod.weight.requires_grad, type(out.grad_fn).__name__)))
    return calls


def plain_grads(model, x, y, loss_fn, create_graph=False):
    x = x.clone().requires_grad_()
    loss = loss_fn(model(x), y).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], create_graph=create_graph)
    if create_graph:  # a gradient penalty: d/d(theta) of |d loss / d theta|^2
        grads = torch.autograd.grad(sum(g.square().sum() for g in grads), [x, *params])
    return grads


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [CNN2d, CNN1d, ConvEdges])
def test_fused_conv_gradients_equal_plain_backward(make, dtype, arrivals):
    # The fused conv backward returns the sum of the per-example weight gradients as the
    # weight gradient: it must equal what autograd computes without hooks. A conv called once
    # takes it, with its examples' norms, from the CPU kernel; ConvEdges' conv called twice
    # hands over its examples' gradients (summed over the calls before squaring).
    torch.manual_seed(11)
    model = make().to(dtype)
    x, y = cnn1d_data() if make is CNN1d else cnn2d_data()
    x = x.to(dtype)
    want = plain_grads(copy.deepcopy(model), x, y, ce)
    calls = conv_grad_fns(model)
    with PerExampleGradNorms(model, method="materialize", fused_norm=False):
        got = plain_grads(model, x, y, ce)
    # fused exactly where the weight is trainable (a frozen weight has nothing to fuse)
    assert calls and all((n == "_ConvWithExampleGradsBackward") == trainable for trainable, n in calls), calls
    held = 2 if make is ConvEdges else 0
    assert sorted(arrivals) == sorted(["examples"] * held + ["sq" if NATIVE else "examples"] * (len(arrivals) - held))
    assert len(arrivals) == sum(trainable for trainable, _ in calls)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


class ConvBiases(nn.Module):
    """Conv layers without a bias, with a frozen bias, and grouped with a bias; a stride-3
    dilated one; a 2-wide output (im2col's padded edges everywhere)."""

    def __init__(self):
        super().__init__()
        self.no_bias = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.frozen_bias = nn.Conv2d(4, 4, 3, stride=3, padding=2, dilation=2)
        self.frozen_bias.bias.requires_grad_(False)
        self.grouped = nn.Conv2d(4, 6, (3, 2), padding=(1, 2), groups=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.tanh(self.frozen_bias(torch.tanh(self.no_bias(x))))
        return self.head(torch.tanh(self.grouped(x)).mean((2, 3)))


@pytest.mark.parametrize("method", ["auto", "materialize"])
@pytest.mark.parametrize("case", ["conv", "linear"])
def test_kernel_takes_weight_and_bias_norms(case, method, arrivals):
    # Conv or sequence Linear layers each called once, without a bias, with a frozen bias and
    # with one: the kernel's per-example weight norms plus, where the bias trains, the bias's
    # from the kernel's per-example bias gradients. The norms equal the fp64 reference and
    # .grad equals autograd's.
    torch.manual_seed(25)
    if case == "conv":
        (x, y), model, loss_fn = cnn2d_data(), ConvBiases(), ce
    else:
        model = nn.Sequential(nn.Linear(6, 12, bias=False), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
        model[2].bias.requires_grad_(False)
        (x, y), loss_fn = seq_data(), seq_loss
    want = plain_grads(copy.deepcopy(model), x, y, loss_fn)
    with PerExampleGradNorms(model, method=method):
        got = plain_grads(model, x, y, loss_fn)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    fused = arrivals.copy()
    check(model, x, y, loss_fn, "mean", method=method)
    assert fused and fused == ["sq" if NATIVE else "examples"] * len(fused), fused
    assert case == "conv" or len(fused) == 3


class GroupNorms(nn.Module):
    """GroupNorm calls: on a conv's output and called a second time, with a frozen bias, with a
    frozen weight (not fused: nothing of the weight to compute), and on a 3-D input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.frozen_bias = nn.GroupNorm(4, 8)
        self.frozen_bias.bias.requires_grad_(False)
        self.frozen_weight = nn.GroupNorm(1, 8)
        self.frozen_weight.weight.requires_grad_(False)
        self.c1d = nn.Conv1d(8, 6, 3)
        self.gn1d = nn.GroupNorm(3, 6)
        self.head = nn.Linear(6, 5)
        with torch.no_grad():  # affine parameters away from their initial 1 and 0
            for m in self.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = torch.relu(self.gn(self.conv(x)))
        h = torch.tanh(self.frozen_weight(torch.tanh(self.frozen_bias(torch.relu(self.gn(h))))))
        return self.head(torch.tanh(self.gn1d(self.c1d(h.flatten(2)))).mean(2))


def test_fused_norms_under_torch_func_and_with_an_empty_batch():
    # With the hooks attached, torch.func transforms of the model see the fused norms' autograd
    # functions (setup_context style), and an empty batch runs its forward as without hooks.
    from torch.func import functional_call, grad as func_grad

    torch.manual_seed(29)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(2), nn.LayerNorm(81), nn.Flatten(),
                          nn.Linear(8 * 81, 5))
    x = torch.randn(4, 3, 11, 11)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lambda p: functional_call(model, p, (x,)).square().sum()  # noqa: E731
    want = func_grad(loss)(params)
    with PerExampleGradNorms(model):
        got = func_grad(loss)(params)
        assert model(torch.randn(0, 3, 11, 11)).shape == (0, 5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


class LayerNorms(nn.Module):
    """LayerNorm calls: on [B, T, d] and called a second time, over two dims, without a bias,
    with a frozen bias, with a frozen weight (not fused), on [B, d]."""

    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.ln = nn.LayerNorm(d)
        self.two_dims = nn.LayerNorm((5, d))
        self.no_bias = nn.LayerNorm(d, bias=False)
        self.frozen_bias = nn.LayerNorm(d)
        self.frozen_bias.bias.requires_grad_(False)
        self.frozen_weight = nn.LayerNorm(d)
        self.frozen_weight.weight.requires_grad_(False)
        self.flat = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)
        with torch.no_grad():  # affine parameters away from their initial 1 and 0
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    if m.bias is not None:
                        m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):  # x [B, 5, 2, 6]
        h = torch.tanh(self.ln(self.inp(x)))                                     # [B, 5, 2, d]
        h = torch.tanh(self.two_dims(self.ln(h).transpose(1, 2).contiguous()))  # [B, 2, 5, d]
        h = self.frozen_weight(self.frozen_bias(torch.tanh(self.no_bias(h))))
        return self.head(torch.tanh(self.flat(h.mean((1, 2)))))                  # [B, 3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["group", "layer"])
def test_fused_norm(kind, dtype):
    # On the CPU a GroupNorm or LayerNorm whose weight trains runs the fused backward: input,
    # weight and bias gradients equal autograd's, and the norms (from the backward's own sums)
    # the reference, as with the fusion off.
    torch.manual_seed(27)
    if kind == "group":
        (x, y), model, norm = cnn2d_data(), GroupNorms().to(dtype), nn.GroupNorm
        fused, plain = "_GroupNormWithExampleGradsBackward", "NativeGroupNormBackward0"
        expect = [fused, fused, fused, plain, fused]  # gn twice, frozen_bias, gn1d; frozen_weight hooked
    else:
        (x, y), model, norm = (torch.randn(4, 5, 2, 6), torch.randint(0, 3, (4,))), LayerNorms().to(dtype), nn.LayerNorm
        fused, plain = "_LayerNormWithExampleGradsBackward", "NativeLayerNormBackward0"
        expect = [fused] * 5 + [plain, fused]  # ln twice, two_dims, no_bias, frozen_bias, flat; frozen_weight hooked
    x = x.to(dtype)
    want = plain_grads(copy.deepcopy(model), x, y, ce)
    calls = []
    for m in model.modules():
        if isinstance(m, norm):
            m.register_forward_hook(lambda mod, args, out: calls.append(type(out.grad_fn).__name__))
    with PerExampleGradNorms(model):
        got = plain_grads(model, x, y, ce)
    assert calls == (expect if NATIVE else [plain] * len(expect)), calls
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)
    check(model, x, y, ce)
    check(model, x, y, ce, fused_norm=False)
    # and a gradient penalty through it, the first norm called twice: asked for x and weight at
    # once, autograd would follow x back to the first call and count that weight twice. The
    # norms, taken in the backward that builds the graph, are the reference's still.
    want = plain_grads(copy.deepcopy(model), x, y, ce, create_graph=True)
    with PerExampleGradNorms(model) as norms:
        got = plain_grads(model, x, y, ce, create_graph=True)
        assert_close(norms.squared_norms(), sum(reference(model, x, y, ce).values()), "double backward")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_edges_norms():
    torch.manual_seed(12)
    x, y = cnn2d_data()
    for method in METHODS:
        for fused_conv in (True, False):
            check(ConvEdges(), x, y, ce, "mean", method=method, fused_conv=fused_conv)


def test_fused_conv_bfloat16():
    torch.manual_seed(14)
    model = CNN2d()
    x, y = cnn2d_data()
    want_norms = sum(reference(model, x, y, ce).values())
    model = model.bfloat16()
    want = plain_grads(copy.deepcopy(model), x.bfloat16(), y, ce)
    with PerExampleGradNorms(model, method="materialize") as norms:
        got = plain_grads(model, x.bfloat16(), y, ce)
        sq = norms.squared_norms()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=4e-2, atol=4e-3)
    torch.testing.assert_close(sq.double(), want_norms, rtol=5e-2, atol=0)


def test_fused_conv_under_autocast():
    # autocast runs a conv in bf16; the fused function must see the same casts (done outside
    # it, differentiably) and give the gradients of the plain autocast run.
    torch.manual_seed(16)
    model = CNN2d()
    x, y = cnn2d_data()

    def grads(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16
        loss = ce(out.float(), y).mean()
        return torch.autograd.grad(loss, list(m.parameters()))

    want = grads(copy.deepcopy(model))
    calls = conv_grad_fns(model)
    with PerExampleGradNorms(model, method="materialize") as norms:
        got = grads(model)
        sq = norms.squared_norms()
    assert any(n == "_ConvWithExampleGradsBackward" for _, n in calls), calls
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.float32
        # bf16 rounding of the per-example sum: <= 6e-3 of the largest entry measured; without
        # the casts (fp32 saved inputs, bf16 output gradient) up to 5e-2
        assert (g - w).abs().max() <= 1.5e-2 * w.abs().max()
    assert torch.isfinite(sq).all() and (sq > 0).all()


# ---------------------------------------------------------------------------- fused Linear


def seq_mlp():
    return nn.Sequential(nn.Linear(6, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 3))


def seq_data(t=5):
    return torch.randn(4, t, 2, 6), torch.randn(4, t, 2, 3)


def seq_loss(out, y):
    return (out - y).square().sum((1, 2, 3))


@pytest.fixture
def arrivals(monkeypatch):
    """What each fused call's backward handed the hooks, in arrival order: "sq" (each
    example's squared norm, the CPU kernel), "examples" (every example's gradient, held) or
    "neither" (autograd's own weight gradient; the rule works from the output gradient)."""
    seen = []
    arrive = _FusedCall.arrive

    def spy(self, grad_out, example_grads=None, example_sq=None):
        seen.append("sq" if example_sq is not None else "examples" if example_grads is not None else "neither")
        return arrive(self, grad_out, example_grads, example_sq)

    monkeypatch.setattr(_FusedCall, "arrive", spy)
    return seen


def linear_grad_fns(model):
    """Per Linear call: which backward it runs."""
    calls = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, args, out: calls.append(type(out.grad_fn).__name__))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_fused_linear_gradients_equal_plain_backward(method, dtype, arrivals):
    # The fused backward returns the sum of the per-example weight gradients as the weight
    # gradient: equal to autograd's without hooks. Which calls fuse: all with "materialize",
    # none with "gram"; with "auto" those within the memory rule, or, with the CPU kernel,
    # those whose pass over each example's gradient costs less than the Gram form. At T = 10
    # tokens per example (x [4, 5, 2, 6]) 40->40 holds 1600 > 10 * 80 per example: not fused
    # without the kernel; with it 1600 <= 10^2 * 80, fused. Each layer is called once: with the
    # kernel every fused call hands the hooks its examples' squared norms.
    torch.manual_seed(18)
    model = seq_mlp().to(dtype)
    x, y = seq_data()
    x, y = x.to(dtype), y.to(dtype)
    want = plain_grads(copy.deepcopy(model), x, y, seq_loss)
    calls = linear_grad_fns(model)
    with PerExampleGradNorms(model, method=method) as norms:
        got = plain_grads(model, x, y, seq_loss)
        sq = norms.squared_norms()
    fused = "_LinearWithExampleGradsBackward"
    expect = {"materialize": [fused] * 3, "gram": ["ViewBackward0"] * 3,
              "auto": [fused] * 3 if NATIVE else [fused, "ViewBackward0", fused]}[method]
    assert [n if n == fused else "ViewBackward0" for n in calls] == expect, calls
    assert arrivals == ["sq" if NATIVE else "examples"] * expect.count(fused)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)
    want_sq = sum(reference(model, x, y, seq_loss).values())
    assert_close(sq, want_sq, "total")


def test_fused_linear_memory_rule():
    from fastscale.per_example.linear import FUSE_MEMORY_FACTOR, _fuses, _holds
    assert FUSE_MEMORY_FACTOR == 1  # where the unfused rule materialises anyway
    for native in (False, True):
        assert _fuses("auto", 64, 128, 128, native)  # 16384 <= 64 * 256
        assert not _fuses("auto", 8, 1024, 1024, native)  # 1M > 8^2 * 2048: the Gram form
        assert _fuses("materialize", 8, 1024, 1024, native) and not _fuses("gram", 64, 128, 1000, native)
        assert not _fuses("materialize", 1, 128, 128, native)  # one token: the outer-product rule
    # 128000 > 64 * 1128: B of them are too many to hold, so without the kernel the Gram form,
    # as unfused; the kernel holds one, and its pass (128000) costs less than 64^2 * 1128.
    assert not _fuses("auto", 64, 128, 1000, False) and _fuses("auto", 64, 128, 1000, True)
    assert not _holds("auto", 64, 128, 1000) and _holds("auto", 64, 128, 128) and _holds("materialize", 8, 1024, 1024)


@pytest.mark.parametrize("case", ["conv", "linear"])
def test_fused_double_backward(case, arrivals):
    # A gradient penalty through the fused backward (written in differentiable ops; the CPU
    # kernel, which is not, is passed over while the backward builds a graph).
    torch.manual_seed(13)
    make, data, loss, fused = {
        "conv": (CNN2d, cnn2d_data, ce, "_ConvWithExampleGradsBackward"),
        "linear": (seq_mlp, seq_data, seq_loss, "_LinearWithExampleGradsBackward"),
    }[case]
    model = make().double()
    x, y = data()
    x, y = x.double(), (y.double() if y.is_floating_point() else y)
    want = plain_grads(copy.deepcopy(model), x, y, loss, create_graph=True)
    calls = conv_grad_fns(model) if case == "conv" else linear_grad_fns(model)
    with PerExampleGradNorms(model, method="materialize"):
        got = plain_grads(model, x, y, loss, create_graph=True)
    assert calls and all((c[1] if case == "conv" else c) == fused for c in calls), calls
    assert arrivals and set(arrivals) == {"examples"}, arrivals
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_fused_linear_under_autocast_and_bfloat16(arrivals):
    torch.manual_seed(20)
    model = seq_mlp()
    x, y = seq_data()
    want_sq = sum(reference(model, x, y, seq_loss).values())

    def grads(m, x, cast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = m(x)
        loss = seq_loss(out.float(), y).mean()
        return torch.autograd.grad(loss, list(m.parameters()))

    for cast, m, xin in ((True, model, x), (False, copy.deepcopy(model).bfloat16(), x.bfloat16())):
        want = grads(copy.deepcopy(m), xin, cast)
        calls = linear_grad_fns(m)
        with PerExampleGradNorms(m, method="materialize") as norms:
            got = grads(m, xin, cast)
            sq = norms.squared_norms()
        assert calls and all(n == "_LinearWithExampleGradsBackward" for n in calls), calls
        assert arrivals == ["examples"] * len(calls)  # bf16: the held form, no kernel
        arrivals.clear()
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            # bf16 rounding of each example's gradient before the sum
            assert (g.float() - w.float()).abs().max() <= 2e-2 * w.float().abs().max()
        torch.testing.assert_close(sq.double(), want_sq, rtol=5e-2, atol=0)


@pytest.mark.parametrize("case", ["conv", "linear"])
def test_fused_under_torch_compile(case):
    # The instance-level forward (an autograd.Function with a Python sink) traced by dynamo
    # and compiled by inductor: same norms and gradients as eager.
    torch.manual_seed(17)
    model, x, y, loss = fused_case(case)
    eager = copy.deepcopy(model)
    with PerExampleGradNorms(eager, method="materialize") as norms:
        loss(eager(x), y).mean().backward()
        want = norms.squared_norms()
    with PerExampleGradNorms(model, method="materialize") as norms:
        compiled = torch.compile(model)
        for _ in range(2):  # the second call runs the cached graph
            model.zero_grad()
            loss(compiled(x), y).mean().backward()
            torch.testing.assert_close(norms.squared_norms(), want, rtol=1e-5, atol=0)
            for p, q in zip(model.parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_deep_copy_of_attached_model_computes_with_its_own_weights():
    torch.manual_seed(15)
    model = CNN2d()
    x, _ = cnn2d_data()
    with PerExampleGradNorms(model, method="materialize"):
        twin = copy.deepcopy(model)  # e.g. an EMA copy taken while attached
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        got = twin(x)
    with torch.no_grad():
        plain = copy.deepcopy(twin)
        for m in plain.modules():
            m.__dict__.pop("forward", None)
        torch.testing.assert_close(got, plain(x))
    assert not torch.allclose(got, model(x))


# ---------------------------------------------------------------------------- unsupported layers


class Affine(nn.Module):
    """A layer type the hooks know nothing about: owns parameters, has a child Linear."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))
        self.inner = nn.Linear(d, d)

    def forward(self, x):
        return torch.sin(self.inner(x) * self.gain) + self.shift


def with_affine():
    return nn.Sequential(nn.Linear(5, 7), Affine(7), nn.Linear(7, 3))


def test_unsupported_layer_error_names_it():
    with pytest.raises(ValueError, match=r"'1' \(.*Affine\)"):
        PerExampleGradNorms(with_affine())
    with pytest.raises(ValueError, match=r"'0' \(.*Bilinear\)"):
        PerExampleGradNorms(nn.Sequential(nn.Bilinear(2, 2, 2)))
    with pytest.raises(ValueError, match="mixes the examples"):
        PerExampleGradNorms(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_weight_tying_raises():
    model = Block()
    model.head.weight = model.tok.weight
    with pytest.raises(ValueError, match="weight tying"):
        PerExampleGradNorms(model)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_functorch_fallback(reduction):
    torch.manual_seed(9)
    model = with_affine()
    check(model, torch.randn(6, 4, 5), torch.randn(6, 4, 3), lambda o, y: (o - y).square().sum((1, 2)),
          reduction, fallback="functorch")


def test_functorch_fallback_root_module_used_twice():
    torch.manual_seed(10)
    model = Affine(4)  # the root itself is unsupported
    x = torch.randn(5, 4)

    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.a = inner

        def forward(self, x):
            return self.a(self.a(x))

    check(Twice(model), x, torch.randn(5, 4), lambda o, y: (o - y).square().sum(1), "mean", fallback="functorch")


def test_parameter_used_outside_its_forward_raises():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.randn(4))

        def forward(self, x):  # uses lin's parameters without calling lin
            return F.linear(x, self.lin.weight, self.lin.bias) * self.scale

    model = nn.Sequential(Functional())
    norms = PerExampleGradNorms(model, fallback="functorch")
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'0.lin' \(Linear\).*forward never ran"):
        norms.squared_norms()


def test_module_returning_a_tuple_is_refused_by_the_fallback():
    model = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True))
    with pytest.raises(ValueError, match=r"'0' \(.*MultiheadAttention\)"):
        PerExampleGradNorms(model)
    PerExampleGradNorms(model, fallback="functorch")
    x = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="returns tuple"):
        model[0](x, x, x)


# ---------------------------------------------------------------------------- the rule registry


class Scale(nn.Module):
    """y = x * w over the last dim: a layer type without a built-in rule."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


def test_a_registered_rule_is_all_a_new_layer_needs(monkeypatch):
    """One function registered for a type (here in the test, as a rule module would) and the
    hooks use it: exact per-example norms where the type was unsupported before."""
    from fastscale.per_example import registry

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    ce = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    with pytest.raises(Exception, match="Scale"):
        run_hooks(model, x, y, ce, "mean")  # no rule, no fallback: refused, naming the layer
    model.zero_grad()

    def scale_sq(mod, uses, method):  # g_i = sum over positions of x * delta
        return sum((u.args[0] * u.grad).reshape(u.grad.shape[0], -1, u.grad.shape[-1]).sum(1)
                   for u in uses).square().sum(1)

    monkeypatch.setitem(registry.RULES, Scale, scale_sq)
    check(model, x, y, ce)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Scale)(scale_sq)
