"""pixart/training/optim.py against the references: came_pytorch.CAME, torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_, and the EMA / lr-schedule formulas; in PyNative and graph
mode (ms.jit), plus fp16 overflow skipping and an exact optimizer-state checkpoint round trip."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, amp, nn, ops

torch = pytest.importorskip("torch")
came_pytorch = pytest.importorskip("came_pytorch")

from pixart.training import optim  # noqa: E402
from pixart.training.optim import (AdamW, CAME, EMA, Scratch, auto_scale_lr, clip_grad_norm,  # noqa: E402
                                   constant_with_warmup, make_optimizer)

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")

SHAPES = [(4,), (8, 6), (5, 3, 2, 2), (64, 32)]
STEPS = 10
LR = 1e-2


def _problem(seed=0, steps=STEPS):
    """Initial weights and one gradient per step for every shape in SHAPES."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    return init, grads


def _ms_params(values):
    return [Parameter(Tensor(v.copy()), name=f"p{i}") for i, v in enumerate(values)]


def _stepper(optimizer, graph):
    """optimizer(grads, lr) on numpy grads, compiled once when ``graph``."""
    if graph:
        @ms.jit
        def step(grads, lr):
            return optimizer(grads, lr)
    else:
        step = optimizer
    return lambda grads, lr: step(ms.mutable(tuple(Tensor(g) for g in grads)), Tensor(lr, ms.float32))


def _stepped_for(optimizer_cls, done, graph, **problem):
    """(all gradients, params, optimizer with weight decay 0.1, its stepper) after ``done`` steps."""
    init, grads = _problem(**problem)
    params = _ms_params(init)
    optimizer = optimizer_cls(params, lr=LR, weight_decay=0.1)
    step = _stepper(optimizer, graph)
    for step_grads in grads[:done]:
        step(step_grads, LR)
    return grads, params, optimizer, step


def _run_torch(optimizer_cls, init, grads, **kwargs):
    params = [torch.tensor(v.copy(), requires_grad=True) for v in init]
    optimizer = optimizer_cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        optimizer.step()
    return [p.detach().numpy() for p in params], optimizer


def _max_rel_diff(actual, expected):
    """max |actual - expected| over all tensors, relative to the largest |expected|."""
    diff = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))
    return diff / max(float(np.abs(e).max()) for e in expected)


# ------------------------------------------------------------------------------ optimizers

@pytest.mark.parametrize("graph", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_came_matches_came_pytorch(graph, weight_decay):
    init, grads = _problem()
    params = _ms_params(init)
    optimizer = CAME(params, lr=LR, weight_decay=weight_decay)
    step = _stepper(optimizer, graph)
    for step_grads in grads:
        count = step(step_grads, LR)
    expected, reference = _run_torch(came_pytorch.CAME, init, grads, lr=LR, weight_decay=weight_decay)

    assert int(count) == STEPS
    # Measured: 2.0e-7 (largest abs diff 7.2e-7 on weights of magnitude ~3.5).
    assert _max_rel_diff([p.asnumpy() for p in params], expected) <= 1e-6
    state = {p.name: p.asnumpy() for p in optimizer.state_parameters()}
    ref_state = [reference.state[p] for p in reference.param_groups[0]["params"]]
    for i, ref in enumerate(ref_state):
        moments = ["exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col"] \
            if len(SHAPES[i]) >= 2 else ["exp_avg", "exp_avg_sq"]
        for kind in moments:  # measured: <= 1.9e-7
            assert _max_rel_diff([state[f"came.{kind}.p{i}"]], [ref[kind].numpy()]) <= 1e-6, (kind, i)


@pytest.mark.parametrize("graph", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(graph, weight_decay):
    init, grads = _problem(seed=1)
    params = _ms_params(init)
    optimizer = AdamW(params, lr=LR, weight_decay=weight_decay, eps=1e-10)
    step = _stepper(optimizer, graph)
    for step_grads in grads:
        count = step(step_grads, LR)
    expected, reference = _run_torch(torch.optim.AdamW, init, grads, lr=LR, weight_decay=weight_decay, eps=1e-10)

    assert int(count) == STEPS
    # Measured: 2.4e-7 (largest abs diff 8.3e-7 on weights of magnitude ~3.5).
    assert _max_rel_diff([p.asnumpy() for p in params], expected) <= 1e-6
    for i, p in enumerate(reference.param_groups[0]["params"]):  # measured: <= 1.3e-7
        assert _max_rel_diff([optimizer.exp_avg[i].asnumpy()], [reference.state[p]["exp_avg"].numpy()]) <= 1e-6
        assert _max_rel_diff([optimizer.exp_avg_sq[i].asnumpy()], [reference.state[p]["exp_avg_sq"].numpy()]) <= 1e-6


@pytest.mark.parametrize("weight_decay, piece", [(0.0, None), (0.1, None), (0.1, 7)])
@pytest.mark.parametrize("optimizer_cls", [CAME, AdamW])
def test_the_host_step_equals_the_in_place_step(optimizer_cls, weight_decay, piece, monkeypatch):
    """``step_on_host`` and ``EMA.average_on_host`` (train.py --mode streamed, a group of
    parameters at a time, in NumPy on the Parameters' memory) compute the in-place step's
    weights, moments and averages: AdamW bit for bit, CAME (whose row and column sums NumPy adds
    in another order) to float32 rounding. Three steps, so the moments feed back. ``piece``:
    AdamW's and the EMA's passes run over pieces of that many elements, so that a weight ends in a
    shorter one."""
    if piece is not None:
        monkeypatch.setattr(optim, "PIECE", piece)
    init, grads = _problem(seed=3, steps=3)
    graph_params, host_params = _ms_params(init), _ms_params(init)
    kwargs = dict(lr=LR, weight_decay=weight_decay)
    graph_opt, host_opt = optimizer_cls(graph_params, **kwargs), optimizer_cls(host_params, **kwargs)
    graph_ema, host_ema = EMA(graph_params, decay=0.9), EMA(host_params, decay=0.9)
    step, scratch, moments = _stepper(graph_opt, graph=True), Scratch(), host_opt.moments_of()
    for k, step_grads in enumerate(grads):
        step(step_grads, LR)
        graph_ema()
        # the arrays are the Parameters' memory: nothing is copied back
        host_opt.step_on_host([p.asnumpy() for p in host_params], [g.copy() for g in step_grads],
                              [[m.asnumpy() for m in moments[p.name]] for p in host_params], LR, k + 1, scratch)
        host_ema.average_on_host([a.asnumpy() for a in host_ema.averages], [p.asnumpy() for p in host_params], scratch)
    graph_state = graph_params + graph_opt.state_parameters()[1:] + list(graph_ema.averages)
    host_state = host_params + host_opt.state_parameters()[1:] + list(host_ema.averages)
    assert len(graph_state) == len(host_state)
    for expected, got in zip(graph_state, host_state):
        if optimizer_cls is AdamW:
            np.testing.assert_array_equal(got.asnumpy(), expected.asnumpy(), err_msg=expected.name)
        else:  # measured: 2.8e-7 of the tensor's largest value
            np.testing.assert_allclose(got.asnumpy(), expected.asnumpy(), rtol=1e-6, atol=1e-6 * np.abs(
                expected.asnumpy()).max(), err_msg=expected.name)
    assert not np.array_equal(host_params[1].asnumpy(), init[1])


def test_lr_is_a_graph_input():
    """A schedule changes lr every step: the compiled step must use the value passed, not the
    one it was traced with."""
    init, grads = _problem(steps=3)
    lrs = [0.0, 1e-2, 3e-3]
    params = _ms_params(init)
    step = _stepper(AdamW(params, lr=LR), graph=True)
    for step_grads, lr in zip(grads, lrs):
        step(step_grads, lr)
    torch_params = [torch.tensor(v.copy(), requires_grad=True) for v in init]
    reference = torch.optim.AdamW(torch_params, lr=LR)
    for step_grads, lr in zip(grads, lrs):
        reference.param_groups[0]["lr"] = lr
        for p, g in zip(torch_params, step_grads):
            p.grad = torch.tensor(g)
        reference.step()
    assert _max_rel_diff([p.asnumpy() for p in params], [p.detach().numpy() for p in torch_params]) <= 1e-6


def test_tiny_hyper_parameters_compile_exactly():
    """Issue 13 item 11.  MindSpore compares two float scalar constants of a graph with an
    absolute tolerance of 2.2e-16 but hashes them exactly, so with hyper-parameters as Python
    floats CAME's eps (1e-30, 1e-16) and a weight decay of 0.0 could be taken for one another
    in some compiles: an internal compile error ("Fail to get eval result ... 1e-16") or, silently,
    ``x + 1e-16`` compiled as ``x + 1e-30``.  Measured with floats: 11-14 of 100 compiles of this
    graph went wrong; hyper-parameters are 0-d Tensors now, which compile exactly."""
    params = _ms_params(_problem(steps=0)[0])
    came = CAME(params, lr=LR).hparams  # eps (1e-30, 1e-16), weight_decay 0.0
    eps1, eps2, came_decay = came[6], came[7], came[9]
    adamw = AdamW(params, lr=LR, eps=1e-16, weight_decay=0.0).hparams
    eps, adamw_decay = adamw[3], adamw[4]
    values = [eps1, eps2, came_decay, eps, adamw_decay]
    assert [np.float32(float(v)) for v in values] == [np.float32(v) for v in (1e-30, 1e-16, 0.0, 1e-16, 0.0)]
    for i in range(100):  # each compile draws new hash-table layouts
        @ms.jit
        def add_each(x):
            return x + eps1, x + eps2, x + came_decay, x + eps, x + adamw_decay

        outputs = add_each(Tensor(np.zeros((2, i + 1), np.float32)))
        for out, value in zip(outputs, values):
            np.testing.assert_array_equal(out.asnumpy(), np.full((2, i + 1), float(value), np.float32),
                                          err_msg=f"compile {i}")


def test_make_optimizer_and_bad_input():
    params = _ms_params(_problem(steps=0)[0])
    assert isinstance(make_optimizer("came", params, lr=2e-5), CAME)
    assert isinstance(make_optimizer("CAMEWrapper", params, lr=2e-5), CAME)
    adamw = make_optimizer("AdamW", params, lr=2e-5, weight_decay=3e-2, eps=1e-10)
    assert isinstance(adamw, AdamW) and adamw.base_lr == 2e-5
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", params, lr=1e-3)
    with pytest.raises(ValueError, match="empty"):
        CAME([], lr=1e-3)
    with pytest.raises(ValueError, match="lr must be positive"):
        AdamW(params, lr=0.0)
    with pytest.raises(ValueError, match="three betas"):
        CAME(params, lr=1e-3, betas=(0.9, 0.999))
    half = Parameter(Tensor(np.zeros(3, np.float16)), name="half")
    with pytest.raises(TypeError, match="float32 master weights"):
        CAME([half], lr=1e-3)


def test_state_names():
    params = _ms_params(_problem(steps=0)[0])
    came_names = {p.name for p in CAME(params, lr=1e-3).state_parameters()}
    assert {"came.step", "came.exp_avg.p0", "came.exp_avg_sq.p0", "came.exp_avg.p1", "came.exp_avg_sq_row.p1",
            "came.exp_avg_sq_col.p1", "came.exp_avg_res_row.p1", "came.exp_avg_res_col.p1"} <= came_names
    assert len(came_names) == 1 + 2 + 3 * 5  # step, one vector, three factored tensors
    adamw_names = {p.name for p in AdamW(params, lr=1e-3).state_parameters()}
    assert len(adamw_names) == 1 + 2 * len(SHAPES) and "adamw.exp_avg_sq.p3" in adamw_names


@pytest.mark.parametrize("optimizer_cls", [CAME, AdamW])
def test_state_checkpoint_round_trip(optimizer_cls, tmp_path):
    """Save after 5 steps, restore into fresh objects, continue: identical to never stopping."""
    grads, params, optimizer, step = _stepped_for(optimizer_cls, 5, graph=True, seed=2)
    path = str(tmp_path / "state.ckpt")
    ms.save_checkpoint(params + optimizer.state_parameters(), path)
    for step_grads in grads[5:]:
        step(step_grads, LR)

    saved = ms.load_checkpoint(path)
    resumed_params = [Parameter(Tensor(saved[f"p{i}"].asnumpy()), name=f"p{i}") for i in range(len(SHAPES))]
    resumed = optimizer_cls(resumed_params, lr=LR, weight_decay=0.1)
    resumed.load_state(saved)
    assert int(resumed.step) == 5
    resumed_step = _stepper(resumed, graph=True)
    for step_grads in grads[5:]:
        resumed_step(step_grads, LR)
    for a, b in zip(params + optimizer.state_parameters(), resumed_params + resumed.state_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)

    del saved["p1"]  # a model weight: not optimizer state, ignored
    resumed.load_state(saved)
    del saved[f"{optimizer_cls.prefix}.exp_avg.p1"]
    with pytest.raises(KeyError, match="missing from the checkpoint"):
        resumed.load_state(saved)


# ---------------------------------------------------------------------- clipping and EMA

@pytest.mark.parametrize("graph", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("max_norm", [0.01, 1e3], ids=["clipped", "unclipped"])
def test_clip_grad_norm_matches_torch(graph, max_norm):
    _, (grads,) = _problem(seed=3, steps=1)
    clip = ms.jit(clip_grad_norm) if graph else clip_grad_norm
    clipped, norm = clip(ms.mutable(tuple(Tensor(g) for g in grads)), max_norm)

    torch_grads = [torch.tensor(g.copy(), requires_grad=True) for g in grads]
    for p, g in zip(torch_grads, grads):
        p.grad = torch.tensor(g.copy())
    torch_norm = torch.nn.utils.clip_grad_norm_(torch_grads, max_norm)
    np.testing.assert_allclose(float(norm), float(torch_norm), rtol=1e-6)
    for c, t in zip(clipped, torch_grads):
        np.testing.assert_allclose(c.asnumpy(), t.grad.numpy(), rtol=1e-6, atol=1e-12)


def test_clip_grad_norm_non_finite_is_nan_like_torch():
    grads = (Tensor(np.array([1.0, np.inf], np.float32)), Tensor(np.ones(3, np.float32)))
    clipped, norm = clip_grad_norm(grads, 1.0)
    assert np.isinf(float(norm))
    assert not np.isfinite(clipped[0].asnumpy()).all()


def test_ema_follows_formula_inside_a_compiled_step():
    """optimizer step then ema() in one graph: the EMA must see the freshly updated weights."""
    init, grads = _problem(seed=4, steps=5)
    decay = 0.9
    params = _ms_params(init)
    optimizer = CAME(params, lr=LR)
    ema = EMA(params, decay=decay)

    @ms.jit
    def step(g, lr):
        return ops.depend(optimizer(g, lr), ema())

    expected = [v.astype(np.float64) for v in init]
    for step_grads in grads:
        step(ms.mutable(tuple(Tensor(g) for g in step_grads)), Tensor(LR, ms.float32))
        expected = [decay * e + (1 - decay) * p.asnumpy().astype(np.float64) for e, p in zip(expected, params)]
    for average, e in zip(ema.averages, expected):
        np.testing.assert_allclose(average.asnumpy(), e, rtol=1e-6, atol=1e-7)
    assert [a.name for a in ema.state_parameters()] == [f"ema.p{i}" for i in range(len(SHAPES))]


class _TinyNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.proj = nn.Dense(3, 2)
        self.out = nn.Dense(2, 1)

    def construct(self, x):
        return self.out(ops.tanh(self.proj(x)))


def test_ema_starts_as_copy_and_copies_into_a_model():
    net = _TinyNet()
    ema = EMA(net.trainable_params(), decay=0.5)
    before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    for p in net.trainable_params():
        p.set_data(Tensor(p.asnumpy() + 1.0))
    ema()
    weights = ema.averaged_weights()
    assert set(weights) == set(before) == {"proj.weight", "proj.bias", "out.weight", "out.bias"}
    for name, value in weights.items():  # atol: a weight near -0.5 (random init) makes the sum near 0
        np.testing.assert_allclose(value.asnumpy(), before[name] + 0.5, rtol=1e-6, atol=1e-6)

    other = _TinyNet()
    ema.copy_to(other)
    for p in other.trainable_params():
        np.testing.assert_array_equal(p.asnumpy(), weights[p.name].asnumpy())
    ema.averages[0].set_data(Tensor(np.zeros_like(before["proj.weight"])))
    np.testing.assert_allclose(weights["proj.weight"].asnumpy(), before["proj.weight"] + 0.5, rtol=1e-6, atol=1e-6)  # a copy

    with pytest.raises(KeyError, match="no parameters named"):
        ema.copy_to(nn.Dense(3, 2))

    ema.reset()
    for p, average in zip(net.trainable_params(), ema.averages):
        np.testing.assert_array_equal(average.asnumpy(), p.asnumpy())


# ----------------------------------------------------------------------- loss scale / overflow

def test_overflow_skips_the_update_and_lowers_the_scale():
    """The fp16 train-step pattern of the module docstring, run in fp32 with an inf input
    standing in for an overflowing gradient."""
    net = _TinyNet()
    optimizer = CAME(net.trainable_params(), lr=LR)
    ema = EMA(net.trainable_params(), decay=0.9)
    scaler = amp.DynamicLossScaler(scale_value=2.0 ** 16, scale_factor=2, scale_window=2)

    def forward(x, y):
        loss = ((net(x) - y) ** 2).mean()
        return scaler.scale(loss), loss

    grad_fn = ms.value_and_grad(forward, None, optimizer.params, has_aux=True)

    @ms.jit
    def train_step(lr, x, y):
        (_, loss), grads = grad_fn(x, y)
        grads = scaler.unscale(grads)
        finite = amp.all_finite(grads)
        grads, grad_norm = clip_grad_norm(grads, 1.0)
        if finite:
            loss = ops.depend(loss, optimizer(grads, lr))
            loss = ops.depend(loss, ema())
        loss = ops.depend(loss, scaler.adjust(finite))
        return loss, grad_norm, finite

    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((4, 3)).astype(np.float32))
    y = Tensor(rng.standard_normal((4, 1)).astype(np.float32))
    bad_x = Tensor(np.full((4, 3), np.inf, np.float32))
    lr = Tensor(LR, ms.float32)

    def snapshot():
        return [p.asnumpy().copy() for p in
                net.trainable_params() + optimizer.state_parameters() + ema.state_parameters()]

    _, _, finite = train_step(lr, x, y)
    assert bool(finite) and int(optimizer.step) == 1
    assert float(scaler.scale_value) == 2.0 ** 16 and int(scaler.counter) == 1
    before = snapshot()

    _, grad_norm, finite = train_step(lr, bad_x, y)
    assert not bool(finite) and not np.isfinite(float(grad_norm))
    for a, b in zip(before, snapshot()):
        np.testing.assert_array_equal(a, b)
    assert float(scaler.scale_value) == 2.0 ** 15 and int(scaler.counter) == 0

    _, _, finite = train_step(lr, x, y)
    assert bool(finite) and int(optimizer.step) == 2
    assert not np.array_equal(before[0], net.proj.weight.asnumpy())
    _, _, finite = train_step(lr, x, y)
    assert float(scaler.scale_value) == 2.0 ** 16  # two finite steps in a row: the scale grows back


# ------------------------------------------------------------------------------ lr schedule

def test_constant_with_warmup():
    base = 2e-5
    assert constant_with_warmup(0, base, 1000) == 0.0
    assert constant_with_warmup(1, base, 1000) == pytest.approx(2e-8, rel=1e-12)
    assert constant_with_warmup(500, base, 1000) == pytest.approx(1e-5, rel=1e-12)
    assert constant_with_warmup(1000, base, 1000) == base
    assert constant_with_warmup(1010, base, 1000) == base
    assert constant_with_warmup(0, base, 0) == base
    with pytest.raises(ValueError):
        constant_with_warmup(-1, base, 1000)


def test_constant_with_warmup_matches_lambda_lr():
    """diffusers' get_constant_schedule_with_warmup is a LambdaLR; the lr of update k (0-based)
    is the one in effect after k scheduler steps."""
    warmup = 7
    p = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=0.3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: float(s) / float(max(1.0, warmup)) if s < warmup else 1.0)
    for k in range(12):
        assert constant_with_warmup(k, 0.3, warmup) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        schedule.step()


def test_auto_scale_lr():
    assert auto_scale_lr(2e-5, 64, "sqrt") == pytest.approx(1e-5, rel=1e-12)
    assert auto_scale_lr(2e-5, 1024, "sqrt") == pytest.approx(4e-5, rel=1e-12)
    assert auto_scale_lr(2e-5, 512, "linear") == pytest.approx(4e-5, rel=1e-12)
    assert auto_scale_lr(2e-5, 64, None) == 2e-5
    with pytest.raises(ValueError, match="unknown auto_lr rule"):
        auto_scale_lr(2e-5, 64, "cubic")
