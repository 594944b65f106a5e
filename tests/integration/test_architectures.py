"""The architecture matrix: every causal-LM family the installed transformers ships, built
tiny and random-init from its config (no downloads), saved to a directory and loaded by a
real kernel server over loopback; for each: breakpoint, edit, steer, checkpoint/restore
exactness and every site, bit for bit on CPU float32.

A family is *skipped* (listed with its reason, never counted as passing) when it is not a
decoder-only LM (encoder-decoder, or an encoder run in decoder mode is a *refusal* by the
server instead), when its tiny config cannot be built, needs a package this environment
lacks, or does not run in plain transformers. A feature is *refused* when the server
answers with a typed error that names what is missing (``UnsupportedModelError``,
``CheckpointError``); anything else (a wrong bit, a ServerError) fails the test.

docs/architectures.md is generated from the same rows:

    python tests/integration/test_architectures.py           # run the matrix, write the table
    python tests/integration/test_architectures.py --check   # fail if the table is stale

and the pytest run checks it too once every family has run (no ``-k``)."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import djinn_nb as dj  # noqa: E402

#: the whole matrix takes ~3 minutes on 2 cores: in `make test`, not in `make test-fast`
pytestmark = pytest.mark.slow

TABLE = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
PROMPT = "The capital of France is"
N, K = 5, 2          # tokens generated; the step a breakpoint, an edit and a checkpoint use
LAYER = 1            # the last of the two decoder blocks
SITES = ("attn", "mlp", "heads")
# sizes for every family's config, where the config has the attribute (2 blocks, hidden 32)
SHRINK = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
              num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              shared_expert_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
              first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
              qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, rotary_dim=8,
              sliding_window=64)
# per family, where the shared sizes do not make a valid config
OVERRIDES = {
    "falcon": dict(head_dim=None),
    "mistral": dict(sliding_window=16),   # a window the test's context stays inside
}
# families that fail today, each with what is wrong (the test expects the failure and fails
# once the family passes, so the list cannot go stale)
QUARANTINE = {
    "deepseek_v4": "blocks carry several residual streams ([pos, streams, hidden]): "
                   "activations are not [pos, hidden]",
    "hy_v4": "the heads site reads a tensor that is not [pos, heads, head_dim]",
    "inkling_text": "the heads site's head geometry from the config does not match the "
                    "output projection's input",
    "llama4_text": "the heads site reads a tensor that is not [pos, heads, head_dim]",
    "nemotron_h": "the config's layer pattern makes more blocks than num_hidden_layers "
                  "(the test's 2-block assumption)",
    "dory": "decode with the server's cache fails in the model (mask length off by one)",
    "openai-gpt": "the model has no KV cache: decoding one token at a time fails",
    "gemma4_unified_text": "the saved directory does not load back with "
                           "AutoModelForCausalLM.from_pretrained",
}
MAX_PARAMS = 8_000_000   # above this the tiny config still carries a full-size tower


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(family: str, vocab: int):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    cls = CONFIG_MAPPING[family]
    base = cls()
    kw = {k: v for k, v in SHRINK.items()
          if k in getattr(base, "attribute_map", {}) or _has(base, k)}
    kw.update({k: v for k, v in OVERRIDES.get(family, {}).items() if v is not None})
    for k, v in OVERRIDES.get(family, {}).items():
        if v is None:
            kw.pop(k, None)
    kw.update(vocab_size=vocab)
    return cls(**kw)


def _has(cfg, attr) -> bool:
    try:
        return hasattr(cfg, attr)
    except Exception:
        return False


def build(family: str, directory: Path, tok):
    """(row, model directory or None): the family's tiny model saved with the tokenizer, or a
    row saying why it is skipped."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    row = {"family": family}
    try:
        cfg = tiny_config(family, len(tok))
    except ImportError as e:
        return {**row, "skip": f"needs a package: {_first_line(e)}"}, None
    except Exception as e:
        return {**row, "skip": f"no tiny config: {type(e).__name__}: {_first_line(e)}"}, None
    if getattr(cfg, "is_encoder_decoder", False):
        return {**row, "skip": "encoder-decoder, not decoder-only"}, None
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if _has(cfg, name) and isinstance(getattr(cfg, name), int) \
                and getattr(cfg, name) >= len(tok):
            setattr(cfg, name, getattr(tok, name, None))
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in meta.parameters())
        row["class"] = type(meta).__name__
        if n > MAX_PARAMS:
            return {**row, "skip": f"tiny config still has {n / 1e6:.0f}M parameters "
                                   f"(parts the shared sizes do not reach: a vision/audio tower, a fixed width)"}, None
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.tensor([tok(PROMPT)["input_ids"]])
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    except ImportError as e:
        return {**row, "skip": f"needs a package: {_first_line(e)}"}, None
    except Exception as e:
        return {**row, "skip": f"tiny model does not run in plain transformers: "
                               f"{type(e).__name__}: {_first_line(e)}"}, None
    row["layout"] = _layout(model)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return row, directory


def _layout(model) -> str:
    from transformers.cache_utils import DynamicCache
    kinds = []
    names = {type(m).__name__.lower() for m in model.modules()}
    if any(("moe" in n or "expert" in n or "sparse" in n) for n in names):
        kinds.append("MoE")
    layers = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if "DynamicSlidingWindowLayer" in layers:
        kinds.append("sliding window")
    if layers - {"DynamicLayer", "DynamicSlidingWindowLayer"}:
        kinds.append("recurrent/hybrid")
    return ", ".join(kinds) or "dense"


def _first_line(e) -> str:
    text = " ".join(str(e).split())
    return text[:160]


def _refusal(e: Exception) -> str:
    return f"refused: {type(e).__name__}: {_first_line(e)}"


def run(s, **kw):
    ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False, **kw)
    assert isinstance(ev, dj.Finished), ev
    return ev.result


def check(client, row: dict, path: str) -> dict:
    """Run every feature through the server and fill ``row``: "ok" or a typed refusal.
    Asserts exactness; any untyped failure propagates."""
    try:
        s = client.session(model=path)
    except dj.UnsupportedModelError as e:
        return {**row, "refused": _refusal(e)}
    try:
        row["blocks"] = s.info().get("architecture", "")
        assert s.layers == 2
        base = run(s)
        assert len(base.tokens) == N and np.isfinite(base.logits).all()
        # breakpoint: pause at every step, read, resume with no edit == uninterrupted
        s.breakpoint(layer=LAYER, phase="both")
        ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
        pauses = 0
        while isinstance(ev, dj.Paused):
            h = s.activation()
            assert h.shape == (ev.positions, s.hidden_size) and np.isfinite(h).all()
            pauses += 1
            ev = s.resume()
        assert pauses == N and ev.tokens == base.tokens
        assert np.array_equal(ev.result.logits, base.logits)
        s.clear_breakpoints()
        row["breakpoint"] = "ok"
        # steer: scale 1.0 and alpha 0 == no rule; scale 0.9 changes the logits
        s.steer(layer=LAYER, scale=1.0)
        assert np.array_equal(run(s).logits, base.logits)
        s.clear_steering()
        s.steer(layer=LAYER, add=np.ones(s.hidden_size, dtype=np.float32), alpha=0.0)
        assert np.array_equal(run(s).logits, base.logits)
        s.clear_steering()
        # (an added vector, not a scale: a scaled last block is undone by a final RMSNorm)
        vec = np.linspace(-1, 1, s.hidden_size).astype(np.float32)
        s.steer(layer=LAYER, add=vec, alpha=1.0, steps=[K])
        ruled = run(s)
        assert not np.array_equal(ruled.logits, base.logits)
        s.clear_steering()
        row["steer"] = "ok"
        # edit: a paused edit at step K == the same one-step rule
        s.breakpoint(layer=LAYER, steps=[K])
        ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
        assert isinstance(ev, dj.Paused) and ev.step == K
        s.edit(add=vec, alpha=1.0)
        ev = s.resume()
        assert np.array_equal(ev.result.logits, ruled.logits)
        s.clear_breakpoints()
        row["edit"] = "ok"
        # checkpoint mid-forward at step K (paused at block 0), restore, continue == base
        row["checkpoint"] = _checkpoint(s, base)
        # sites: scale 1.0 at each site is exact; a prefill breakpoint there pauses on it
        done, refused = [], []
        for site in SITES:
            try:
                s.steer(layer=LAYER, site=site, scale=1.0)
            except dj.UnsupportedModelError as e:
                refused.append(f"{site} ({_first_line(e)})")
                continue
            assert np.array_equal(run(s).logits, base.logits), site
            s.clear_steering()
            s.breakpoint(LAYER, phase="prefill", site=site)
            ev = s.generate(PROMPT, max_new_tokens=2)
            assert ev.paused and ev.site == site
            h = s.activation()
            assert h.shape[0] == ev.positions and np.isfinite(h).all()
            s.stop()
            s.clear_breakpoints()
            done.append(site)
        row["sites"] = ", ".join(["resid", *done]) + (
            "; refused: " + "; ".join(refused) if refused else "")
    finally:
        s.close()
    return row


def _checkpoint(s, base) -> str:
    s.breakpoint(layer=0, steps=[K])
    ev = s.generate(PROMPT, max_new_tokens=N, return_logits=True, stop_at_eos=False)
    assert isinstance(ev, dj.Paused) and ev.step == K
    try:
        ck = s.checkpoint()
    except dj.CheckpointError as e:
        s.stop()
        s.clear_breakpoints()
        return _refusal(e)
    ck.wait()
    assert s.resume().tokens == base.tokens
    s.restore(ck)
    ev = s.resume()
    assert isinstance(ev, dj.Paused) and ev.step == K
    ev = s.resume()
    assert ev.tokens == base.tokens and np.array_equal(ev.result.logits, base.logits)
    s.clear_breakpoints()
    return "ok"


# ---- one server per family: a kernel holds few models, the matrix has a hundred -------------
class Served:
    """A kernel server on a loopback port (port 0) and a client connected to it."""

    def __enter__(self):
        from kernel_server.kernel import Kernel
        from kernel_server.transport.server import KernelServer
        self.server = KernelServer(Kernel("tiny-gpt2", device="cpu"), "127.0.0.1", 0).start()
        self.client = dj.connect(self.server.address)
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        self.server.close()


def matrix_row(family: str, tmp: Path, tok) -> dict:
    """``family_row``, with a quarantined family's failure turned into its row (and its
    success into an AssertionError: take it off the list)."""
    if family not in QUARANTINE:
        return family_row(family, tmp, tok)
    try:
        row = family_row(family, tmp, tok)
    except Exception:
        return {"family": family, "quarantined": QUARANTINE[family]}
    raise AssertionError(f"{family} passes now ({row}): take it out of QUARANTINE")


def family_row(family: str, tmp: Path, tok) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row, path = build(family, tmp, tok)
    if path is None:
        return row
    with Served() as client:
        return check(client, row, str(path))


# ---- the table ----------------------------------------------------------------------------
COLUMNS = ("breakpoint", "edit", "steer", "checkpoint")


def render(rows: list[dict]) -> str:
    import transformers
    quarantined = [r for r in rows if "quarantined" in r]
    tested = [r for r in rows if not {"skip", "refused", "quarantined"} & set(r)]
    refused = [r for r in rows if "refused" in r]
    skipped = [r for r in rows if "skip" in r]
    full = [r for r in tested if all(r.get(c) == "ok" for c in COLUMNS)]
    out = [
        "# Architectures",
        "",
        "Generated by `python tests/integration/test_architectures.py` (do not edit by hand;",
        "`--check` fails when this table is stale). Every causal-LM family of transformers "
        f"{transformers.__version__}",
        "(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), built tiny and random-init from its config (2 decoder",
        "blocks, hidden 32 where the config allows, the tiny tokenizer's vocabulary), saved to a",
        "directory and loaded by a kernel server over loopback, CPU, float32. Each `ok` is bit-exact",
        "against an uninterrupted run: breakpoint (pause at every step, resume with no edit), edit",
        "(a paused edit == the same one-step rule), steer (scale 1.0 and alpha 0 == no rule),",
        "checkpoint (taken mid-forward, restored, continued == the original tokens and logits),",
        "sites (scale 1.0 at the site == no rule; a breakpoint there pauses on it).",
        "",
        f"{len(rows)} families: {len(tested)} tested ({len(full)} with every feature), "
        f"{len(refused)} refused by the server, {len(quarantined)} quarantined (fail today), "
        f"{len(skipped)} skipped (not counted as passing).",
        "",
        "Sliding-window caches (Mistral with `sliding_window`, Gemma 2/3, GPT-OSS, ...) are",
        "checkpointed while no layer has dropped a position yet (context below the window: the",
        "layer is then a plain cache); past that, `checkpoint()` is a `CheckpointError` naming the",
        "layer and the window. Recurrent/hybrid caches (Mamba, linear attention) are refused for",
        "checkpoints.",
        "",
        "## Tested",
        "",
        "| family | class | kind | " + " | ".join(COLUMNS) + " | sites |",
        "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |",
    ]
    for r in tested:
        out.append(f"| {r['family']} | {r.get('class', '')} | {r.get('layout', '')} | "
                   + " | ".join(_cell(r.get(c, "")) for c in COLUMNS)
                   + f" | {_cell(r.get('sites', ''))} |")
    out += ["", "## Refused by the server", "", "| family | class | error |", "| --- | --- | --- |"]
    out += [f"| {r['family']} | {r.get('class', '')} | {_cell(r['refused'])} |" for r in refused]
    out += ["", "## Quarantined (fail today)", "", "| family | what fails |", "| --- | --- |"]
    out += [f"| {r['family']} | {_cell(r['quarantined'])} |" for r in quarantined]
    out += ["", "## Skipped", "", "| family | reason |", "| --- | --- |"]
    out += [f"| {r['family']} | {_cell(r['skip'])} |" for r in skipped]
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


# ---- pytest ---------------------------------------------------------------------------------
ROWS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def tok():
    from kernel_server.model.loading import tiny_tokenizer
    return tiny_tokenizer()


@pytest.mark.parametrize("family", families())
def test_family(family, tok, tmp_path):
    ROWS[family] = row = matrix_row(family, tmp_path, tok)
    if "quarantined" in row:
        pytest.xfail(row["quarantined"])


def test_architecture_table_is_current():
    if set(ROWS) != set(families()):
        pytest.skip("the table is checked when the whole matrix ran")
    want = render([ROWS[f] for f in families()])
    assert TABLE.exists() and TABLE.read_text() == want, (
        "docs/architectures.md is stale: python tests/integration/test_architectures.py")


def test_mistral_past_its_window_is_a_clear_checkpoint_error(tok, tmp_path):
    """Mistral's sliding window (16 here) wraps at 16 positions: before that the cache is
    checkpointed (the matrix row), after it ``checkpoint()`` names the layer and window."""
    row, path = build("mistral", tmp_path, tok)
    assert path is not None and row["layout"] == "sliding window"
    with Served() as client:
        s = client.session(model=str(path))
        s.generate(PROMPT, max_new_tokens=20, stop_at_eos=False)
        with pytest.raises(dj.CheckpointError, match="sliding-window layer .*window 16"):
            s.checkpoint()


def main(argv: list[str]) -> int:
    import tempfile
    from kernel_server.model.loading import tiny_tokenizer
    tok = tiny_tokenizer()
    rows = []
    for family in families():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                rows.append(matrix_row(family, Path(tmp), tok))
            except Exception as e:
                rows.append({"family": family, "failed": f"{type(e).__name__}: {_first_line(e)}"})
                print(f"{family}: FAILED {rows[-1]['failed']}", file=sys.stderr)
    failed = [r for r in rows if "failed" in r]
    if failed:
        print(f"{len(failed)} families failed; no table written", file=sys.stderr)
        return 1
    text = render(rows)
    if "--check" in argv:
        if not TABLE.exists() or TABLE.read_text() != text:
            print(f"{TABLE} is stale: run python {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    TABLE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
