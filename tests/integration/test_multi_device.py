"""Models over several devices (accelerate device maps), checkpoints of a KV cache whose layers
live on different devices, one notebook holding sessions on several servers, memory per device.

What the CPU can exercise honestly: accelerate cannot place layers on two CPU "devices", so
the CPU tests load models with explicit device maps whose every entry is "cpu" (dispatched
with accelerate's hooks on every module, the code path of a many-GPU map), check the per-layer
bookkeeping, vectors and restored caches placed by it, the per-device checkpoint copy and
restore, and checkpoint files moved between different device maps. What needs two GPUs is in
``TestTwoGPUs`` and skips with the reason "needs 2 CUDA devices".
"""
from __future__ import annotations

import os

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import djinn_nb as dj

PROMPT = "The capital of France is"
N, K = 10, 4
ROOT = Path(__file__).resolve().parents[2]
#: tiny-gpt2 with every module placed by an explicit map, all on the CPU
GPT2_CPU_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu",
                **{f"transformer.h.{i}": "cpu" for i in range(8)},
                "transformer.ln_f": "cpu", "lm_head": "cpu"}
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA devices")


@pytest.fixture(scope="module")
def mapped_kernel():
    from kernel_server.kernel import Kernel
    return Kernel("tiny-gpt2", device_map=GPT2_CPU_MAP)


@pytest.fixture(scope="module")
def mapped_server(mapped_kernel):
    from kernel_server.transport.server import KernelServer
    srv = KernelServer(mapped_kernel, "127.0.0.1", 0).start()
    yield srv
    srv.close()


@pytest.fixture
def mapped_client(mapped_server):
    c = dj.connect(mapped_server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def llama_server():
    """A second server whose default model is another one (random:tiny-llama, on the CPU)."""
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    srv = KernelServer(Kernel("random:tiny-llama", device="cpu"), "127.0.0.1", 0).start()
    yield srv
    srv.close()


def run(s, n=N, on_pause=None, **kw):
    """generate() then resume() to the end; the finished result."""
    ev = s.generate(PROMPT, max_new_tokens=n, return_logits=True, stop_at_eos=False, **kw)
    while ev.paused:
        if on_pause is not None:
            on_pause(ev)
        ev = s.resume()
    return ev.result


#: the `client` fixture's kernel runs on DJINN_TEST_DEVICE; the mapped servers here on the CPU
FIXTURE_ON_CPU = os.environ.get("DJINN_TEST_DEVICE", "cpu") == "cpu"


def same(a, b) -> bool:
    """Bit for bit on one device; across CPU and a GPU run of the suite, the same tokens and
    logits within float32 rounding (different kernels)."""
    if FIXTURE_ON_CPU:
        return a.tokens == b.tokens and np.array_equal(a.logits, b.logits)
    return a.tokens == b.tokens and np.allclose(a.logits, b.logits, atol=1e-5)


# ---- options and bookkeeping (no model) ---------------------------------------------------------
def test_device_map_and_max_memory_options(tmp_path):
    from kernel_server.model.sharding import parse_device_map, parse_max_memory
    assert parse_device_map(None) is None and parse_device_map("auto") == "auto"
    assert parse_device_map("sequential") == "sequential"
    assert parse_device_map("cpu") == {"": "cpu"} and parse_device_map("cuda:1") == {"": 1}
    assert parse_device_map('{"model.layers.0": "cuda:0", "lm_head": 1, "x": "cpu"}') == \
        {"model.layers.0": 0, "lm_head": 1, "x": "cpu"}
    f = tmp_path / "map.json"
    f.write_text('{"": "cuda"}')
    assert parse_device_map(str(f)) == {"": 0}
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=100GiB") == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    assert parse_max_memory({"cuda:1": "2GB"}) == {1: "2GB"}
    for bad in ("{not json", "gpu7", '{"a": "tpu"}', "{}", str(tmp_path / "missing.json")):
        with pytest.raises(dj.InvalidArgumentError):
            parse_device_map(bad)
    for bad in ("0=lots", "0", "=1GiB", "x=1GiB", "0=-1GiB"):
        with pytest.raises(dj.InvalidArgumentError):
            parse_max_memory(bad)


def test_layers_grouped_by_device_keep_their_order():
    from kernel_server.model.sharding import describe_layout, group_by_device
    devs = ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:0"]
    groups = group_by_device(devs)
    assert list(groups) == ["cuda:0", "cuda:1"] and groups == {"cuda:0": [0, 1, 4], "cuda:1": [2, 3]}
    order = [i for idx in groups.values() for i in idx]
    assert sorted(order) == list(range(len(devs)))           # every layer exactly once
    assert describe_layout(devs) == "cuda:0 (layers 0-1), cuda:1 (layers 2-3), cuda:0 (layer 4)"


# ---- loading with a device map -----------------------------------------------------------------
def test_random_model_has_the_same_weights_under_any_map():
    from kernel_server.model.registry import load_model
    from kernel_server.model.sharding import split_map
    plain = load_model("random:tiny-llama", device="cpu", progress=False)
    assert plain.device_map is None and plain.layer_devices == []
    assert not any(p.device.type == "meta" for p in plain.model.parameters())
    cpu_map = split_map(plain.model, ["cpu"] * plain.num_layers)
    assert cpu_map["model.embed_tokens"] == "cpu" and "model.layers.3" in cpu_map
    mapped = load_model("random:tiny-llama", device_map=cpu_map, progress=False)
    assert mapped.device_map == cpu_map
    assert mapped.layer_devices == [torch.device("cpu")] * 4 and mapped.devices == [torch.device("cpu")]
    assert all(hasattr(layer, "_hf_hook") for layer in mapped.layers)   # accelerate's path
    a, b = plain.model.state_dict(), mapped.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    info = mapped.info()
    assert info["devices"] == ["cpu"] and info["layer_devices"] == ["cpu"] * 4
    with pytest.raises(dj.InvalidArgumentError, match="does not place"):
        load_model("random:tiny-llama", device_map={"model.layers": "cpu"}, progress=False)
    with pytest.raises(dj.UnknownModelError, match="tiny-llama"):
        load_model("random:no-such-shape", device="cpu", progress=False)


def test_path_model_loads_through_the_map(tiny_llama_path):
    """from_pretrained(device_map=...) for a local directory; a one-device map gets
    accelerate's hooks too (the same path as a many-device one); the same logits."""
    from kernel_server.model.registry import load_model
    from kernel_server.model.sharding import split_map
    plain = load_model(tiny_llama_path, device="cpu", progress=False)
    mapped = load_model(tiny_llama_path, device_map=split_map(plain.model, ["cpu"] * 4),
                        progress=False)
    assert all(hasattr(layer, "_hf_hook") for layer in mapped.layers)
    auto = load_model(tiny_llama_path, device_map="auto", max_memory="cpu=4GiB", progress=False)
    assert auto.device_map is not None and auto.devices == [torch.device("cpu")]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        want = plain.model(ids).logits
        assert torch.equal(mapped.model(ids).logits, want) and torch.equal(auto.model(ids).logits, want)
    with pytest.raises(dj.InvalidArgumentError, match="not both"):
        load_model(tiny_llama_path, device="cpu", device_map="auto", progress=False)
    with pytest.raises(dj.InvalidArgumentError, match="--max-memory needs --device-map"):
        load_model(tiny_llama_path, device="cpu", max_memory="cpu=1GiB", progress=False)


# ---- a mapped model through a real server --------------------------------------------------------
def test_mapped_model_is_exact_through_the_server(client, mapped_client):
    plain = client.session(model="tiny-gpt2")
    base = run(plain)
    s = mapped_client.session(model="tiny-gpt2")
    assert s.devices == ["cpu"] and s.layer_devices == ["cpu"] * 8
    assert same(run(s), base)                 # accelerate's hooks change nothing numerically
    pauses = []
    s.breakpoint(layer=1, phase="both")
    s.breakpoint(layer=6)
    assert same(run(s, on_pause=pauses.append), base)          # resume with no edit
    assert {p.layer for p in pauses} == {1, 6} and len(pauses) == 1 + 2 * (N - 1)
    s.clear_breakpoints()
    for layer in (2, 6):
        s.steer(layer=layer, scale=1.0)
    assert same(run(s), base)                                  # steer 1.0
    s.clear_steering()
    v = np.random.default_rng(0).standard_normal(s.hidden_size).astype(np.float32)
    s.breakpoint(layer=5, steps=[K])
    edited = run(s, on_pause=lambda ev: s.edit(add=v, alpha=3.0))
    s.clear_breakpoints()
    s.steer(layer=5, add=v, alpha=3.0, steps=[K])
    ruled = run(s)
    assert same(edited, ruled) and not same(edited, base)      # a vector placed per layer
    s.clear_steering()
    s.breakpoint(layer=6, steps=[K])
    ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    ck = s.checkpoint()                       # mid-forward: the start of token K
    assert ck.step == K
    first = s.resume()
    assert first.finished and same(first.result, base)
    s.restore(ck)
    again = s.resume()
    assert again.paused and (again.layer, again.step) == (6, K)
    assert same(s.resume().result, base)
    fork = s.fork(ck)
    fork.clear_breakpoints()
    assert same(fork.resume().result, base)


def test_checkpoint_files_move_between_device_maps(client, mapped_client, mapped_kernel, tmp_path):
    """A checkpoint saved under one placement loads under another and continues exactly:
    mapped -> plain and plain -> mapped."""
    for src, dst in ((mapped_client, client), (client, mapped_client)):
        s = src.session(model="tiny-gpt2")
        s.steer(layer=3, add=np.linspace(-1, 1, s.hidden_size, dtype=np.float32), alpha=2.0)
        s.breakpoint(layer=6, steps=[K])
        s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
        path = s.checkpoint().save(tmp_path / "moved.djckpt")
        original = s.resume()
        loaded = dst.load_checkpoint(path)
        ev = loaded.session.resume()
        assert ev.paused and (ev.layer, ev.step) == (6, K)
        cont = loaded.session.resume()
        assert same(cont.result, original.result)
    # on the mapped server the restored cache is put on each layer's device, by the map
    from kernel_server.checkpoints.snapshot import cache_from_host
    model = mapped_kernel.models.get("tiny-gpt2")
    ck = mapped_kernel.checkpoints._items[loaded.id]
    cache = cache_from_host(ck, model)
    assert [layer.keys.device for layer in cache.layers] == [model.layer_device(i) for i in range(8)]


def test_per_device_copy_keeps_layer_order_and_never_aliases():
    from kernel_server.checkpoints.snapshot import MultiCopy, copy_per_device
    g = torch.Generator().manual_seed(0)
    full = [(torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g)) for _ in range(5)]
    slices = [(k.narrow(-2, 0, 7), v.narrow(-2, 0, 7)) for k, v in full]      # as kv_slices cuts
    hosts, copy, release = copy_per_device(slices)
    assert isinstance(copy, MultiCopy) and release is None and len(hosts) == 5
    copy.synchronize()
    assert copy.query()
    for (k, v), (hk, hv) in zip(slices, hosts):
        assert torch.equal(k, hk) and torch.equal(v, hv)
        assert hk.data_ptr() != k.data_ptr()
    full[0][0].zero_()
    assert hosts[0][0].abs().sum() > 0          # a copy, not a view of the live cache
    assert copy_per_device([]) == ([], None, None)


def test_mapped_server_refuses_a_model_its_map_does_not_fit(mapped_client):
    with pytest.raises(dj.InvalidArgumentError, match="device map"):
        mapped_client.session(model="random:tiny-llama")
    assert mapped_client.session(model="tiny-gpt2").generate(PROMPT, max_new_tokens=2).finished


# ---- memory per device --------------------------------------------------------------------------
def test_stats_report_memory_per_device_without_counting_themselves(client):
    s = client.session(model="tiny-gpt2")
    s.generate(PROMPT, max_new_tokens=2)
    first, second = client.stats(), client.stats()
    for key in ("calls", "bytes_sent", "bytes_received", "bulk_bytes_received"):
        assert first[key] == second[key], key          # the memory call is not counted
    assert len(second["rtt_ms"]) == len(first["rtt_ms"])
    cpu = [d for d in second["devices"] if d["device"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["rss_bytes"] > 10 * 2**20
    assert cpu[0]["total_bytes"] > cpu[0]["rss_bytes"]
    where = [d for d in second["devices"] if d["layers"].get("tiny-gpt2")]
    assert len(where) == 1 and where[0]["layers"]["tiny-gpt2"] == 8
    assert client.stats(memory=False)["devices"] is None
    s.generate(PROMPT, max_new_tokens=2)
    assert client.stats()["calls"] == second["calls"] + 1


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_device_map(tmp_path):
    args = [sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2", "--port", "0"]
    proc = subprocess.Popen(args + ["--device-map", "auto", "--max-memory", "cpu=4GiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        address = proc.stdout.readline().split()[1]
        with dj.connect(address) as c:
            s = c.session()
            assert s.devices == ["cpu"] and s.layer_devices == ["cpu"] * 8
            assert len(s.generate(PROMPT, max_new_tokens=3, stop_at_eos=False).tokens) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for extra, message in ((["--max-memory", "cpu=1GiB"], "needs --device-map"),
                           (["--device-map", '{"transformer.h.0": "cpu"}'], "device map")):
        out = subprocess.run(args + extra, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-500:]


# ---- a pool of servers ----------------------------------------------------------------------------
def test_pool_holds_sessions_on_two_servers(server, llama_server, client):
    pool = dj.connect([server.address, llama_server.address])
    try:
        assert isinstance(pool, dj.Pool) and pool.addresses == [server.address, llama_server.address]
        assert all(isinstance(c, dj.Client) for c in pool.clients.values())
        a = pool.session(server=server.address, model="tiny-gpt2")
        b = pool.session(model="random:tiny-llama")          # picked by the model it serves
        assert b.client is pool.clients[llama_server.address] and b.model == "random:tiny-llama"
        assert pool.session(server=1).client.address == llama_server.address
        assert pool[0] is pool.clients[server.address]
        # the same tokens as through one client of each server
        assert same(run(a), run(client.session(model="tiny-gpt2")))
        with dj.connect(llama_server.address) as solo:
            assert same(run(b), run(solo.session()))
        b.breakpoint(layer=2, steps=[K])                      # both paused at once
        a.breakpoint(layer=4, steps=[K])
        eb = b.generate(PROMPT, max_new_tokens=N, stop_at_eos=False)
        ea = a.generate(PROMPT, max_new_tokens=N, stop_at_eos=False)
        assert ea.paused and eb.paused and ea.layer == 4 and eb.layer == 2
        assert a.resume().finished and b.resume().finished
        stats = pool.stats()
        assert list(stats) == pool.addresses and all(st["calls"] > 0 for st in stats.values())
        assert all(any(d["device"] == "cpu" for d in st["devices"]) for st in stats.values())
        assert set(pool.ping()) == set(pool.addresses)
        with pytest.raises(dj.InvalidArgumentError, match="no server"):
            pool.session(server="127.0.0.1:1")
        with pytest.raises(dj.InvalidArgumentError, match="no server"):
            pool.client(5)
    finally:
        pool.close()
    assert pool.closed and all(c.closed for c in pool.clients.values())
    with pytest.raises(dj.ConnectionLostError):
        a.info()


def test_pool_errors_leave_nothing_open(server):
    with pytest.raises(dj.InvalidArgumentError):
        dj.connect([])
    with pytest.raises(dj.InvalidArgumentError, match="twice"):
        dj.connect([server.address, server.address])
    import socket
    with socket.socket() as free:                 # a port nobody listens on
        free.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{free.getsockname()[1]}"
    opened = []
    real_init = dj.Client.__init__

    def spy(self, *a, **k):
        opened.append(self)
        real_init(self, *a, **k)
    dj.Client.__init__ = spy
    try:
        with pytest.raises(dj.ConnectionLostError):
            dj.connect([server.address, dead])
    finally:
        dj.Client.__init__ = real_init
    assert opened[0].closed                       # the first server's client was closed again
    # and the server released what it held for it (its own sessions, not a count of the
    # shared server's, which other tests' late releases change)
    owner = opened[0]._owner
    deadline = time.monotonic() + 20
    while server.kernel.sessions.owned_by(owner) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner and server.kernel.sessions.owned_by(owner) == []


def test_dashboard_picks_the_server_of_a_pool(server, llama_server):
    pytest.importorskip("ipywidgets", reason="the dashboard needs the widgets extra")
    pool = dj.connect([server.address, llama_server.address])
    try:
        d = dj.Dashboard(pool, max_new_tokens=4, background=False, prompt=PROMPT)
        assert d.server_picker.options == tuple(pool.addresses) and d.client.address == server.address
        assert "cpu RSS" in d.memory_view.value
        d.run_baseline()
        assert len(d.baseline.tokens) == 4 and d.session.model == "tiny-gpt2"
        d.server_picker.value = llama_server.address          # the dropdown moves the dashboard
        assert d.client.address == llama_server.address and d.session.model == "random:tiny-llama"
        assert d.baseline is None and list(d.layer_picker.options) == list(range(4))
        assert llama_server.address in d.info.value
        d.run_baseline()
        want = pool.clients[llama_server.address].session().generate(
            PROMPT, max_new_tokens=4, stop_at_eos=False).tokens
        assert d.baseline.tokens == want
        assert "random:tiny-llama: 4 layers" in d.memory_view.value
        assert d.last_error is None
    finally:
        pool.close()


@pytest.mark.slow
def test_multi_gpu_bench_smoke():
    out = subprocess.run([sys.executable, "bench/multi_gpu_bench.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'all_exact': True" in out.stdout and "'errors': {}" in out.stdout


# ---- two GPUs -------------------------------------------------------------------------------------
def _llama_split(first: int, n: int = 8) -> dict:
    """Layers 0..first-1 (and the embedding) on cuda:0, the rest (and the head) on cuda:1."""
    return {"model.embed_tokens": 0, **{f"model.layers.{i}": int(i >= first) for i in range(n)},
            "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}


@pytest.fixture(scope="module")
def gpu_servers():
    """random:small-llama (8 layers, float32) on three servers: layers split 4/4 and 1/7
    over cuda:0 and cuda:1 (device maps), and on cuda:0 alone (no map)."""
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    maps = {"half": _llama_split(4), "skewed": _llama_split(1)}
    servers = {k: KernelServer(Kernel("random:small-llama", device_map=m), "127.0.0.1", 0).start()
               for k, m in maps.items()}
    servers["single"] = KernelServer(Kernel("random:small-llama", device="cuda:0"),
                                     "127.0.0.1", 0).start()
    for srv in servers.values():
        srv.kernel.checkpoints.prepare(srv.kernel.models.get().devices)
    yield servers
    for srv in servers.values():
        srv.close()


@two_gpus
class TestTwoGPUs:
    """A random-init Llama (8 layers) over cuda:0 and cuda:1, through a real server."""

    def test_exact_on_layers_of_both_gpus(self, gpu_servers):
        srv = gpu_servers["half"]
        with dj.connect(srv.address) as c:
            s = c.session()
            assert s.layer_devices == ["cuda:0"] * 4 + ["cuda:1"] * 4
            assert set(s.devices) == {"cuda:0", "cuda:1"}
            base = run(s)
            pauses = []
            s.breakpoint(layer=1, phase="both")
            s.breakpoint(layer=6, phase="both")
            assert same(run(s, on_pause=pauses.append), base)
            assert {p.layer for p in pauses} == {1, 6}
            s.clear_breakpoints()
            s.steer(layer=1, scale=1.0)
            s.steer(layer=6, scale=1.0)
            assert same(run(s), base)
            s.clear_steering()
            v = np.random.default_rng(1).standard_normal(s.hidden_size).astype(np.float32)
            s.breakpoint(layer=6, steps=[K])
            act = {}

            def edit(ev):
                act["h"] = s.activation()            # from cuda:1 to the notebook
                s.edit(add=v, alpha=2.0)
            edited = run(s, on_pause=edit)
            assert act["h"].shape[-1] == s.hidden_size and np.isfinite(act["h"]).all()
            s.clear_breakpoints()
            s.steer(layer=6, add=v, alpha=2.0, steps=[K])
            assert same(edited, run(s)) and not same(edited, base)
            s.clear_steering()
            kernel = srv.kernel
            for layer in (1, 6):                     # a checkpoint paused on each GPU
                s.breakpoint(layer=layer, steps=[K])
                s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
                ck = s.checkpoint()
                assert same(s.resume().result, base)
                s.restore(ck)
                sess = next(x for x in kernel.sessions._sessions.values() if x.id == s.id)
                assert [ly.keys.device for ly in sess.run.cache.layers] == \
                    [torch.device("cuda", 0)] * 4 + [torch.device("cuda", 1)] * 4
                ev = s.resume()
                assert ev.paused and ev.layer == layer
                assert same(s.resume().result, base)
                s.clear_breakpoints()
            mem = {d["device"]: d for d in c.stats()["devices"]}
            for dev in ("cuda:0", "cuda:1"):
                assert mem[dev]["allocated_bytes"] > 0 and mem[dev]["total_bytes"] > 2**30
                assert mem[dev]["layers"]["random:small-llama"] == 4

    def test_checkpoint_moves_between_gpu_maps(self, gpu_servers, tmp_path):
        with dj.connect(gpu_servers["half"].address) as c:
            s = c.session()
            base = run(s)
            s.breakpoint(layer=5, steps=[K])
            s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
            path = s.checkpoint().save(tmp_path / "gpu.djckpt")
        for other in ("skewed", "single"):
            with dj.connect(gpu_servers[other].address) as c2:
                s2 = c2.load_checkpoint(path).session
                ev = s2.resume()
                assert ev.paused and ev.layer == 5
                cont = s2.resume()
                assert cont.tokens == base.tokens, other
                if other == "skewed":       # another map, the same eager kernels: bit for bit
                    assert np.array_equal(cont.result.logits, base.logits)
                else:   # one GPU, no map: CUDA-graph fast decode on a static cache (models on a
                    # device map decode eagerly), other kernels: equal to float32 rounding
                    assert np.allclose(cont.result.logits, base.logits, rtol=1e-4, atol=1e-4)

    def test_auto_map_spreads_layers(self):
        from kernel_server.model.registry import load_model
        loaded = load_model("random:small-llama", device_map="sequential",
                            max_memory={0: "110MB", 1: "4GiB"}, progress=False)
        assert {d.index for d in loaded.layer_devices} == {0, 1}
        assert loaded.device == torch.device("cuda", 0)
