"""Print the PTX Triton generates for one of our kernels, for any CUDA target, without a GPU.

Run as a script in a process without TRITON_INTERPRET (under the interpreter the kernels are not
compiled); tests/test_kernels.py calls it through ``subprocess``. One JSON argument:
``{"kernel": "quartet_compile.kernels.gemm._dot_scaled_kernel", "types": {arg: "*u8" | "i32"
| ...}, "consts": {arg: value}, "aligned": [integer args Triton is told are multiples of 16],
"capability": 90, "warps": 4}``. Pointers are always 16-byte aligned, as torch allocates them.

A JSON list of such specs compiles them all in the one process (importing torch and the package
takes longer than a compile) and prints a JSON list with, for each, ``{"ptx": ...}`` or
``{"error": ...}``: one kernel failing to compile does not hide the others' PTX.
"""

import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def ptx(spec: dict) -> str:
    module, name = spec["kernel"].rsplit(".", 1)
    kernel = getattr(importlib.import_module(module), name)
    types, consts = spec["types"], spec["consts"]
    signature = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(kernel.arg_names)
        if n in types and (types[n].startswith("*") or n in spec.get("aligned", ()))
    }
    source = ASTSource(kernel, signature=signature, constexprs=consts, attrs=aligned)
    target = GPUTarget("cuda", spec.get("capability", 90), 32)
    return triton.compile(source, target=target, options={"num_warps": spec.get("warps", 4)}).asm[
        "ptx"
    ]


def _ptx_or_error(spec: dict) -> dict[str, str]:
    try:
        return {"ptx": ptx(spec)}
    except Exception as exc:  # reported to the test that asked for this kernel
        return {"error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    if isinstance(specs, list):
        print(json.dumps([_ptx_or_error(spec) for spec in specs]))
    else:
        print(ptx(specs))
