"""The Triton kernel behind triton_paged_attention.decode_attention (see that module for what and why).

A module of its own because it imports triton at the top: Triton's interpreter (TRITON_INTERPRET=1,
read when @triton.jit runs) resolves `tl` among the kernel's module globals, and the wrapper module
must import without triton. Imported on the first call of decode_attention.
"""

import triton
import triton.language as tl


@triton.jit
def _widen(x, KIND: tl.constexpr):
    # cache elements -> float32: the value (model dtype), the code (int8), or code * 2**-8 (fp8 bytes)
    if KIND == 2:
        # the int8 byte sign-extends into bits 8.., so after << 7 the sign sits in bits 14 and 15:
        # clearing 14 leaves s.eeee.mmm at fp16 bits 15 and 13..7 (as fp8_e4m3_to_scaled)
        bits = ((x.to(tl.int32) << 7) & 0xBFFF).to(tl.int16)
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def decode_kernel(
    q_ptr,
    cache_ptr,
    tables_ptr,
    lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    scale,
    window,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_tb,
    stride_kv,
    stride_ch,
    stride_cb,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KIND: tl.constexpr,
):
    """Grid (sequences, KV heads). KIND: 0 model dtype, 1 int8 codes, 2 fp8 bytes (as int8). window > 0: the
    query (at position ctx - 1) sees keys ctx - window .. ctx - 1 only (transformers' key > query - window)."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + g
    qo_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qo_mask, other=0.0)
    q = q.to(tl.float32)
    if KIND != 0:  # q . (k * s) == (q * s) . k; _widen's 2**-8 is undone in the scales, exactly
        q = q * (tl.load(k_scale_ptr + kvh) * (256.0 if KIND == 2 else 1.0))
    ctx = tl.load(lens_ptr + seq)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    k_base = cache_ptr + kvh.to(tl.int64) * stride_ch
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    for start in range(first, ctx, BLOCK_N):
        tok = start + n
        valid = tok < ctx
        block = tl.load(table + tok // BLOCK_SIZE, mask=valid, other=0)  # int64: block * stride cannot overflow
        offs = (block * stride_cb + (tok % BLOCK_SIZE) * HEAD_DIM)[:, None] + d[None, :]
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = _widen(tl.load(k_base + offs, mask=kv_mask, other=0), KIND)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite from the first tile on: ctx >= 1
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = _widen(tl.load(k_base + stride_kv + offs, mask=kv_mask, other=0), KIND)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    out = acc / total[:, None]
    if KIND != 0:
        out = out * (tl.load(v_scale_ptr + kvh) * (256.0 if KIND == 2 else 1.0))
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :], out, mask=qo_mask)  # float32
