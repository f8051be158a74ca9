"""distributed.offload_teacher: the teacher's weights in host memory outside its score (workers/offload.py)."""

import copy

import pytest
import torch
from torch import nn

from helpers import tiny_config
from orchestrator.precompute import precompute
from models.tiny_pipelines import tiny_sd3_transformer
from sd_models import tiny_sd3_inputs
from orchestrator.recipe import resolve
from workers.config import ConfigError
from workers.context import LocalContext
from workers.distill import Distiller, copy_for_training
from workers.engines import build_engine, distributed
from workers.offload import ParkedNetwork
from workers.teacher import load_teacher
from workers.train import store_source, train


def _in(t: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether t's data lies inside flat's memory."""
    start = flat.data_ptr()
    return start <= t.data_ptr() < start + flat.numel() * flat.element_size()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one tensor reached twice
        self.register_buffer("scale", torch.tensor([2.0], dtype=torch.float64))

    def forward(self, x):
        return self.b(self.a(x)) * self.scale.float()


def _places(parked):
    """For each group of a ParkedNetwork: 'host', 'fetched' (copied, not in place) or 'device'."""
    return ["device" if p.in_place else "fetched" if p.on_device is not None else "host"
            for p in (parked.rest, *parked.blocks)]


@torch.no_grad()
def test_parked_weights_live_in_the_host_buffer_until_a_call_and_after_park():
    torch.manual_seed(0)
    net = Tied().requires_grad_(False)
    x = torch.randn(3, 4)
    expected = net(x)
    parked = ParkedNetwork(net, torch.device("cpu"))
    rest = parked.rest
    assert not parked.blocks and len(rest.tensors) == 4  # a.weight, a.bias, b.bias, scale: the tied weight once
    assert set(rest.host) == {torch.float32, torch.float64}
    assert parked.nbytes == 2 * 512 + 4 * 4 + 8  # each tensor at a 512-byte boundary of its buffer
    assert all((t.data_ptr() - rest.host[t.dtype].data_ptr()) % 512 == 0 for t in rest.tensors)
    assert all(_in(t, rest.host[t.dtype]) for t in rest.tensors)

    parked.fetch()  # started, not yet in place: the network still reads the host buffer
    assert _places(parked) == ["fetched"] and all(_in(t, rest.host[t.dtype]) for t in rest.tensors)
    assert torch.equal(net(x), expected)  # the call put the device copy in place
    assert _places(parked) == ["device"] and all(_in(t, rest.on_device[t.dtype]) for t in rest.tensors)
    assert net.b.weight is net.a.weight
    parked.park()
    assert _places(parked) == ["host"] and all(_in(t, rest.host[t.dtype]) for t in rest.tensors)
    assert torch.equal(net(x), expected)  # without fetch(): the call fetches
    with torch.enable_grad(), pytest.raises(RuntimeError, match="without gradients"):
        net(x)  # autograd would keep weights that park() hands back

    parked.restore()
    assert type(net) is Tied and _places(parked) == ["device"]
    with torch.enable_grad():
        net(x)  # its own class again


@torch.no_grad()
def test_blocks_stream_through_one_at_a_time_with_the_next_on_its_way():
    """A transformer's blocks: while block i runs its weights are in place and block i + 1's copy has started;
    the others, and block i once it returned, are in host memory. The result is the network's own."""
    net = tiny_sd3_transformer().requires_grad_(False)
    net.transformer_blocks.append(copy.deepcopy(net.transformer_blocks[-2]))  # three blocks (the last ends the text)
    net.transformer_blocks[1], net.transformer_blocks[2] = net.transformer_blocks[2], net.transformer_blocks[1]
    inputs = tiny_sd3_inputs()
    expected = net(**inputs, return_dict=False)[0]
    classes = [type(m) for m in (net, *net.transformer_blocks)]
    parked = ParkedNetwork(net, torch.device("cpu"))
    seen = []
    for block in net.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(_places(parked)))
    assert torch.equal(net(**inputs, return_dict=False)[0], expected)
    assert seen == [["device", "device", "fetched", "host"], ["device", "host", "device", "fetched"],
                    ["device", "host", "host", "device"]]
    assert _places(parked) == ["device", "host", "host", "host"]
    parked.fetch()  # what the first block needs next time
    assert _places(parked) == ["device", "fetched", "host", "host"]
    parked.park()
    assert _places(parked) == ["host"] * 4
    assert sum(len(p.tensors) for p in (parked.rest, *parked.blocks)) == len({id(t) for t in (
        *net.parameters(), *net.buffers())})  # every tensor in one group
    parked.restore()
    assert [type(m) for m in (net, *net.transformer_blocks)] == classes and _places(parked) == ["device"] * 4
    assert torch.equal(net(**inputs, return_dict=False)[0], expected)


def test_a_tensor_shared_by_two_blocks_is_refused():
    net = tiny_sd3_transformer().requires_grad_(False)
    net.transformer_blocks[1].norm1_context.linear.weight = net.transformer_blocks[0].norm1_context.linear.weight
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1_context.linear.weight and "
                                         "transformer_blocks.0.norm1_context.linear.weight are one tensor"):
        ParkedNetwork(net, torch.device("cpu"))


@torch.no_grad()
@pytest.mark.parametrize("whole", [False, True])
def test_compiled_code_keeps_its_graphs_when_the_weights_move(whole):
    """Dynamo guards on tensors, not their addresses: moving the data under the same parameters compiles nothing
    new, and the compiled code reads the moved weights. The moving stays outside the compiled call, for blocks
    compiled one by one and for a network compiled whole (as networks without blocks are): inside, Dynamo would
    trace it and guard on its state, compiling again at every move."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    net = (Tied() if whole else tiny_sd3_transformer()).requires_grad_(False)
    run = (lambda: net(torch.ones(3, 4))) if whole else (lambda: net(**inputs, return_dict=False)[0])  # noqa: E731
    inputs = tiny_sd3_inputs()
    expected = run()
    counter = CompileCounter()
    torch._dynamo.reset()
    for module in [net] if whole else net.transformer_blocks:
        module.compile(backend=counter, fullgraph=True)
    parked = ParkedNetwork(net, torch.device("cpu"))
    outputs = []
    for _ in range(3):
        parked.fetch()
        outputs.append(run())
        parked.park()
    graphs = counter.frame_count
    assert graphs >= 1
    run()
    parked.park()
    assert counter.frame_count == graphs
    assert all(torch.equal(o, expected) for o in outputs)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream and pinned memory need a GPU")
@torch.no_grad()
@pytest.mark.parametrize("late", ["copies", "compute"])
def test_on_a_gpu_each_block_reads_its_own_copy_while_either_stream_lags(monkeypatch, late):
    """The side stream's copies held back, and the compute stream held back (torch.cuda._sleep), with the weights
    switched between two sets at every call (the allocator hands a block the memory it had last time, so a stale
    read of one set would pass): a block that ran before its copy arrived, or a copy written into memory a queued
    block still reads, gives the other set's result."""
    from workers.offload import ParkedWeights

    fetch = ParkedWeights.fetch

    def late_fetch(self):
        if self.on_device is None and late == "copies":
            with torch.cuda.stream(self.stream):
                torch.cuda._sleep(20_000_000)
        fetch(self)

    monkeypatch.setattr(ParkedWeights, "fetch", late_fetch)
    device = torch.device("cuda")
    net = tiny_sd3_transformer().requires_grad_(False).to(device)
    net.transformer_blocks.extend(copy.deepcopy(net.transformer_blocks[0]) for _ in range(4))
    net.transformer_blocks.append(net.transformer_blocks.pop(1))  # the text-ending block last
    halved = copy.deepcopy(net)
    for t in (*halved.parameters(), *halved.buffers()):
        t.mul_(0.5)
    inputs = {k: v.to(device) for k, v in tiny_sd3_inputs().items()}
    expected = [net(**inputs, return_dict=False)[0], halved(**inputs, return_dict=False)[0]]
    assert not torch.equal(*expected)
    parked = ParkedNetwork(net, device)
    hosts = [h for p in (parked.rest, *parked.blocks) for h in p.host.values()]
    assert all(h.is_pinned() for h in hosts)
    sets = [[h.clone() for h in hosts], [h * 0.5 for h in hosts]]
    placed, lag = [], 5_000_000 if late == "compute" else 0
    for block in net.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(lag) or placed.append(
            all(p.device.type == "cuda" for p in module.parameters())))
    for i in range(4):
        torch.cuda.synchronize()  # no copy from the host buffers in flight while they change
        for h, w in zip(hosts, sets[i % 2]):
            h.copy_(w)
        parked.fetch()
        torch.cuda._sleep(lag)
        out = net(**inputs, return_dict=False)[0]
        parked.park()
        assert torch.equal(out, expected[i % 2]), f"call {i}"
    assert placed and all(placed)
    assert all(p.device.type == "cpu" for p in net.parameters())
    parked.restore()
    assert all(p.device.type == "cuda" for p in net.parameters())


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload")
    precompute(tiny_config(path), use_ray=False, progress=False)
    return path


def _generator_update(config, offload: bool) -> tuple[dict, list[torch.Tensor], ParkedNetwork | None]:
    adapter, teacher = load_teacher(config)
    torch.manual_seed(0)
    generator = build_engine(copy_for_training(teacher), config.generator.optim, config)
    critic = build_engine(copy_for_training(teacher), config.critic.optim, config)
    parked = ParkedNetwork(teacher, torch.device("cpu")) if offload else None
    store = precompute(config, use_ray=False, progress=False)[0]
    d = Distiller(config, adapter, teacher, generator, critic, torch.device("cpu"), torch.Generator().manual_seed(0),
                  store.negative(), teacher_weights=parked)
    metrics = d.generator_step(next(store.batches(8)), "generator update 1")
    weights = [p.detach().clone() for p in generator.module.parameters()]
    for engine in (generator, critic):
        engine.destroy()
    return metrics, weights, parked


def test_a_generator_update_with_the_teacher_parked_is_the_same_update(out):
    config = tiny_config(out)
    with distributed(False):
        plain, plain_weights, _ = _generator_update(config, offload=False)
        parked_metrics, parked_weights, parked = _generator_update(config, offload=True)
    assert parked_metrics == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, parked_weights))
    # the score fetched the weights and the update parked them again before its backward
    assert _places(parked) == ["host"] and all(_in(t, parked.rest.host[t.dtype]) for t in parked.rest.tensors)


@pytest.mark.parametrize("fails", [False, True])
def test_train_hands_the_teacher_back_as_it_was(out, tmp_path, monkeypatch, fails):
    """train() with offload_teacher restores a caller's teacher (the benchmark passes its own) when it ends: on its
    device when train returned; after a failure nothing is copied back (the GPU may be what failed), and the weights
    stay valid in host memory."""
    import workers.train

    made = []
    monkeypatch.setattr(workers.train, "ParkedNetwork", lambda *args: made.append(ParkedNetwork(*args)) or made[-1])
    config = tiny_config(out, "schedule.num_generator_updates=2")
    config.distributed.offload_teacher = True  # the config refuses it without a GPU; the mechanism is the same
    store = precompute(config, use_ray=False, progress=False)[0]
    adapter, teacher = load_teacher(config)
    before = [t.detach().clone() for t in teacher.parameters()]
    cycles = []

    def on_cycle(progress, metrics):
        cycles.append(_places(made[0]))
        if fails:
            raise RuntimeError("stop")

    run = lambda: train(config, LocalContext(tmp_path, resume=False), store_source(store),  # noqa: E731
                        store.negative(), teacher=(adapter, teacher), on_cycle=on_cycle, save=False)
    if fails:
        with pytest.raises(RuntimeError, match="stop"):
            run()
    else:
        run()
    assert cycles == [["host"]] * (1 if fails else 2)  # parked between the updates
    assert type(teacher) is type(load_teacher(config)[1])  # its own class again
    assert _places(made[0]) == ["host" if fails else "device"]
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_offloading_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError) as info:
        resolve(None, ["distributed.offload_teacher=true"])
    assert info.value.key == "distributed.offload_teacher" and "use_gpu=true" in info.value.message
    resolve(None, ["distributed.use_gpu=true", "distributed.compile=true", "distributed.offload_teacher=true"])
    resolve(None, ["distributed.use_gpu=true", "distributed.compile=true", "distributed.offload_teacher=true",
                   "distributed.compile_mode=max-autotune-no-cudagraphs"])
