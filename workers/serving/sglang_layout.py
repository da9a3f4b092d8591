"""An adapter revision in the layout SGLang loads, where peft's is not it (routed experts).

lorastream exports peft's own format: `PeftModel.from_pretrained` reloads it exactly, including
the fused expert banks as `target_parameters`. Upstream SGLang does not load those
`target_parameters` keys (PRs #25528/#27381 closed: "silently dropped ... or hard-fail under
--lora-strict-loading"); it takes per-expert 2-D keys,
`<bank>.<e>.{gate,up,down}_proj.lora_{A,B}` (SGLang's `python/sglang/srt/lora/utils.py` and
`lora_manager.py`). `to_sglang` writes that layout into a separate directory: gate and up share
expert e's A, their B's are expert e's rows of the fused `gate_up_proj` (the first/second half,
or the even/odd rows for GPT-OSS's interleaved bank), and down is expert e's factors as they
are. The config lists leaf `target_modules` (what SGLang's `get_normalized_target_modules` maps)
with no `target_parameters`. Dense bases need no serving layout: their peft export is what
SGLang loads. The CPU engine loads both layouts.

Caveat: SGLang applies `kv_b_proj` LoRA on the absorbed MLA path only with
its correction (#25001); vLLM silently drops `kv_b_proj` LoRA. Serve MLA adapters that target
`kv_b_proj` on an engine that applies it, or leave it out of the targets.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from workers.models.experts import expert_shape
from workers.models.registry import LoraTargets, skeleton, targets_for_base
from workers.serving.slots import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE

SGLANG_DIR = "sglang"
"""Where an artifact's SGLang layout lives, beside its peft files (derived, deterministic)."""


def bank_rows(interleaved: bool, inner: int) -> tuple[slice, slice]:
    if interleaved:
        return slice(0, 2 * inner, 2), slice(1, 2 * inner, 2)
    return slice(0, inner), slice(inner, 2 * inner)


def per_expert_tensors(tensors: dict[str, torch.Tensor], banks: dict[str, tuple[int, bool]]
                       ) -> dict[str, torch.Tensor]:
    """peft expert keys -> SGLang per-expert keys (other keys unchanged). `banks`: bank module
    name -> (experts, interleaved gate/up)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for bank, (experts, interleaved) in banks.items():
        gu, dn = f"{PEFT_PREFIX}{bank}.base_layer", f"{PEFT_PREFIX}{bank}"
        keys = [f"{gu}.lora_A.weight", f"{gu}.lora_B.weight", f"{dn}.lora_A.weight",
                f"{dn}.lora_B.weight"]
        if not all(k in tensors for k in keys):
            continue
        used.update(keys)
        a_gu, b_gu, a_dn, b_dn = (tensors[k] for k in keys)
        a_gu, a_dn = a_gu.reshape(experts, -1, a_gu.shape[-1]), a_dn.reshape(experts, -1,
                                                                            a_dn.shape[-1])
        b_gu = b_gu.reshape(b_gu.shape[0], -1, experts).permute(2, 0, 1)  # [E, 2I, r]
        b_dn = b_dn.reshape(b_dn.shape[0], -1, experts).permute(2, 0, 1)  # [E, H, r]
        gate, up = bank_rows(interleaved, b_gu.shape[1] // 2)
        for e in range(experts):
            prefix = f"{PEFT_PREFIX}{bank}.{e}"
            for proj, a, b in (("gate_proj", a_gu[e], b_gu[e][gate]),
                               ("up_proj", a_gu[e], b_gu[e][up]),
                               ("down_proj", a_dn[e], b_dn[e])):
                out[f"{prefix}.{proj}.lora_A.weight"] = a.clone()
                out[f"{prefix}.{proj}.lora_B.weight"] = b.clone()
    out.update({k: v for k, v in tensors.items() if k not in used})
    return out


def bank_layout(base: Path | str, targets: LoraTargets) -> dict[str, tuple[int, bool]]:
    """(experts, interleaved) of every targeted bank of the base (from its meta skeleton)."""
    model = skeleton(str(base))
    out = {}
    for name in targets.experts:
        bank = model.get_submodule(name)
        out[name] = (expert_shape(bank, "gate_up_proj")[0],
                     not getattr(bank, "is_concatenated", True))
    return out


def to_sglang(adapter_dir: Path, out_dir: Path, base: Path | str) -> Path:
    """Write `adapter_dir` (a lorastream/peft export of a base at `base`) in SGLang's layout."""
    config: dict[str, Any] = json.loads((adapter_dir / CONFIG_FILE).read_text())
    spec = _targets_spec(config)
    targets = targets_for_base(base, spec)
    tensors = safetensors.torch.load_file(str(adapter_dir / WEIGHTS_FILE))
    out = per_expert_tensors(tensors, bank_layout(base, targets))
    config = {k: v for k, v in config.items()
              if k not in ("target_parameters", "rank_pattern", "alpha_pattern")}
    config["target_modules"] = targets.sglang_target_modules()
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(out, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out_dir


def ensure_sglang_layout(adapter_dir: Path, out_dir: Path, base: Path | str) -> Path:
    """`out_dir` holding `adapter_dir` in SGLang's layout, written once (temp dir + rename, so
    a reader never sees half of it)."""
    if (out_dir / WEIGHTS_FILE).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        to_sglang(adapter_dir, tmp, base)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / WEIGHTS_FILE).is_file():  # else a concurrent writer won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _targets_spec(config: dict[str, Any]) -> list[str]:
    """The leaf names an export's config targets (experts as the `experts` group)."""
    leaves = [str(m).rsplit(".", 1)[-1] for m in config.get("target_modules") or []]
    params = [str(p) for p in config.get("target_parameters") or []]
    leaves += [p.removesuffix(".weight").rsplit(".", 1)[-1] for p in params
               if not p.startswith("experts.")]
    if any(p.startswith("experts.") for p in params):
        leaves.append("experts")
    return sorted(set(leaves))
