"""Kernel servers as a cluster (``kernel_server.cluster``): a directory clients ask first,
sessions placed by load, ``move()`` exact, a drain before ``down``, a replica that dies
restarted (by Ray, or by the process backend's supervisor) and a client that reconnects
through the directory and continues from a saved checkpoint file.

Everything binds loopback, runs on CPU with tiny-gpt2 (and SmolLM2-135M from the embedded
GGUF), and the Ray tests start their own local Ray (4 logical CPUs) and shut it down.
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

import djinn_nb as dj
from djinn_nb.cluster import ClusterClient
from kernel_server.cluster import Cluster, from_dict
from kernel_server.cluster.directory import Directory, DirectoryServer

PROMPT = "The capital of France is"
N, K = 12, 4
#: a hang guard for waits on a restart (Ray restarts the actor, the server loads again)
RESTART_DEADLINE_S = 240
#: the process cluster's tokens/s window (longer than the module runs)
RATE_WINDOW_S = 3600


def tiny(replicas: int) -> dict:
    return {"name": "tiny-gpt2", "model": "tiny-gpt2", "replicas": replicas, "device": "cpu",
            "num_cpus": 1, "args": ["--threads", "1"], "max_restarts": 2}


def baseline(cc: ClusterClient, model: str = "tiny-gpt2"):
    s = cc.session(model=model)
    base = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False).result
    s.close()
    return base


def paused_session(cc: ClusterClient, model: str = "tiny-gpt2"):
    s = cc.session(model=model)
    s.breakpoint(layer=1, steps=[K])
    ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    assert isinstance(ev, dj.Paused) and ev.step == K
    return s


def finish_from_ready(s, base) -> None:
    """A session restored at the pause of step K (state ready) runs to the end exactly."""
    assert s.state == "ready"
    again = s.resume()                       # the restored breakpoint pauses at K again
    assert isinstance(again, dj.Paused) and again.step == K
    done = s.resume()
    assert done.finished and done.tokens == base.tokens
    assert np.array_equal(done.result.logits, base.logits)


def wait_for_restart(cluster: Cluster, replica_id: str, old_pid: int) -> dict:
    deadline = time.monotonic() + RESTART_DEADLINE_S
    while time.monotonic() < deadline:
        rec = next((r for r in cluster.status()["replicas"] if r["id"] == replica_id), None)
        if rec is not None and rec["pid"] != old_pid and rec["healthy"]:
            return rec
        time.sleep(0.5)
    raise AssertionError(f"replica {replica_id} was not restarted within {RESTART_DEADLINE_S} s")


def kill_and_continue(cluster: Cluster, cc: ClusterClient, tmp_path) -> None:
    """Kill a replica's server while a client holds a paused session whose checkpoint it
    saved; the replica is restarted; the client reconnects through the directory and
    continues from the file on a live replica, exactly."""
    base = baseline(cc)
    s = paused_session(cc)
    path = s.checkpoint().save(tmp_path / "paused.djckpt")
    victim = s.client.replica
    rec = next(r for r in cc.status()["replicas"] if r["id"] == victim)
    os.kill(rec["pid"], signal.SIGKILL)
    with pytest.raises(dj.ConnectionLostError):
        s.resume()
    back = wait_for_restart(cluster, victim, rec["pid"])
    assert back["restarts"] >= 1 and back["address"]
    out = cc.reconnect()
    assert out["lost"] == [s.id] and out["moved"] == []
    ck = cc.load_checkpoint(path)
    finish_from_ready(ck.session, base)
    ck.session.close()        # (a finished session is not drained: later tests count on none)


def drain_and_continue(cluster: Cluster, cc: ClusterClient) -> None:
    """``down`` of one replica moves its paused session to the other replica of its model;
    the client's next call sees the connection lost, ``reconnect()`` attaches the moved
    session, and the same Session object continues exactly."""
    base = baseline(cc)
    s = paused_session(cc)
    victim = s.client.replica
    report = cluster.down(replicas=[victim])
    moved = report[victim]
    assert [m["session"] for m in moved] == [s.id] and "moved_to" in moved[0], moved
    assert victim not in cluster.replica_ids()
    with pytest.raises(dj.ConnectionLostError):
        s.info()
    out = cc.reconnect()
    assert out["moved"] == [moved[0]["moved_to"]] and out["lost"] == []
    assert s.client.replica == moved[0]["replica"] != victim
    finish_from_ready(s, base)


def move_exact(cc: ClusterClient) -> None:
    base = baseline(cc)
    s = paused_session(cc)
    where = s.client.replica
    out = dj.move(s, "least-loaded")
    assert out["from"] == where and out["to"] != where and s.client.replica == out["to"]
    assert out["nbytes"] > 0
    finish_from_ready(s, base)
    # and back, by replica id, after finishing: a finished session moves too
    out = s.move(where)                          # (the same, as a Session method)
    assert s.client.replica == where and s.state == "ready"
    s.close()


# ---- without servers: config, endpoint, refusals ------------------------------------------
def test_config_is_checked():
    with pytest.raises(dj.InvalidArgumentError, match="models"):
        from_dict({"backend": "process"})
    with pytest.raises(dj.InvalidArgumentError, match="unknown key.*replica_count"):
        from_dict({"models": [{"name": "a", "replica_count": 2}]})
    with pytest.raises(dj.InvalidArgumentError, match="set by the cluster"):
        from_dict({"models": [{"name": "a", "args": ["--host", "0.0.0.0"]}]})
    with pytest.raises(dj.InvalidArgumentError, match="without a token"):
        from_dict({"host": "0.0.0.0", "models": [{"name": "a"}]})
    with pytest.raises(dj.InvalidArgumentError, match="memory"):
        from_dict({"models": [{"name": "a", "memory": "lots"}]})
    cfg = from_dict({"models": [{"name": "a", "model": "tiny-gpt2", "replicas": 2,
                                 "memory": "2GiB"}]})
    assert [rid for rid, _ in cfg.replica_ids()] == ["a/0", "a/1"]
    assert cfg.models[0].memory == 2 * 2**30


def test_process_backend_hands_out_gpus_like_ray():
    from djinn_protocol.errors import LimitExceededError
    from kernel_server.cluster.backends import assign_gpus
    cfg = from_dict({"gpus": [0, 1, 2], "models": [
        {"name": "a", "replicas": 2, "num_gpus": 1},
        {"name": "b", "num_gpus": 0},
        {"name": "c", "num_gpus": 1, "env": {"CUDA_VISIBLE_DEVICES": "7"}}]})
    assert assign_gpus(cfg) == {"a/0": "0", "a/1": "1"}
    with pytest.raises(LimitExceededError, match="ask for 2 GPUs.*has 1"):
        assign_gpus(from_dict({"gpus": [0], "models": [{"name": "a", "replicas": 2,
                                                          "num_gpus": 1}]}))


def test_directory_endpoint_auth_and_refusals(tmp_path, monkeypatch):
    """The directory speaks the project's opening: a wrong or missing token is refused; it
    answers only its own calls, each bad one with a typed error, and stays up."""
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text("s3cret-cluster-token")
    cfg = from_dict({"models": [{"name": "a", "model": "tiny-gpt2"}],
                     "token_file": str(token)})
    server = DirectoryServer(Directory(cfg, "operator-key"), "127.0.0.1", 0)
    try:
        with pytest.raises(dj.AuthenticationFailedError):
            dj.connect("cluster://" + server.address, token="wrong")
        with pytest.raises(dj.AuthenticationFailedError):
            dj.connect("cluster://" + server.address)
        cc = dj.connect("cluster://" + server.address, token="s3cret-cluster-token")
        try:
            assert cc.server_info["cluster"] is True and cc.models() == {}
            with pytest.raises(dj.UnknownModelError, match="serves no model 'a'"):
                cc.session(model="a")
            with pytest.raises(dj.InvalidArgumentError, match="call of a kernel server"):
                cc.directory.call("open_session", model=None)
            with pytest.raises(dj.InvalidArgumentError, match="unknown argument"):
                cc.directory.call("cluster_place", model="a", nonsense=1)
            with pytest.raises(dj.InvalidArgumentError, match="no replica"):
                cc.directory.call("cluster_relay", source="x/0", offer={}, target="y/0", upload={})
            assert cc.directory.call("cluster_moved", replica="x/0", sessions=["s", 3]) == []
            assert cc.directory.ping() >= 0                # still up
        finally:
            cc.close()
    finally:
        server.close()


def test_directory_endpoint_survives_bad_input():
    """Any declared call with arguments of any type, plus an unknown argument: the directory
    answers each with a value or a typed error, and stays up."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from djinn_protocol.calls import CALLS
    cfg = from_dict({"models": [{"name": "a", "model": "tiny-gpt2"}]})
    server = DirectoryServer(Directory(cfg, "operator-key"), "127.0.0.1", 0)
    cc = dj.connect("cluster://" + server.address)
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                       st.lists(st.text(max_size=4), max_size=3),
                       st.dictionaries(st.sampled_from(["port", "nonce", "x"]),
                                       st.one_of(st.integers(0, 70000), st.text(max_size=6)),
                                       max_size=3))
    seen = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        name = data.draw(st.sampled_from(sorted(CALLS)))
        names = [p.name for p in CALLS[name].params] + ["bogus"]
        args = data.draw(st.dictionaries(st.sampled_from(names), values, max_size=4))
        try:
            cc.directory.call(name, **args)
        except dj.DjinnError as exc:
            assert not isinstance(exc, (dj.ConnectionLostError, dj.ServerError)), exc
        seen.append(name)
    try:
        one()
        assert len(seen) >= 100 and cc.directory.ping() >= 0
    finally:
        cc.close()
        server.close()


def test_token_meter_rate_over_a_sliding_window():
    """Tokens in the last ``window_s`` seconds / ``window_s``, on a clock the test sets; the
    total is exact under concurrent adds."""
    import threading
    from kernel_server.runtime.throughput import TokenMeter
    now = [100.0]
    m = TokenMeter(window_s=10, clock=lambda: now[0])
    assert m.rate() == 0.0 and m.total == 0
    for _ in range(50):
        m.add()
    now[0] = 105.0
    m.add(30)
    assert m.total == 80 and m.rate() == 8.0
    now[0] = 110.1                   # the first 50 have left the window
    assert m.rate() == 3.0
    now[0] = 115.3
    assert m.rate() == 0.0 and m.total == 80
    threads = [threading.Thread(target=lambda: [m.add() for _ in range(5000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.total == 80 + 20000 and m.rate() == 2000.0
    with pytest.raises(ValueError):
        TokenMeter(window_s=0)


@pytest.mark.parametrize("loads, want", [
    # equal sessions: the replica decoding fewer tokens/s
    ({"a/0": (1, 40.0, 0), "a/1": (1, 5.0, 0)}, "a/1"),
    # sessions first: fewer sessions wins even at more tokens/s
    ({"a/0": (2, 0.0, 0), "a/1": (1, 90.0, 0)}, "a/1"),
    # equal sessions and tokens/s: less device memory, then config order
    ({"a/0": (1, 7.0, 2**30), "a/1": (1, 7.0, 2**20)}, "a/1"),
    ({"a/0": (0, 0.0, 0), "a/1": (0, 0.0, 0)}, "a/0"),
])
def test_directory_places_by_sessions_then_tokens_per_s(loads, want):
    d = Directory(from_dict({"models": [{"name": "a", "model": "tiny-gpt2", "replicas": 2}]}), "k")
    for i, rid in enumerate(loads):
        d.register({"id": rid, "name": "a", "model": "tiny-gpt2", "address": f"127.0.0.1:{i + 1}",
                    "pid": i + 1})

    def check(rid):                  # the load each replica would report now
        sessions, rate, mem = loads[rid]
        rec = d._replicas[rid]
        rec.update(healthy=True, load={"total_sessions": sessions, "tokens_per_s": rate,
                                       "memory": [{"device": "cpu", "allocated_bytes": mem}]})
        return rec
    d.check = check
    assert d.place("a")["id"] == want
    d.close()


def test_engine_rows_and_tokens_in_the_load_record(kernel, client):
    """With the engine on, the load record's throughput part shows the decode scheduler's
    rows (a paused member counts as paused), and every token of the run is counted."""
    from kernel_server.runtime import scheduler, throughput
    mode = scheduler.get_mode()
    scheduler.set_mode("on")
    s = client.session(model="tiny-gpt2")
    try:
        loaded = kernel.models.get(s.model)
        t0 = throughput.meter(loaded.name).total
        s.breakpoint(layer=1, steps=[K])
        ev = s.generate(PROMPT, max_new_tokens=N, stop_at_eos=False)
        assert isinstance(ev, dj.Paused) and ev.step == K
        rec = throughput.load([loaded])["models"][loaded.name]
        assert rec["tokens"] - t0 == K
        assert (rec["engine"]["rows"], rec["engine"]["paused"], rec["engine"]["active"]) == (1, 1, 0)
        assert rec["engine"]["joins"] >= 1
        assert s.resume().finished
        rec = throughput.load([loaded])["models"][loaded.name]
        assert rec["tokens"] - t0 == N and rec["engine"]["rows"] == 0
    finally:
        s.close()
        scheduler.set_mode(mode)


def test_move_needs_a_cluster_session(client):
    s = client.session()
    with pytest.raises(dj.InvalidArgumentError, match="cluster://"):
        s.move()
    assert s.generate(PROMPT, max_new_tokens=2).result.tokens        # still usable
    s.close()


def test_kernel_server_refuses_cluster_calls(client):
    """A plain kernel server answers the directory's calls and the operator's calls with
    typed errors (no operator key here: nobody is the operator)."""
    for name, args in (("cluster_place", {"model": "tiny-gpt2"}), ("cluster_status", {})):
        with pytest.raises(dj.InvalidArgumentError, match="call of a cluster directory"):
            client.call(name, **args)
    for name, args in (("cluster_load", {}), ("handover_out", {}),
                       ("handover_in", {"upload": "00", "principal": "x" * 64})):
        with pytest.raises(dj.InvalidArgumentError, match="cluster operator"):
            client.call(name, **args)
    assert client.ping() >= 0


# ---- the process backend: no Ray -----------------------------------------------------------
@pytest.fixture(scope="module")
def process_cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster-logs")
    # tokens/s over an hour: every token of the module's run is in the window, so a replica's
    # rate is its token count / 3600 exactly (no test depends on how fast the machine is)
    spec = {**tiny(2), "env": {"DJINN_THROUGHPUT_WINDOW_S": str(RATE_WINDOW_S)}}
    cluster = Cluster.up({"backend": "process", "models": [spec]}, log_dir=str(logs))
    cc = dj.connect("cluster://" + cluster.address)
    yield cluster, cc
    cc.close()
    cluster.down(drain=False)


def test_process_backend_places_by_load(process_cluster):
    cluster, cc = process_cluster
    assert {k: m for k, m in cc.models()["tiny-gpt2"].items() if k in ("model", "replicas", "healthy")} \
        == {"model": "tiny-gpt2", "replicas": 2, "healthy": 2}
    a, b = cc.session(model="tiny-gpt2"), cc.session(model="tiny-gpt2")
    assert {a.client.replica, b.client.replica} == {"tiny-gpt2/0", "tiny-gpt2/1"}
    loads = {r["id"]: r["load"]["total_sessions"] for r in cc.status()["replicas"]}
    assert loads == {"tiny-gpt2/0": 1, "tiny-gpt2/1": 1}
    a.close()
    c = cc.session(model="tiny-gpt2")             # the replica a left is the least loaded
    assert c.client.replica == a.client.replica
    b.close()
    c.close()
    with pytest.raises(dj.UnknownModelError, match="serves no model 'gpt-9'.*tiny-gpt2"):
        cc.session(model="gpt-9")


def _tokens(cc: ClusterClient) -> dict:
    status = cc.status()
    return status, {r["id"]: r["load"]["throughput"]["models"]["tiny-gpt2"]["tokens"]
                    for r in status["replicas"]}


def test_process_backend_reports_tokens_per_s(process_cluster, tmp_path, capsys):
    """Every generated token (solo run and batch rows) counts on its replica; the load
    record, the directory's model summary and ``python -m kernel_server.cluster status``
    show tokens/s; the engine is off here, so no engine rows."""
    cluster, cc = process_cluster
    _, before = _tokens(cc)
    s = cc.session(model="tiny-gpt2")
    where = s.client.replica
    assert s.generate(PROMPT, max_new_tokens=N, stop_at_eos=False).finished
    out = s.generate([PROMPT, "Hello there"], max_new_tokens=N, stop_at_eos=False)
    assert [len(t) for t in out.tokens] == [N, N]
    status, after = _tokens(cc)
    assert {rid: after[rid] - before[rid] for rid in after} == {
        rid: 3 * N if rid == where else 0 for rid in after}
    for r in status["replicas"]:
        load = r["load"]
        assert load["throughput"]["window_s"] == RATE_WINDOW_S
        assert load["tokens_per_s"] == pytest.approx(after[r["id"]] / RATE_WINDOW_S)
        assert load["throughput"]["models"]["tiny-gpt2"]["engine"] is None
    model = status["models"]["tiny-gpt2"]
    assert model["tokens_per_s"] == pytest.approx(sum(after.values()) / RATE_WINDOW_S)
    assert model["sessions"] == sum(r["load"]["total_sessions"] for r in status["replicas"])
    # the command line's status: a table by default, the whole record with --json
    from kernel_server.cluster.__main__ import main, state_path
    config = tmp_path / "cluster.yaml"
    config.write_text("models:\n  - name: tiny-gpt2\n")
    state_path(str(config)).write_text(json.dumps({"pid": os.getpid(), "address": cluster.address}))
    assert main(["status", str(config)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(where))
    assert "tokens/s" in table and f"{after[where] / RATE_WINDOW_S:.1f}" in row.split()
    assert main(["status", "--json", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {r["id"]: r["load"]["throughput"]["models"]["tiny-gpt2"]["tokens"]
            for r in printed["replicas"]} == after
    s.close()


def test_process_backend_move_is_exact(process_cluster):
    move_exact(process_cluster[1])


def test_process_backend_move_refusals(process_cluster):
    cluster, cc = process_cluster
    s = cc.session(model="tiny-gpt2")
    with pytest.raises(dj.StateError, match="idle"):
        dj.move(s, "least-loaded")
    s.generate(PROMPT, max_new_tokens=2)
    with pytest.raises(dj.InvalidArgumentError, match="already"):
        dj.move(s, s.client.replica)
    with pytest.raises(dj.InvalidArgumentError, match="no replica 'nope/0'"):
        dj.move(s, "nope/0")
    plain = dj.Client(s.client.address)               # not opened through the cluster
    try:
        with pytest.raises(dj.InvalidArgumentError, match="cluster"):
            dj.move(plain.session(), "least-loaded")
    finally:
        plain.close()
    assert s.generate(PROMPT, max_new_tokens=2).finished   # still usable
    s.close()


@pytest.mark.slow
def test_process_backend_restarts_a_dead_replica(process_cluster, tmp_path):
    kill_and_continue(*process_cluster, tmp_path)


def test_process_backend_down_drains(process_cluster):
    drain_and_continue(*process_cluster)          # (last: it leaves one replica)


# ---- Ray (slow: a local Ray and three servers start first, 1-2 min on 2 cores) --------------
def test_dashboard_picks_a_model_of_the_cluster(tmp_path):
    """``dj.Dashboard(cluster_client)``: a "model" dropdown of the cluster's models; picking
    another opens a session on a replica of that model (placed by the directory)."""
    cluster = Cluster.up({"backend": "process", "models": [
        {"name": "tiny-gpt2", "model": "tiny-gpt2", "device": "cpu", "args": ["--threads", "1"]},
        {"name": "tiny-llama", "model": "random:tiny-llama", "device": "cpu",
         "args": ["--threads", "1"]},
    ]}, log_dir=str(tmp_path))
    cc = dj.connect("cluster://" + cluster.address)
    try:
        d = dj.Dashboard(cc, model="tiny-gpt2", max_new_tokens=4, background=False)
        assert d.server_picker.description == "model"
        assert sorted(d.server_picker.options) == ["tiny-gpt2", "tiny-llama"]
        assert d.server_picker.value == "tiny-gpt2" and d.session.model == "tiny-gpt2"
        d.run_baseline()
        d.wait()
        assert d.last_error is None and len(d.baseline.tokens) == 4
        d.server_picker.value = "tiny-llama"          # what a pick in the browser does
        d.wait()
        assert d.last_error is None
        assert d.session.model == "random:tiny-llama"
        assert d.session.client.replica == "tiny-llama/0"
        assert d.server_picker.value == "tiny-llama" and d.baseline is None
        d.run_baseline()
        d.wait()
        assert d.last_error is None and len(d.baseline.tokens) == 4
        d.close_sessions()
    finally:
        cc.close()
        cluster.down(drain=False)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray: pip install djinn_nb[cluster]")
    # Every Ray process imports jsonschema (ray.runtime_env), which imports the optional
    # rfc3987_syntax if installed (jupyterlab pulls it in here): it builds an Earley parser
    # at import, ~7 s of CPU per process on this machine, and on 2 busy cores Ray's
    # dashboard agent then misses the raylet's fixed 30 s start limit ("The current node
    # timed out during startup"). Ray never validates IRIs: its processes see it missing.
    stub = tmp_path_factory.mktemp("ray-import-stub")
    (stub / "rfc3987_syntax.py").write_text('raise ImportError("not for Ray processes")\n')
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub), saved]))
    try:
        ray.init(num_cpus=4, include_dashboard=False, namespace="djinn-test",
                 log_to_driver=False, configure_logging=False)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    logs = tmp_path_factory.mktemp("ray-cluster-logs")
    try:
        cluster = Cluster.up({"backend": "ray", "models": [
            tiny(2),
            {"name": "smollm2", "model": "smollm2-135m", "device": "cpu", "num_cpus": 1,
             "args": ["--threads", "1"]}]}, log_dir=str(logs))
    except BaseException:
        ray.shutdown()
        raise
    cc = dj.connect("cluster://" + cluster.address)
    yield cluster, cc
    cc.close()
    cluster.down(drain=False)
    ray.shutdown()


@pytest.mark.slow
def test_ray_places_replicas_and_sessions(ray_cluster):
    import ray
    cluster, cc = ray_cluster
    assert {name: (m["model"], m["replicas"], m["healthy"]) for name, m in cc.models().items()} \
        == {"tiny-gpt2": ("tiny-gpt2", 2, 2), "smollm2": ("smollm2-135m", 1, 1)}
    # one Ray actor per replica, holding the resources its config asked for
    for rid in ("tiny-gpt2/0", "tiny-gpt2/1", "smollm2/0"):
        assert ray.get_actor(f"djinn-replica-{rid}") is not None
    a, b = cc.session(model="tiny-gpt2"), cc.session(model="tiny-gpt2")
    assert {a.client.replica, b.client.replica} == {"tiny-gpt2/0", "tiny-gpt2/1"}
    s = cc.session(model="smollm2")
    assert s.client.replica == "smollm2/0" and s.model == "smollm2-135m"
    ev = s.generate(PROMPT, max_new_tokens=2)
    assert s.decode(ev.tokens).startswith(" Paris")
    with pytest.raises(dj.UnknownModelError, match="other than on smollm2/0"):
        dj.move(s, "least-loaded")                # its only replica: nowhere to go
    assert s.generate(PROMPT, max_new_tokens=1).finished
    for x in (a, b, s):
        x.close()


@pytest.mark.slow
def test_ray_move_is_exact(ray_cluster):
    move_exact(ray_cluster[1])


@pytest.mark.slow
def test_ray_restarts_a_killed_replica(ray_cluster, tmp_path):
    kill_and_continue(*ray_cluster, tmp_path)


@pytest.mark.slow
def test_ray_down_drains(ray_cluster):
    drain_and_continue(*ray_cluster)


@pytest.mark.slow
def test_cluster_bench_smoke():
    """The 2-GPU benchmark's script at a tiny size: two tiny-gpt2 replicas on CPU, two
    client processes through the directory, one per replica; the same tokens as on one."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "bench/cluster_bench.py", "--smoke"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    wrote = [line for line in out.stdout.splitlines() if line.startswith("wrote ")]
    d = json.loads(Path(wrote[0].split()[1]).read_text())
    assert "results" not in Path(wrote[0].split()[1]).parts
    assert d["many_replicas"]["clients_per_replica"] == {"bench-model/0": 1, "bench-model/1": 1}
    assert d["one_replica"]["clients_per_replica"] == {"bench-model/0": 2}
    assert d["all_tokens_equal"] is True and d["speedup"] > 0


@pytest.mark.slow
def test_process_backend_with_token_and_tls(tmp_path, tmp_path_factory, monkeypatch):
    """The token and TLS of one server hold for the directory and every replica: the
    directory reaches its replicas over TLS with the token, relays a move's file over TLS,
    and a client without the token or without TLS is refused by each of them."""
    import subprocess
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    monkeypatch.delenv("DJINN_TLS", raising=False)
    d = tmp_path_factory.mktemp("cluster-tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=djinn-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    (d / "token").write_text("cluster-s3cret")
    cluster = Cluster.up({"backend": "process", "models": [tiny(2)], "token_file": str(d / "token"),
                          "certfile": str(d / "cert.pem"), "keyfile": str(d / "key.pem")},
                         log_dir=str(tmp_path / "logs"))
    try:
        ca = str(d / "cert.pem")
        with pytest.raises(dj.TLSError):
            dj.connect("cluster://" + cluster.address, token="cluster-s3cret", tls=False)
        with pytest.raises(dj.AuthenticationFailedError):
            dj.connect("cluster://" + cluster.address, token="wrong", tls=ca)
        cc = dj.connect("cluster://" + cluster.address, token="cluster-s3cret", tls=ca)
        try:
            assert cc.models()["tiny-gpt2"]["healthy"] == 2     # the directory's TLS peers
            for r in cc.status()["replicas"]:                     # each replica: TLS + token
                with pytest.raises(dj.AuthenticationFailedError):
                    dj.Client(r["address"], token="wrong", tls=ca)
                with pytest.raises(dj.TLSError):
                    dj.Client(r["address"], token="cluster-s3cret", tls=False)
            move_exact(cc)                                        # the relay over TLS
        finally:
            cc.close()
    finally:
        cluster.down(drain=False)
