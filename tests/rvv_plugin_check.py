"""Runs inside a riscv64 Python under qemu-user (tests/test_rvv_qemu.py starts it): every op
of the `rvv` plugin, through the plugin interface, against numpy. Needs only numpy: no
torch, no onnx. Prints one line per case and ends with "N passed, N failed"."""

import sys
from types import SimpleNamespace

import numpy as np

from hw_plugins.cpu import RvvPlugin

rng = np.random.default_rng(0)
passed = failed = 0


def check(name: str, got: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    global passed, failed
    err = float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))
    ok = err <= tol
    passed, failed = passed + ok, failed + (not ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {err:.2e}")


def run(plugin, op: str, attrs: dict, ins: list, out_shape: tuple) -> np.ndarray:
    out = plugin.alloc(out_shape, "float32")
    node = SimpleNamespace(op_type=op, attrs=attrs)
    extra = [ins[3], ins[4]] if op == "PagedAttention" else []
    plugin.run(node, [plugin.upload(x) for x in ins], [out] + extra)
    plugin.synchronize()
    return plugin.download(out)


def int8_x_reference(x: np.ndarray, deq: np.ndarray) -> np.ndarray:
    """What the int8 dot-product path (T <= 4) computes exactly, up to summation order: x
    quantised per 32-block (d = amax / 127, q rounded half away from zero) times the dequantised
    weights, Q4_1's offset included (csrc/include/pxl_kernels.h, pxl_qx)."""
    T, K = x.shape
    xb = x.reshape(T, K // 32, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = xb * inv[..., None]
    xq = (np.sign(v) * np.floor(np.abs(v) + 0.5)) * d[..., None]
    return xq.reshape(T, K).astype(np.float64) @ deq.T.astype(np.float64)


def moe_reference(ins: list[np.ndarray], k: int, norm: bool) -> np.ndarray:
    x, logits, wg, wu, wd = (a.astype(np.float64) for a in ins[:5])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(len(x)):
        top = np.argsort(-p[t])[:k]
        w = p[t, top] / (p[t, top].sum() if norm else 1)
        for e, we in zip(top, w):
            g, u = wg[e] @ x[t], wu[e] @ x[t]
            y[t] += we * (wd[e] @ (g / (1 + np.exp(-g)) * u))
    if len(ins) > 5:
        y += ins[5] / (1 + np.exp(-ins[6].astype(np.float64)))
    return y


def quantize(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """GGUF blocks by hand (numpy only) -> (uint8 rows, exact dequantised weights)."""
    N, K = w.shape
    b = w.reshape(N, K // 32, 32)
    if fmt == "q8_0":
        d = (np.abs(b).max(-1) / 127).astype(np.float16)
        q = np.round(b / np.maximum(d.astype(np.float32), 1e-30)[..., None]).clip(-127, 127).astype(np.int8)
        blocks = np.concatenate([d.view(np.uint8).reshape(N, -1, 2), q.view(np.uint8)], -1)
        deq = d.astype(np.float32)[..., None] * q
    else:
        lo, hi = b.min(-1), b.max(-1)
        if fmt == "q4_0":
            d = (np.abs(b).max(-1) / 8).astype(np.float16)
            m = -8 * d.astype(np.float32)
        else:
            d, m16 = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
            m = m16.astype(np.float32)
        q = np.round((b - m[..., None]) / np.maximum(d.astype(np.float32), 1e-30)[..., None]).clip(0, 15)
        q = q.astype(np.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        head = [d.view(np.uint8).reshape(N, -1, 2)] + ([] if fmt == "q4_0" else [m16.view(np.uint8).reshape(N, -1, 2)])
        blocks = np.concatenate(head + [packed], -1)
        deq = d.astype(np.float32)[..., None] * q + m[..., None]
    return np.ascontiguousarray(blocks.reshape(N, -1)), deq.reshape(N, K)


def main() -> int:
    plugin = RvvPlugin()
    if not plugin.is_available():
        print("rvv plugin unavailable:", plugin.unavailable_reason())
        return 2
    print("kernel set:", plugin.lib.pxl_isa().decode())
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    for T, N, K in [(1, 40, 96), (5, 33, 70), (9, 64, 128)]:
        x, w, b = f(T, K), f(N, K), f(N)
        check(f"Linear fp32 T={T} N={N} K={K}", run(plugin, "Linear", {}, [x, w, b], (T, N)), x @ w.T + b)
        if K % 32 == 0:
            for fmt in ("q8_0", "q4_0", "q4_1"):
                blocks, deq = quantize(w, fmt)
                ref = int8_x_reference(x, deq) if T <= 4 else x @ deq.T
                check(f"Linear {fmt} T={T} N={N} K={K}",
                      run(plugin, "Linear", {"weight_format": fmt}, [x, blocks], (T, N)), ref, 1e-4)
    x, wn = f(6, 64), f(64)
    ref = wn * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    check("RMSNorm", run(plugin, "RMSNorm", {"epsilon": 1e-5}, [x, wn], (6, 64)), ref)
    a, c = f(6, 48), f(6, 48)
    check("SiluMul", run(plugin, "SiluMul", {}, [a, c], (6, 48)), a / (1 + np.exp(-a.astype(np.float64))) * c)
    check("Add", run(plugin, "Add", {}, [a, c], (6, 48)), a.astype(np.float64) + c)
    table, idx = f(50, 16), np.array([3, 0, 49, 7], np.int64)
    check("Gather", run(plugin, "Gather", {"axis": 0}, [table, idx], (4, 16)), table[idx])
    hd, H = 8, 4
    pos = np.array([0, 5, 17, 3], np.int64)
    ang = np.arange(32)[:, None] / 10000 ** (np.arange(hd // 2) * 2 / hd)[None]
    cos = np.cos(np.concatenate([ang, ang], 1)).astype(np.float32)
    sin = np.sin(np.concatenate([ang, ang], 1)).astype(np.float32)
    xr = f(4, H * hd)
    xh = xr.reshape(4, H, hd).astype(np.float64)
    rot = np.concatenate([-xh[..., hd // 2:], xh[..., :hd // 2]], -1)
    ref = (xh * cos[pos][:, None] + rot * sin[pos][:, None]).reshape(4, -1)
    check("RoPE", run(plugin, "RoPE", {"head_dim": hd}, [xr, pos, cos, sin], (4, H * hd)), ref)
    # attention: one sequence, 3 cached tokens + a 2-token chunk, GQA 4 heads over 2; head dim 8
    # (the scalar loops) on a float32 cache, 16 (the vector code) on an f16 one (kv_cache_dtype
    # "float16": this step's keys and values rounded as they are stored)
    for hd, cache in [(8, np.float32), (16, np.float16)]:
        Hkv, BS = 2, 4
        kc, vc = f(4, BS, Hkv, hd).astype(cache), f(4, BS, Hkv, hd).astype(cache)
        q, k, v = f(2, H * hd), f(2, Hkv * hd), f(2, Hkv * hd)
        tables, seq = np.array([[2, 0]], np.int64), np.array([5], np.int64)
        slots = np.array([2 * BS + 3, 0 * BS + 0], np.int64)
        attrs = {"num_heads": H, "num_kv_heads": Hkv, "head_dim": hd, "scale": hd ** -0.5, "sliding_window": 0}
        kf, vf = kc.copy(), vc.copy()
        kf.reshape(-1, Hkv, hd)[slots], vf.reshape(-1, Hkv, hd)[slots] = k.reshape(2, Hkv, hd), v.reshape(2, Hkv, hd)
        keys = np.concatenate([kf[2], kf[0]])[:5].astype(np.float64)          # (5, Hkv, hd) in position order
        vals = np.concatenate([vf[2], vf[0]])[:5].astype(np.float64)
        ref = np.zeros((2, H, hd))
        for t, p in enumerate([3, 4]):
            for h in range(H):
                s = keys[: p + 1, h // 2] @ q.reshape(2, H, hd)[t, h] * hd ** -0.5
                e = np.exp(s - s.max())
                ref[t, h] = e / e.sum() @ vals[: p + 1, h // 2]
        ins = [q, k, v, kc, vc, slots, tables, seq, np.array([0, 2], np.int64)]
        check(f"PagedAttention hd={hd} {np.dtype(cache).name} cache",
              run(plugin, "PagedAttention", attrs, ins, (2, H * hd)), ref.reshape(2, -1))
    for T, shared in [(1, False), (5, True)]:  # MoE: 5 experts, top 2, expert 4 without tokens
        x, logits, D, F, E = f(T, 32), f(T, 5) * 2, 32, 48, 5
        logits[:, 4] = -30
        wg, wu, wd = f(E, F, D) / 6, f(E, F, D) / 6, f(E, D, F) / 7
        ins = [x, logits, wg, wu, wd] + ([f(T, D), f(T, 1)] if shared else [])
        check(f"MoE T={T} shared={shared}", run(plugin, "MoE", {"top_k": 2, "norm_topk_prob": int(not shared)}, ins,
                                                (T, D)), moe_reference(ins, 2, not shared))
    # LoRA: 3 slots of rank 4 on a (T, 40) Linear output; slot -1 rows keep y
    T, K, N, L, R = 6, 24, 40, 3, 4
    x, y, a, b = f(T, K), f(T, N), f(L, R, K), f(L, N, R)
    scale, ids = np.array([0.5, 2.0, 1.5], np.float32), np.array([2, -1, 0, 2, -1, 0], np.int64)
    ref = y.astype(np.float64).copy()
    for t, l in enumerate(ids):
        if l >= 0:
            ref[t] += scale[l] * (a[l].astype(np.float64) @ x[t]) @ b[l].T.astype(np.float64)
    check("LoRA", run(plugin, "LoRA", {}, [x, y, a, b, scale, ids], (T, N)), ref)
    print(f"{passed} passed, {failed} failed")
    return failed != 0


if __name__ == "__main__":
    sys.exit(main())
