"""The Triton kernels of the server's deterministic decode path. Imported on first use only
(importing kernel_server needs no Triton), and Triton decides when this module is imported
whether the kernels compile or run in its interpreter (``TRITON_INTERPRET=1``, CPU tensors:
the tests without a GPU): set it before the first call in a process.

- ``split_kernel`` + ``combine_kernel``: single-query split-KV attention
  (kernel_server/model/exact_attention.py says what it guarantees and why);
- ``rms_norm_kernel``: the RMSNorm of Llama-like models, one program per row
  (kernel_server/model/lane_kernels.py: used inside the engine's lane steps only).

No autotuning and no atomics anywhere: a configuration is a function of the shape of one
row (head size, hidden size), never of the batch, so a row's bits do not depend on the
other rows.
"""
import triton
import triton.language as tl


@triton.jit
def attend_block(q, q1, k_base, v_base, n, attend, d, d_ok, sk_n, sv_n, scale,
                 m_i, l_i, acc, G_PAD: tl.constexpr):
    # one block of positions ``n`` (``attend``: the ones in use) into a split's running
    # max, sum and accumulator (online softmax); the same code on both paths below
    kv_ok = attend[:, None] & d_ok[None, :]
    k = tl.load(k_base + n[:, None] * sk_n + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
    v = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
    if G_PAD == 1:
        s = tl.sum(k * q1[None, :], axis=1) * scale                     # [BLOCK_N]
        s = tl.where(attend, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))                      # [1]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - tl.sum(m_safe, axis=0))
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[:, None] + tl.sum(p[:, None] * v, axis=0)[None, :]
    else:
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale   # [G_PAD, BLOCK_N]
        s = tl.where(attend[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def store_part(Opart, Mpart, Lpart, part, g, d, acc, m_i, l_i,
               G_PAD: tl.constexpr, D_PAD: tl.constexpr):
    # a split's accumulator, running max and sum, for the combine kernel
    tl.store(Opart + (part * G_PAD + g)[:, None] * D_PAD + d[None, :], acc)
    tl.store(Mpart + part * G_PAD + g, m_i)
    tl.store(Lpart + part * G_PAD + g, l_i)


# One compiled binary serves every call of a head shape: the mask is a runtime flag and
# the integers that change from call to call are not specialised on, so eager decode
# (a DynamicCache, no mask) and the static cache (a mask) run the very same code.
# RANGED (the engine's lane steps): each row's attended positions are the range
# First[b]..Last[b], read from the device instead of a mask; a program then walks only
# the blocks of its row's range and serves ``grid_splits`` splits one after another (a
# lane of few blocks launches few programs per row: padding rows cost next to nothing)
@triton.jit(do_not_specialize=["n_pos", "has_mask", "sm_b", "sm_n", "grid_splits"])
def split_kernel(Q, K, V, Mask, First, Last, Opart, Mpart, Lpart,
                 sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_n, s_first, s_last,
                 n_pos, has_mask, kv_heads, scale, grid_splits,
                 GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                 D_PAD: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 RANGED: tl.constexpr):
    bh = tl.program_id(0)                  # batch row * kv_heads + key/value head
    b = bh // kv_heads
    kvh = bh % kv_heads
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    q_ptr = Q + b * sq_b + (kvh * GROUPS + g)[:, None] * sq_h + d[None, :]
    q = tl.load(q_ptr, mask=(g < GROUPS)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if G_PAD == 1:
        q1 = tl.sum(q, axis=0)                                        # [D_PAD]
    else:
        q1 = q                                                        # (unused)
    if RANGED:
        lo = tl.load(First + b * s_first).to(tl.int32)
        hi = tl.minimum(tl.load(Last + b * s_last).to(tl.int32), n_pos - 1)
        j_lo = lo // BLOCK_N
        j_end = tl.where(lo <= hi, hi // BLOCK_N + 1, j_lo)          # empty range: no block
        for split in range(tl.program_id(1), SPLITS, grid_splits):
            m_i = tl.full([G_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, D_PAD], tl.float32)
            # the blocks of this split (j % SPLITS == split) that meet the range, in
            # increasing j: exactly the blocks the mask path reads for this split
            for j in range(j_lo + (split - j_lo % SPLITS + SPLITS) % SPLITS, j_end, SPLITS):
                n = j * BLOCK_N + tl.arange(0, BLOCK_N)
                attend = (n >= lo) & (n <= hi)
                m_i, l_i, acc = attend_block(q, q1, k_base, v_base, n, attend, d, d_ok,
                                             sk_n, sv_n, scale, m_i, l_i, acc, G_PAD)
            store_part(Opart, Mpart, Lpart, bh * SPLITS + split, g, d, acc, m_i, l_i, G_PAD, D_PAD)
    else:
        split = tl.program_id(1)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        # block j of the cache goes to split j % SPLITS, in increasing j: the partition
        # does not depend on the cache's length, and blocks with no attended position are
        # skipped (never read); a masked lane reads 0 and scores -inf wherever it lies
        for j in range(split, tl.cdiv(n_pos, BLOCK_N), SPLITS):
            n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            attend = n < n_pos
            if has_mask != 0:
                mv = tl.load(Mask + b * sm_b + n * sm_n, mask=attend, other=0)
                attend = attend & (mv != 0)
            if tl.max(attend.to(tl.int32), axis=0) > 0:
                m_i, l_i, acc = attend_block(q, q1, k_base, v_base, n, attend, d, d_ok,
                                             sk_n, sv_n, scale, m_i, l_i, acc, G_PAD)
        store_part(Opart, Mpart, Lpart, bh * SPLITS + split, g, d, acc, m_i, l_i, G_PAD, D_PAD)


@triton.jit
def combine_kernel(Opart, Mpart, Lpart, Out, so_b, so_h, kv_heads,
                   GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   D_PAD: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // kv_heads
    kvh = bh % kv_heads
    s = tl.arange(0, SPLITS)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    rows = (bh * SPLITS + s)[:, None] * G_PAD + g[None, :]                # [SPLITS, G_PAD]
    m = tl.load(Mpart + rows)
    l = tl.load(Lpart + rows)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_safe[None, :])                                       # empty split: 0
    denom = tl.sum(w * l, axis=0)
    o = tl.load(Opart + rows[:, :, None] * D_PAD + d[None, None, :])     # [SPLITS, G_PAD, D_PAD]
    out = tl.sum(w[:, :, None] * o, axis=0) / denom[:, None]
    ok = (g < GROUPS)[:, None] & (d < D)[None, :]
    tl.store(Out + b * so_b + (kvh * GROUPS + g)[:, None] * so_h + d[None, :],
             out.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def rms_norm_kernel(X, W, Y, sx, sy, n, eps, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    # one row: float32 sum of squares over the row in fixed chunks (the same order whatever
    # the other rows), mean, rsqrt(mean + eps); x * that rounded to the input dtype, then
    # times the weight, rounded again: LlamaRMSNorm's forward, op for op
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for c in range(CHUNKS):
        off = c * BLOCK + cols
        x = tl.load(X + row * sx + off, mask=off < n, other=0.0).to(tl.float32)
        acc += x * x
    inv = tl.rsqrt(tl.sum(acc, axis=0) / n + eps)
    for c in range(CHUNKS):
        off = c * BLOCK + cols
        ok = off < n
        x = tl.load(X + row * sx + off, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + off, mask=ok, other=0.0).to(tl.float32)
        h = (x * inv).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * sy + off, (w * h).to(Y.dtype.element_ty), mask=ok)
