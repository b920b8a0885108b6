"""mirrorfast.kernels: contrastive losses. `info_nce` (functional.py) validates and dispatches to the
PyTorch reference (reference.py) or the fused Triton kernel (infonce_triton.py).

When the repository root is on sys.path (`python -m pytest` in a checkout), this folder is also
importable as a top-level `kernels`: the name under which transformers probes for Hugging Face's own
`kernels` package. Under that name the module stays empty (no __version__, so transformers counts the
package as absent) instead of loading a second copy of ours, which fails when mirrorfast is not installed.
"""

if __name__ == "mirrorfast.kernels":
    from mirrorfast.kernels.functional import info_nce, info_nce_reference, resolve_backend

    __all__ = ["info_nce", "info_nce_reference", "resolve_backend"]
