"""Run a GGUF file in a real llama.cpp: the prebuilt CPU library of the `llama-cpp-py-sync` wheel,
driven through llama.cpp's own C API (tokenize, decode, logits). The export test and the GGUF
benchmark use it; each run is its own process, so a crash inside llama.cpp fails one check
instead of taking pytest down with it.

    python -m benchmarks.llama_cpp MODEL.gguf --prompt "ROMEO:" --max-new-tokens 48
    python -m benchmarks.llama_cpp MODEL.gguf --prompt "ROMEO:" --follow 11,198,...

prints one JSON object: the prompt's ids as llama.cpp tokenizes them, its greedy tokens and
seconds per decoded token, or (`--follow`) the top-1 token llama.cpp predicts at each step of
a given continuation, teacher-forced so that one early disagreement does not derail the rest.

**Debian 12 and glibc.** The wheel's libraries are built against glibc 2.38 and refuse to load
on Debian 12's 2.36 ("version `GLIBC_2.38' not found"), though they use nothing of 2.38 but
the C23 spellings of strtol/strtoul/strtoull/sscanf (`__isoc23_*`; C23 only adds the "0b"
prefix, which llama.cpp does not parse). Compiling llama.cpp instead would add minutes to every
fresh setup (its CMake build of the library and two tools was 18% done after 80 s on 2 cores,
measured; it has 150 model files). So, on a glibc older than 2.38, this
module copies the wheel's libraries into minigpt's cache, marks their need for GLIBC_2.38 weak
(one flag in each ELF file's version-needs table), and loads a 10-line shim, compiled here
with gcc, that defines the four functions under that version name as the classic ones. The
wheel's own files are never changed; newer systems load them as they are.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from minigpt.fetch import cache_dir

_C23_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **end, int base) { return strtol(s, end, base); }
unsigned long __isoc23_strtoul(const char *s, char **end, int base) { return strtoul(s, end, base); }
unsigned long long __isoc23_strtoull(const char *s, char **end, int base) { return strtoull(s, end, base); }
long long __isoc23_strtoll(const char *s, char **end, int base) { return strtoll(s, end, base); }
int __isoc23_sscanf(const char *s, const char *format, ...) {
    va_list args; va_start(args, format); int n = vsscanf(s, format, args); va_end(args); return n;
}
"""
_SHIM_VERSIONS = "GLIBC_2.38 { global: __isoc23_*; };\n"
_SHT_GNU_VERNEED = 0x6FFFFFFE
_VER_FLG_WEAK = 0x2


def _glibc_older_than(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return False
    have = tuple(int(part) for part in version.split(".")[:2])
    return have < (major, minor)


def _weaken_version_need(path: Path, version: bytes) -> int:
    """Set the weak flag on every need of symbol version `version` in an ELF64 little-endian
    shared library (the loader then skips it when missing); returns how many it marked."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    (section_table,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, n_sections = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_table + i * entry_size) for i in range(n_sections)]
    marked = 0
    for _, kind, _, _, offset, _, link, info, _, _ in sections:
        if kind != _SHT_GNU_VERNEED:
            continue
        strings = sections[link][4]
        for _ in range(info):  # one Verneed per library, each with its Vernaux list
            _, n_aux, _, aux_offset, next_offset = struct.unpack_from("<HHIII", data, offset)
            aux = offset + aux_offset
            for _ in range(n_aux):
                _, flags, _, name, next_aux = struct.unpack_from("<IHHII", data, aux)
                if data[strings + name: data.index(b"\0", strings + name)] == version:
                    struct.pack_into("<H", data, aux + 4, flags | _VER_FLG_WEAK)
                    marked += 1
                aux += next_aux
            offset += next_offset
    path.write_bytes(data)
    return marked


def _compatible_library() -> Path:
    """The wheel's libllama.so, or on glibc < 2.38 a patched copy beside the C23 shim (loaded)."""
    import llama_cpp_py_sync

    package = Path(llama_cpp_py_sync.__file__).parent
    original = package / "libllama.so"
    if not _glibc_older_than(2, 38):
        return original
    fingerprint = hashlib.sha256(original.read_bytes()).hexdigest()[:16]
    folder = cache_dir() / "llama-cpp" / fingerprint
    shim = folder / "libisoc23.so"
    if not shim.is_file():
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for library in package.glob("*.so*"):
            shutil.copy2(library, staging / library.name)
            _weaken_version_need(staging / library.name, b"GLIBC_2.38")
        (staging / "isoc23.c").write_text(_C23_SHIM)
        (staging / "isoc23.map").write_text(_SHIM_VERSIONS)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wl,--version-script=isoc23.map", "-o", "libisoc23.so",
                        "isoc23.c"], cwd=staging, check=True, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)  # the __isoc23_* symbols for what loads next
    return folder / "libllama.so"


def open_model(path: Path, threads: int):
    """llama.cpp's `Llama` for a GGUF file, its library loaded as this machine allows, with
    the model's own context length (n_ctx=0: llama.cpp reads it from the file)."""
    import llama_cpp_py_sync._cffi_bindings as bindings

    library = str(_compatible_library())
    bindings._find_library = lambda: library  # the binding looks in its own folder first
    from llama_cpp_py_sync import Llama

    return Llama(str(path), n_ctx=0, n_threads=threads, n_threads_batch=threads)


class _Decoder:
    """Feeds tokens to a llama.cpp context and reads the last position's logits."""

    def __init__(self, llm) -> None:
        import numpy as np

        self.np, self.llm, self.lib, self.ffi = np, llm, llm._lib, llm._ffi
        self.n_vocab = llm.n_vocab

    def feed(self, tokens: list[int]):
        ids = self.ffi.new("llama_token[]", tokens)
        if self.lib.llama_decode(self.llm._ctx, self.lib.llama_batch_get_one(ids, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = self.lib.llama_get_logits_ith(self.llm._ctx, -1)
        return self.np.frombuffer(self.ffi.buffer(logits, 4 * self.n_vocab), dtype=self.np.float32)


def run(path: Path, prompt: str, max_new_tokens: int, follow: list[int] | None, threads: int) -> dict:
    llm = open_model(path, threads=threads)
    prompt_ids = llm.tokenize(prompt, add_special=False)
    steps = len(follow) if follow is not None else max_new_tokens
    if len(prompt_ids) + steps > llm.n_ctx:  # llama.cpp aborts the process past its context; ours slides
        raise SystemExit(f"{path}: {len(prompt_ids)} prompt + {steps} new tokens exceed the context of {llm.n_ctx}")
    decoder = _Decoder(llm)
    logits = decoder.feed(prompt_ids)
    if follow is not None:  # teacher-forced: llama.cpp's top-1 at each step of the given tokens
        top1 = []
        for token in follow:
            top1.append(int(logits.argmax()))
            logits = decoder.feed([token])
        return {"prompt_ids": prompt_ids, "top1": top1}
    tokens: list[int] = []
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        tokens.append(int(logits.argmax()))
        if len(tokens) < max_new_tokens:
            logits = decoder.feed(tokens[-1:])
    elapsed = time.perf_counter() - start
    return {"prompt_ids": prompt_ids, "tokens": tokens, "seconds_per_token": elapsed / max(1, max_new_tokens - 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llama_cpp", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--follow", help="comma-separated token ids to teacher-force")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args(argv)
    follow = [int(t) for t in args.follow.split(",")] if args.follow else None
    result = run(args.model, args.prompt, args.max_new_tokens, follow, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
