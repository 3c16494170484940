"""Count the SASS instructions of the logit-tile kernels (bf16, D = 512, 128x128 tiles, 8 warps, a full
super-block), compiled for sm_90 without a GPU, for the megabatch checkout given:

    python benchmarks/triton_sass_count.py .            # this checkout
    git worktree add /tmp/old <rev> && python benchmarks/triton_sass_count.py /tmp/old   # an older one

"fp32-ish" counts the FP32 ALU and MUFU instructions (the epilogue's cost); each thread holds 64
logits of a tile. A static count, not a timing: see triton_notes.md.
"""
import collections, os, re, subprocess, sys, tempfile
root = sys.argv[1]
sys.path.insert(0, os.path.join(root, "benchmarks"))
sys.path.insert(0, os.path.join(root, "src"))
import triton_aot_check as a
from megabatch.kernels import _triton_tiles as T
import inspect
dim, rows, cols, dtype = 512, 8192, 8192, "bf16"
tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, UPCAST=False, PRECISION="tf32")
if "EVEN" in inspect.signature(T.siglip_tile_kernel.fn).parameters:
    tile["EVEN"] = True
feats = dict(x_ptr=dtype, y_ptr=dtype, scale_ptr="fp32", rows=rows, cols=cols, dim=dim, stride_xm=dim, stride_xk=1,
             stride_yn=dim, stride_yk=1)
sig = dict(tile, G_SCALE=1.0, DIAGONAL=False, WRITE_G=True)
if "PRECISE_LOG1P" in inspect.signature(T.siglip_tile_kernel.fn).parameters:
    sig["PRECISE_LOG1P"] = False
jobs = {
    "siglip_tile": (T.siglip_tile_kernel, dict(feats, bias_ptr="fp32", g_ptr=dtype, loss_ptr="fp32", gbias_ptr="fp32",
                                                diag_offset=0, stride_g=cols), sig),
    "clip_grad_tile": (T.clip_grad_tile_kernel, dict(feats, row_hi_ptr="fp32", row_lo_ptr="fp32", col_hi_ptr="fp32",
                                                     col_lo_ptr="fp32", g_ptr=dtype, diag_offset=0, stride_g=cols),
                       dict(tile, G_SCALE=1.0, DIAGONAL=False)),
    "clip_stats": (T.clip_stats_kernel, dict(feats, row_m_ptr="fp32", row_l_ptr="fp32", col_m_ptr="fp32", col_l_ptr="fp32",
                                             stride_rowpart=rows, stride_colpart=cols), tile),
}
for name, (fn, args, consts) in jobs.items():
    k = a.compile_like_jit(fn, args, consts, 8, 3)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        sass = subprocess.run([a.CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[\.\s]", sass)
    c = collections.Counter(ops)
    alu = sum(v for k_, v in c.items() if k_ in ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "MUFU", "F2FP", "FSETP"))
    print(f"{name:15} total {len(ops):5}  fp32-ish {alu:5}  " + " ".join(f"{k_}:{v}" for k_, v in c.most_common(12)))
