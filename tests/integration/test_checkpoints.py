"""Checkpoints through a real server: restore and fork continue exactly, mid-forward
snapshots capture the start of the token, files survive a server restart, and every
misuse is a typed error."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import djinn_nb as dj
from conftest import MIDDLE

PROMPT = "The capital of France is"
N, K = 12, 4


def pause_at_step(s, layer, k, **kw):
    s.breakpoint(layer=layer, steps=[k])
    ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False, **kw)
    assert isinstance(ev, dj.Paused) and ev.step == k
    return ev


def test_restore_continues_exactly(session, model):
    base = session.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False).result
    assert session.checkpoint().step == N  # a finished run: the boundary after the last token
    session.breakpoint(layer=0, steps=[K])
    ev = session.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    mid = session.checkpoint()             # mid-forward at step K: captures the start of token K
    assert mid.step == K and mid.positions == len(base.prompt_tokens) + K - 1
    mid.wait()
    assert mid.ready()
    first = session.resume()
    assert first.finished and first.tokens == base.tokens
    for _ in range(2):                     # a checkpoint can be restored many times
        session.restore(mid)
        assert session.state == "ready"
        again = session.resume()           # the restored breakpoint pauses at step K again
        assert isinstance(again, dj.Paused) and again.step == K and again.layer == 0
        again = session.resume()
        assert again.tokens == base.tokens
        assert np.array_equal(again.result.logits, base.logits)


def test_checkpoints_of_the_prepared_store_continue_exactly(kernel, session, model, request):
    """The store as the server prepares it before "ready" (kernel_server/cli.py): on CUDA a
    pinned pool for the model's whole context, a device staging buffer and a warm-up
    dispatch (nothing on CPU). Checkpoints taken back to back while paused mid-run (CUDA: a
    fast-decode slot, one stacked tensor; the second may stack through torch's allocator
    while the first's copy still reads the staging buffer) each restore to the uninterrupted
    run's tokens and logits."""
    name = request.getfixturevalue("tiny_llama_path") if model == "tiny-llama" else model
    kernel.checkpoints.prepare(kernel.model(name))
    base = session.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False).result
    pause_at_step(session, MIDDLE[model], K)
    first, second = session.checkpoint(), session.checkpoint()
    assert session.resume().tokens == base.tokens
    for ck in (first, second, first):
        session.restore(ck)
        session.clear_breakpoints()
        again = session.resume()
        assert again.tokens == base.tokens
        assert np.array_equal(again.result.logits, base.logits)


def test_fork_branches_are_independent(session, model):
    base = session.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False).result
    pause_at_step(session, MIDDLE[model], K)
    ck = session.checkpoint()
    session.clear_breakpoints()
    a, b = session.fork(ck), session.fork(ck)
    a.clear_breakpoints()
    b.clear_breakpoints()
    a.steer(layer=MIDDLE[model], add=np.ones(a.hidden_size, dtype=np.float32), alpha=6.0)
    steered = a.resume()
    plain = b.resume()
    assert plain.tokens == base.tokens
    assert np.array_equal(plain.result.logits, base.logits)
    assert steered.tokens[:K] == base.tokens[:K]
    assert not np.array_equal(steered.result.logits[K:], base.logits[K:])
    assert session.resume().tokens == base.tokens       # the original session is untouched
    assert b.info()["steering"] == []                   # a's rule did not leak into b


def test_prefill_checkpoint_replays_everything(client):
    s = client.session(model="tiny-gpt2")
    base = s.generate(PROMPT, max_new_tokens=6, return_logits=True, stop_at_eos=False).result
    s.breakpoint(layer=3, phase="prefill")
    ev = s.generate(PROMPT, max_new_tokens=6, return_logits=True, stop_at_eos=False)
    assert ev.phase == "prefill"
    ck = s.checkpoint()
    assert ck.step == 0 and ck.positions == 0 and ck.nbytes == 0
    s.edit(scale=0.0)                      # an edit after the snapshot is not part of it
    s.resume()
    s.restore(ck)
    ev = s.resume()
    assert ev.paused and ev.phase == "prefill"
    assert np.array_equal(s.resume().result.logits, base.logits)


def test_sampling_rng_is_restored(client):
    s = client.session(model="tiny-gpt2")
    s.breakpoint(layer=1, steps=[5])
    ev = s.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=3)
    ck = s.checkpoint()
    first = s.resume()
    s.restore(ck)
    s.clear_breakpoints()
    assert s.resume().tokens == first.tokens


@pytest.mark.slow
def test_save_stop_server_load_continue(tmp_path):
    path = tmp_path / "run.djckpt"
    args = [sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2", "--port", "0"]

    def start():
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return proc, proc.stdout.readline().split()[1]

    proc, address = start()
    try:
        with dj.connect(address) as c:
            s = c.session()
            s.steer(layer=2, scale=0.5)
            s.breakpoint(layer=5, steps=[K])
            ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
            ck = s.checkpoint()
            assert ck.save(path) == path and path.stat().st_size > ck.nbytes
            original = s.resume()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc, address = start()
    try:
        with dj.connect(address) as c:
            loaded = c.load_checkpoint(path)
            s2 = loaded.session
            assert loaded.step == K and s2.state == "ready"
            info = s2.info()
            assert [r["layer"] for r in info["steering"]] == [2]
            assert [b["layer"] for b in info["breakpoints"]] == [5]
            ev = s2.resume()
            assert ev.paused and (ev.layer, ev.step) == (5, K)
            cont = s2.resume()
            assert cont.tokens == original.tokens
            assert np.array_equal(cont.result.logits, original.result.logits)
            assert c.checkpoints()[0]["id"] == loaded.id
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_checkpoint_files_are_refused_whole(client, tmp_path, tiny_llama_path):
    s = client.session(model="tiny-gpt2")
    s.generate(PROMPT, max_new_tokens=5, stop_at_eos=False)
    good = tmp_path / "good.djckpt"
    s.checkpoint().save(good)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "tampered": data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:],
        "garbage": b"hello world, not a checkpoint",
    }
    n_checkpoints = len(client.checkpoints())
    for name, blob in cases.items():
        p = tmp_path / f"{name}.djckpt"
        p.write_bytes(blob)
        with pytest.raises(dj.CheckpointError):
            client.load_checkpoint(p)
    assert len(client.checkpoints()) == n_checkpoints       # nothing half-loaded
    other = client.session(model=tiny_llama_path)
    with pytest.raises(dj.CheckpointError, match="another model"):
        client.load_checkpoint(good, session=other)
    ck = client.load_checkpoint(good, session=s)            # the good file still loads
    assert ck.session is s and s.state == "ready"


def test_checkpoint_errors(client, server):
    s = client.session(model="tiny-gpt2")
    with pytest.raises(dj.StateError):
        s.checkpoint()                                      # nothing generated yet
    s.generate(PROMPT, max_new_tokens=3)
    ck = s.checkpoint()
    other = client.session(model="tiny-gpt2")
    ck.delete()
    with pytest.raises(dj.CheckpointError, match="no checkpoint"):
        other.restore(ck)
    with pytest.raises(dj.CheckpointError):
        client.call("restore", session=s.id, checkpoint=12)
    stranger = dj.connect(server.address)                   # another client cannot see it
    try:
        ck2 = s.checkpoint()
        with pytest.raises(dj.CheckpointError):
            stranger.call("checkpoint_info", checkpoint=ck2.id)
    finally:
        stranger.close()
    assert s.generate(PROMPT, max_new_tokens=3).finished   # still usable


def test_budget_is_a_clear_error(kernel):
    from kernel_server.transport.server import KernelServer
    from kernel_server.checkpoints.store import CheckpointStore
    saved = kernel.checkpoints
    kernel.checkpoints = CheckpointStore(budget_bytes=200_000)
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    try:
        with dj.connect(srv.address) as c:
            s = c.session(model="tiny-gpt2")
            s.generate(" ".join(["word"] * 20), max_new_tokens=3)
            kept = [s.checkpoint()]        # 8 layers x (keys, values) x 22 positions x 64 x 4 B
            assert kept[0].nbytes == 8 * 2 * 22 * 64 * 4
            with pytest.raises(dj.LimitExceededError, match="--checkpoint-budget-mb"):
                for _ in range(10):
                    kept.append(s.checkpoint())
            ids = {c_["id"] for c_ in c.checkpoints()}
            assert {k.id for k in kept} <= ids                # nothing was evicted
            kept[0].delete()
            s.checkpoint()                                   # room again
    finally:
        srv.close()
        kernel.checkpoints = saved


def test_rule_ids_stay_unique_after_fork_and_vectors_survive_save(client, tmp_path):
    s = client.session(model="tiny-gpt2")
    rng = np.random.default_rng(1)
    v1, v2 = (rng.standard_normal(s.hidden_size).astype(np.float32) for _ in range(2))
    s.steer(layer=2, add=v1, alpha=3.0)
    s.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    fork = s.fork(s.checkpoint())
    second = fork.steer(layer=5, add=v2, alpha=3.0)
    rules = fork.info()["steering"]
    assert len({r["id"] for r in rules}) == 2 and second["id"] == 2
    expected = fork.generate(PROMPT, max_new_tokens=4, stop_at_eos=False).tokens   # both rules
    path = fork.checkpoint().save(tmp_path / "two-rules.djckpt")
    loaded = client.load_checkpoint(path).session
    assert [(r["layer"], r["id"]) for r in loaded.info()["steering"]] == [(2, 1), (5, 2)]
    # the vectors came back in their own rules: regenerating with them gives the same tokens
    assert loaded.generate(PROMPT, max_new_tokens=4, stop_at_eos=False).tokens == expected


def test_forged_checkpoint_metadata_is_refused(client, tmp_path):
    """The content hash has no key; the fields are checked like API input anyway."""
    import json
    import safetensors.torch
    from djinn_protocol.checkpoint_file import read_header
    from kernel_server.checkpoints.file_format import content_digest
    s = client.session(model="tiny-gpt2")
    s.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    good = s.checkpoint().save(tmp_path / "good.djckpt").read_bytes()
    meta = json.loads(read_header(good)["__metadata__"]["djinn"])
    tensors = safetensors.torch.load(good)
    forgeries = {
        "too many tokens": lambda m: m["config"].update(max_new_tokens=10**9),
        "unknown setting": lambda m: m["config"].update(evil=1),
        "token outside vocab": lambda m: m["tokens"].__setitem__(-1, 10**12),
        "step disagrees": lambda m: m.update(step=3),
        "layer out of range": lambda m: m["breakpoints"].append(
            {"layer": 999, "phase": "decode", "steps": None}),
    }
    for name, forge in forgeries.items():
        m = json.loads(json.dumps(meta))
        forge(m)
        text = json.dumps(m, sort_keys=True)
        blob = safetensors.torch.save(tensors, metadata={"djinn": text,
                                                         "sha256": content_digest(text, tensors)})
        path = tmp_path / f"{name}.djckpt"
        path.write_bytes(blob)
        with pytest.raises(dj.CheckpointError, match="invalid checkpoint|layer"):
            client.load_checkpoint(path)
    assert client.load_checkpoint(tmp_path / "good.djckpt").session.state == "ready"
