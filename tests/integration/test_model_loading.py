"""Models loaded on request: a per-server cap (--max-models) with a clear error, and a load
in progress never blocks sessions (or new sessions) on models already loaded."""
from __future__ import annotations

import shutil
import threading

import pytest

import djinn_nb as dj

PROMPT = "The capital of France is"


def test_a_slow_load_blocks_nobody_and_the_cap_holds(tiny_llama_path, tmp_path, monkeypatch):
    import kernel_server.model.registry as M
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    from kernel_server.model.validation import Limits
    kernel = Kernel("tiny-gpt2", device="cpu", limits=Limits(max_models=2))
    kernel.models.get()                                  # the default model, loaded as at start
    entered, release = threading.Event(), threading.Event()
    loads = []
    real_load = M.load_model

    def gated_load(name, *args, **kwargs):               # a load that takes as long as we say
        loads.append(name)
        entered.set()
        assert release.wait(300)
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(M, "load_model", gated_load)
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    try:
        with dj.connect(srv.address) as a, dj.connect(srv.address) as b, \
                dj.connect(srv.address) as c:
            s = a.session()
            reference = s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens
            opened = {}

            def open_llama(client, key):
                opened[key] = client.session(model=tiny_llama_path)

            loaders = [threading.Thread(target=open_llama, args=(cl, k))
                       for cl, k in ((b, "b"), (c, "c"))]
            for t in loaders:
                t.start()
            assert entered.wait(120)
            # meanwhile, on the loaded model: new sessions, pauses, checkpoint files
            done = {}

            def work():
                s2 = a.session()                         # a registry lookup while loading
                s2.breakpoint(layer=3, steps=[2])
                assert s2.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).paused
                path = s2.checkpoint().wait().save(tmp_path / "during-load.djckpt")
                done["tokens"] = s2.resume().tokens
                done["loaded"] = a.load_checkpoint(path).session.state
                done["models"] = a.call("hello")["loaded_models"]

            worker = threading.Thread(target=work)
            worker.start()
            worker.join(300)
            assert not worker.is_alive(), "work on a loaded model waited for another model's load"
            assert not release.is_set() and all(t.is_alive() for t in loaders)  # still loading
            assert done == {"tokens": reference, "loaded": "ready", "models": ["tiny-gpt2"]}
            third = shutil.copytree(tiny_llama_path, tmp_path / "third-model")   # a real model
            with pytest.raises(dj.LimitExceededError, match="--max-models 2") as e:
                a.session(model=str(third))              # 1 loaded + 1 loading = the cap
            assert "(loading)" in str(e.value)
            release.set()
            for t in loaders:
                t.join(300)
            assert loads == [tiny_llama_path]            # two asked, one load
            assert opened["b"].layers == opened["c"].layers == 4
            # (hello() tells a client only the models of its own sessions: ask the kernel)
            assert sorted(kernel.models.loaded()) == sorted(["tiny-gpt2", tiny_llama_path])
            assert sorted(b.call("hello")["loaded_models"]) == sorted(["tiny-gpt2", tiny_llama_path])
            with pytest.raises(dj.LimitExceededError, match="--max-models"):
                a.session(model=str(third))
            assert s.generate(PROMPT, max_new_tokens=6, stop_at_eos=False).tokens == reference
    finally:
        release.set()
        srv.close()


def test_a_failed_load_frees_its_place(monkeypatch):
    from kernel_server.kernel import Kernel
    from kernel_server.transport.server import KernelServer
    from kernel_server.model.validation import Limits
    kernel = Kernel("tiny-gpt2", device="cpu", limits=Limits(max_models=2))
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    try:
        with dj.connect(srv.address) as client:
            for _ in range(3):                   # failures do not use up the cap
                with pytest.raises(dj.UnknownModelError):
                    client.session(model="/no/such/model")
            assert client.session().layers == 8
            assert client.call("hello")["loaded_models"] == ["tiny-gpt2"]
    finally:
        srv.close()


@pytest.mark.slow
def test_cli_max_models(tiny_llama_path):
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "kernel_server", "--model", "tiny-gpt2",
                             "--port", "0", "--max-models", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        with dj.connect(proc.stdout.readline().split()[1]) as client:
            with pytest.raises(dj.LimitExceededError, match="--max-models 1"):
                client.session(model=tiny_llama_path)
            assert client.session().generate(PROMPT, max_new_tokens=2).finished
    finally:
        proc.terminate()
        proc.wait(timeout=30)
