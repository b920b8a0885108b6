#!/usr/bin/env python
"""Registers and spills of mirrorfast's Triton kernels, compiled ahead of time for a GPU, without one.

    python benchmarks/kernel_registers.py                 # table for sm_90a (H100/H200)
    python benchmarks/kernel_registers.py --arch 80       # A100
    python benchmarks/kernel_registers.py --check         # exit 1 if a default launch configuration spills
    python benchmarks/kernel_registers.py --sweep 16384,768   # the InfoNCE sweep's candidate configs

Another Triton version (the GPU image has 3.6.0): run it with a venv that has it, e.g.
`python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0`.

Each kernel is compiled by Triton for the target (`triton.compile` with a GPUTarget: Triton's own passes and
its bundled ptxas, no driver needed) with the compile-time arguments and launch options its launcher uses
(`fwd_meta`/`bwd_meta`/`norm_meta`, `_class_launches`, `_launch_args`), and ptxas -v reports the registers per
thread and the bytes spilled to local memory. A spill in a hot kernel is slow local-memory traffic in every
program, so `--check` (run by the tests) holds the default configurations to zero. Listed but not checked:
the 128-token attention class (it spills at every warp count; views over 64 tokens are rare) and
the InfoNCE kernels at N=16384, in fp32 and in the split variant (see `cases`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_registers: unset TRITON_INTERPRET (the interpreter compiles nothing)")
# Triton 3.9 warns while its default is unset; "1" is that default, the one the kernels run with.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from from_checkout import ensure_importable  # noqa: E402
from info_nce_table import sweep_spec  # noqa: E402
from script_main import run_main  # noqa: E402

ensure_importable()
import torch  # noqa: E402
import triton  # noqa: E402

_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
            torch.int64: "*i64", torch.int8: "*i8"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
# --arch values compiled here with Triton 3.9 (2026-11-28); others abort inside LLVM (12: no such processor; 88: its
# PTX version is newer than Triton emits). Also held to what the ptxas in use lists (another Triton's may lack some).
ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 107, 110, 120, 121)


def compile_kernel(fn, arch: int, runtime: dict, meta: dict):
    """fn: a @triton.jit kernel; runtime: name -> torch.dtype (a pointer to it), int or float; meta: the
    constexprs and launch options. Returns the compiled kernel (its PTX in .asm["ptx"]).

    Each runtime argument is specialized as Triton's JIT does at a launch (its own `native_specialize_impl`):
    an int equal to 1 becomes a constant, an int divisible by 16 and every pointer get a divisibility-16 hint
    (pointers are assumed 16-byte aligned, as PyTorch's allocations and the launchers' views are). Without
    those hints the compiler cannot prove loads contiguous and aligned, does not vectorize them, and reports
    registers and spills that no launch on the GPU has."""
    from triton._C.libtriton import native_specialize_impl  # Triton 3.6 (the GPU image's) and newer
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", meta[param.name]
            continue
        value = runtime[param.name]
        align = not param.do_not_specialize_on_alignment
        if isinstance(value, torch.dtype):
            kind, hint = _POINTER[value], "D" if align else None
        else:
            kind, hint = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, align)
        if kind == "constexpr":  # an int equal to 1
            signature[param.name], constexprs[param.name] = "constexpr", hint
        else:
            signature[param.name] = kind
            if hint:
                attrs[(index,)] = BaseBackend.parse_attr(hint)
    options = {k: meta[k] for k in _OPTIONS if k in meta}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas() -> str:
    # Triton's newest bundled ptxas (it compiles the PTX Triton emits); TRITON_PTXAS_PATH wins if set.
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [p for p in (os.environ.get("TRITON_PTXAS_PATH"), folder / "ptxas-blackwell", folder / "ptxas") if p]
    return str(next(p for p in found if Path(p).is_file()))


def _gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def supported_archs() -> list[int]:
    """ARCHS whose GPU name (_gpu_name) the ptxas in use accepts: its --help lists them (all of ARCHS if it lists
    none, e.g. another format)."""
    listed = set(re.findall(r"'(sm_\w+)'", subprocess.run([_ptxas(), "--help"], capture_output=True, text=True).stdout))
    return [a for a in ARCHS if not listed or _gpu_name(a) in listed]


def registers_and_spills(kernel, arch: int) -> tuple[int, int]:
    gpu = _gpu_name(arch)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    if out.returncode != 0 or regs is None:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()[-500:]}")
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return int(regs.group(1)), int(spill.group(1)) if spill else 0


def infonce_cases(n2: int, d: int, dtype: torch.dtype, cfg, label: str, checked: bool):
    """(name, kernel, runtime args, meta, checked) for the InfoNCE launches of one KernelConfig."""
    from mirrorfast.kernels import infonce_triton as nce

    f32, n = torch.float32, n2 // 2
    common = dict(a_ptr=dtype, b_ptr=dtype, N=n, D=d, stride_a=d, stride_b=d)
    if not cfg.fused_norm:
        yield f"{label} norms", nce._row_norm_kernel, dict(common, norm_ptr=f32), nce.norm_meta(n, d), checked
    yield (f"{label} forward", nce._infonce_fwd_kernel,
           dict(common, norm_ptr=f32, norm_col_ptr=f32, lse_ptr=f32, loss_ptr=f32, part_ptr=f32, scale2=1.0,
                eps=1e-12),
           nce.fwd_meta(cfg, dtype), checked)
    if cfg.fwd_split > 1:
        yield (f"{label} merge", nce._infonce_merge_kernel,
               dict(part_ptr=f32, lse_ptr=f32, loss_ptr=f32, total_ptr=f32, N2=n2, total_scale=1.0 / n2),
               dict(nce.merge_meta(n), NUM_SPLIT=cfg.fwd_split), checked)
    if cfg.stripe_rows:  # the backward through stripes: its three kernels instead of the fused one
        rows, cols = min(cfg.stripe_rows, n), min(cfg.stripe_cols, n)
        stripe = dict(R=rows, D=d, stride_xi=d, eps=1e-12)
        yield (f"{label} stripe weights", nce._infonce_bwd_weights_kernel,
               dict(stripe, xi_ptr=dtype, xj_ptr=dtype, norm_ptr=f32, norm_col_ptr=f32, lse_ptr=f32, w_ptr=f32,
                    wref_ptr=f32, rmax_ptr=f32, wt_ptr=dtype, C=cols, N=n, stride_xj=d, stride_wt=cols, w_stride=0,
                    row0=0, col0=cols, scale2=1.0),
               nce.weights_meta(cfg, dtype), checked)
        yield (f"{label} stripe product", nce._infonce_bwd_stripe_mm_kernel,
               dict(wt_ptr=dtype, xj_ptr=dtype, dz_ptr=f32, R=rows, C=cols, D=d, stride_wt=cols, stride_xj=d),
               dict(nce.stripe_mm_meta(cfg, dtype), ACCUMULATE=True), checked)
        yield (f"{label} stripe finalize", nce._infonce_bwd_stripe_finalize_kernel,
               dict(stripe, xi_ptr=dtype, dz_ptr=f32, norm_ptr=f32, wref_ptr=f32, rmax_ptr=f32, dx_ptr=dtype,
                    stride_dx=d, row0=0, out_scale=1.0),
               nce.stripe_finalize_meta(rows, d, dtype), checked)
        return
    yield (f"{label} backward", nce._infonce_bwd_kernel,
           dict(common, norm_ptr=f32, norm_col_ptr=f32, lse_ptr=f32, w_ptr=f32, wref_ptr=f32, da_ptr=dtype, db_ptr=dtype,
                part_ptr=f32, zpart_ptr=f32, stride_da=d, stride_db=d, w_stride=0, scale2=1.0, out_scale=1.0,
                c_scale=1.0, eps=1e-12),
           nce.bwd_meta(cfg, dtype), checked)
    if cfg.bwd_split > 1:
        yield (f"{label} finalize", nce._infonce_bwd_finalize_kernel,
               dict(common, norm_ptr=f32, part_ptr=f32, zpart_ptr=f32, da_ptr=dtype, db_ptr=dtype, stride_da=d,
                    stride_db=d, eps=1e-12),
               dict(nce.finalize_meta(n, d), NUM_SPLIT=cfg.bwd_split), checked)


def cases():
    """(name, kernel, runtime args, meta, checked) for every default launch configuration."""
    from info_nce_table import fused_config, split_config

    from mirrorfast.kernels import infonce_triton as nce
    from mirrorfast.kernels import packed_attention_triton as attn
    from mirrorfast.kernels import residual_layernorm_triton as rln

    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    for n2, d, dtype in ((400, 768, torch.bfloat16), (400, 768, torch.float16), (400, 384, torch.bfloat16),
                         (32768, 768, torch.float16), (400, 768, f32)):
        # Checked: the 16-bit configurations of a training batch (N=200). Listed only: N=16384 (its block
        # sizes were chosen by timing on GPUs with Triton 3.6: the forward's and the stripes' on an H200,
        # 2026-11-27; registers reported by another Triton are a lead, not a verdict) and fp32 (training
        # hands the loss 16-bit views).
        yield from infonce_cases(n2, d, dtype, nce.pick_config(n2, d, dtype),
                                 f"InfoNCE N={n2 // 2} D={d} {str(dtype)[6:]}", dtype != f32 and n2 <= 1024)
    # The split variant info_nce_table times (opt-in), listed only: compiled without fp contraction (as every
    # loss kernel is since 2026-11-27) its forward keeps 128 registers and spills 12 bytes (bf16 with Triton 3.9;
    # bf16 and fp16 with 3.6), 139 / 0 before; timed so on an H100 the same day: 54.2 vs 52.9 µs a graph replay.
    for dtype in (torch.bfloat16, torch.float16):
        yield from infonce_cases(400, 768, dtype, split_config(400, 768, dtype),
                                 f"InfoNCE N=200 D=768 {str(dtype)[6:]} split", False)
    # The fused backward info_nce_table times next to the default's stripes for large problems, listed only.
    for dtype in (torch.float16, torch.bfloat16):
        yield from (case for case in infonce_cases(32768, 768, dtype, fused_config(32768, 768, dtype),
                                                   f"InfoNCE N=16384 D=768 {str(dtype)[6:]} fused", False)
                    if case[0].endswith("backward"))
    for heads, head_dim in ((12, 64), (12, 32)):  # BERT-base, MiniLM-L6
        q = torch.empty(1, heads, head_dim, dtype=torch.bfloat16, device="meta")  # a GPU tensor's launch arguments
        bf = torch.bfloat16
        common = dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, cu_ptr=i32, seed_ptr=i64, stride_t=heads * head_dim,
                      stride_h=head_dim, H=heads, D=head_dim, scale=0.125, p_drop=0.1)
        for meta in attn._class_launches(q, attn.MAX_VIEW_TOKENS, 0.1):
            label = f"attention {meta['BLOCK_L']}-token views, head dim {head_dim}, bf16"
            checked = meta["BLOCK_L"] < attn.MAX_VIEW_TOKENS
            top = dict(top_l=meta["top_l"])  # a runtime argument the launch helper hands over with the meta
            yield f"{label} forward", attn._packed_attention_fwd_kernel, dict(common, o_ptr=bf, **top), meta, checked
            yield (f"{label} backward", attn._packed_attention_bwd_kernel,
                   dict(common, do_ptr=bf, dq_ptr=bf, dk_ptr=bf, dv_ptr=bf, **top), meta, checked)
    for h_dim in (768, 384):
        for h_dtype, res_dtype in ((torch.bfloat16, f32), (torch.bfloat16, torch.bfloat16)):
            meta = dict(rln._launch_args(h_dim), DROPOUT=True)
            out = torch.promote_types(h_dtype, res_dtype)
            label = f"residual LayerNorm H={h_dim} {str(h_dtype)[6:]}+{str(res_dtype)[6:]}"
            yield (f"{label} forward", rln._fwd_kernel,
                   dict(h_ptr=h_dtype, res_ptr=res_dtype, w_ptr=res_dtype, b_ptr=res_dtype, y_ptr=out, s_ptr=out,
                        mean_ptr=f32, rstd_ptr=f32, seed_ptr=i64, T=6144, H=h_dim, eps=1e-12, p_drop=0.1), meta, True)
            yield (f"{label} backward", rln._bwd_kernel,
                   dict(dy_ptr=out, s_ptr=out, w_ptr=res_dtype, mean_ptr=f32, rstd_ptr=f32, dh_ptr=h_dtype,
                        dres_ptr=res_dtype, dw_part_ptr=f32, db_part_ptr=f32, seed_ptr=i64, T=6144, H=h_dim,
                        p_drop=0.1), meta, True)


def sweep_cases(spec: tuple[int, int, str]):
    """The InfoNCE block-size sweep of `info_nce_table.py --sweep N,D[,dtype]` (spec: as sweep_spec parses it),
    statically: each candidate's forward or backward kernel."""
    from info_nce_table import sweep_candidates

    n, d, dtype = spec[0], spec[1], getattr(torch, spec[2])
    kernels = {"fwd": ("forward", "merge"), "bwd": ("backward", "finalize", "weights", "product")}
    for kind, candidate, precision, cfg in sweep_candidates(n, d, dtype):
        label = f"InfoNCE {candidate}{' ' + precision if dtype == torch.float32 else ''}"
        yield from (case for case in infonce_cases(2 * n, d, dtype, cfg, label, False)
                    if case[0].endswith(kernels[kind]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a checked configuration spills")
    parser.add_argument("--sweep", metavar="N,D[,dtype]", type=sweep_spec,
                        help="instead: every InfoNCE config that `info_nce_table.py --sweep N,D[,dtype]` times")
    args = parser.parse_args(argv)
    archs = supported_archs()
    if args.arch not in archs:
        parser.error(f"--arch {args.arch}: not one this script compiles for; one of {', '.join(map(str, archs))}")
    print(f"Triton {triton.__version__}, ptxas {Path(_ptxas()).name}, {_gpu_name(args.arch)}; "
          "registers per thread, bytes spilled (stores)")
    failures = []
    for name, fn, runtime, meta, checked in (sweep_cases(args.sweep) if args.sweep else cases()):
        regs, spilled = registers_and_spills(compile_kernel(fn, args.arch, runtime, meta), args.arch)
        flag = "" if not spilled else " SPILLS" if checked else " spills (not checked)"
        print(f"  {name:<58} warps {meta.get('num_warps', 4):>2}  regs {regs:>3}  spill {spilled:>6}{flag}", flush=True)
        if checked and spilled:
            failures.append(name)
    if args.check and failures:
        print(f"kernel_registers: {len(failures)} default configuration(s) spill: {', '.join(failures)}")
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(run_main(main, "kernel_registers"))
