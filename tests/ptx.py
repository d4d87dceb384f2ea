"""Print the PTX Triton generates for one of our kernels, for any CUDA target, without a GPU.

Run as a script in a process without TRITON_INTERPRET (under the interpreter the kernels are not
compiled); tests/test_kernels.py calls it through ``subprocess``. One JSON argument:
``{"kernel": "quartet_compile.kernels.gemm._dot_scaled_kernel", "types": {arg: "*u8" | "i32"
| ...}, "consts": {arg: value}, "aligned": [integer args Triton is told are multiples of 16],
"capability": 90, "warps": 4}``. Pointers are always 16-byte aligned, as torch allocates them.
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


if __name__ == "__main__":
    print(ptx(json.loads(sys.argv[1])))
