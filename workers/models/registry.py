"""The architecture registry: which bases lorastream trains LoRA on, and how, one entry a family.

A base is looked up by its config's `model_type`. Its entry says which modules carry LoRA, by
group (`attn`, `mlp` for dense MLPs, `shared` for shared experts, `experts` for the routed fused
3-D expert banks), how an adapter of them is written for peft and for SGLang, and what the trainer
and the engine need beyond a plain forward (DSA's indexed KV cache and tie-stable top-k,
`workers.models.dsa`). Targets are chosen by `LORASTREAM_LORA_TARGETS`
(`LoraSpec.target_modules`): group names, `all`, or module leaf names such as `q_proj`.

Why one place: the transformers 5 model code differs per family in ways LoRA cares about
(docs/architecture.md, "Base models"): MLA projections, fused experts (GPT-OSS's transposed,
interleaved and biased), and peft 0.21.2's silent rewrite of `gate_proj|up_proj|down_proj`
targets into fused-expert targets for the DeepSeek/GLM/Qwen MoE families (peft#3711), which this
registry sidesteps by declaring those 2-D linears as `target_parameters`. A base the registry
does not cover (GPT-2, Falcon, Phi-3's fused projections, ...) is refused when a process starts,
with one message naming its architecture and what is supported, never by dead-lettering events
later. """

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

GROUPS = ("attn", "mlp", "shared", "experts")
ALL = "all"
DEFAULT_TARGETS = ("attn", "mlp", "shared", "experts")
SWIGLU = ("gate_proj", "up_proj", "down_proj")
GQA = ("q_proj", "k_proj", "v_proj", "o_proj")
MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
"""MLA's projections (`q_proj` only where `q_lora_rank` is None)."""
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""Fused expert parameters, in registration order (peft nests the first innermost)."""
_SHARED_MARKERS = (".shared_experts.", ".shared_expert.")


class UnsupportedArchitecture(ValueError):
    """The base model's architecture has no registry entry: refused at start-up."""


class BadTargets(ValueError):
    """`LORASTREAM_LORA_TARGETS` names nothing, or something that must stay frozen."""


@dataclass(frozen=True)
class Family:
    """How one architecture family carries LoRA."""

    name: str
    attn: tuple[str, ...]
    mlp: tuple[str, ...] = SWIGLU
    experts: bool = False
    """Routed experts are fused 3-D banks (`experts.gate_up_proj`, `experts.down_proj`)."""
    peft_mlp_as_parameters: bool = False
    """peft#3711: write the 2-D MLP linears as `target_parameters` (`gate_proj.weight`, ...)."""
    sparse_indexer: bool = False
    """DSA: needs `DynamicCache(config=...)` and a tie-stable indexer top-k."""
    frozen: tuple[str, ...] = ()
    """Leaf names that look targetable but stay frozen by design (router, indexer)."""
    note: str = ""


_MOE_FROZEN = ("gate", "router", "shared_expert_gate")
_DSA_FROZEN = (*_MOE_FROZEN, "wq_b", "wk", "weights_proj")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", GQA, note="Llama, SmolLM2"),
    Family("qwen3", GQA, note="Qwen3 dense"),
    Family("mixtral", GQA, experts=True, frozen=_MOE_FROZEN, note="Mixtral"),
    Family("qwen3_moe", GQA, experts=True, peft_mlp_as_parameters=True, frozen=_MOE_FROZEN,
           note="Qwen3-MoE"),
    Family("gpt_oss", GQA, experts=True, frozen=_MOE_FROZEN,
           note="GPT-OSS: transposed, interleaved, biased experts; sinks"),
    Family("deepseek_v3", MLA, experts=True, peft_mlp_as_parameters=True, frozen=_MOE_FROZEN,
           note="DeepSeek-V3: MLA, routed + shared experts, dense first layers"),
    Family("deepseek_v32", MLA, experts=True, peft_mlp_as_parameters=True, sparse_indexer=True,
           frozen=_DSA_FROZEN, note="DeepSeek-V3.2: MLA + DSA"),
    Family("glm_moe_dsa", MLA, experts=True, peft_mlp_as_parameters=True, sparse_indexer=True,
           frozen=_DSA_FROZEN, note="GLM-5 (GlmMoeDsa): MLA + DSA"),
)}


def supported() -> str:
    return ", ".join(FAMILIES)


def family_of(config: PretrainedConfig) -> Family:
    """The registry entry of a config, or UnsupportedArchitecture naming what is supported."""
    model_type = str(getattr(config, "model_type", "") or "")
    family = FAMILIES.get(model_type)
    if family is None:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise UnsupportedArchitecture(
            f"base model architecture {model_type or '?'!r} ({arch}) is not supported for LoRA "
            f"training and serving; supported model types: {supported()} "
            "(workers/models/registry.py)")
    return family


def is_fused_experts(module: nn.Module) -> bool:
    """A routed-expert bank stored as two 3-D Parameters (every MoE family in transformers 5)."""
    return all(isinstance(getattr(module, n, None), nn.Parameter)
               and getattr(module, n).dim() == 3 for n in EXPERT_PARAMS)


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`"attn,mlp"` or a sequence -> tokens (`all` expands to every group)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    tokens: list[str] = []
    for item in (t.strip() for t in items):
        for token in (GROUPS if item == ALL else (item,)):
            if token and token not in tokens:
                tokens.append(token)
    if not tokens:
        raise BadTargets("no LoRA targets given (LORASTREAM_LORA_TARGETS)")
    return tuple(tokens)


@dataclass(frozen=True)
class LoraTargets:
    """What carries LoRA in one model: full module names, by group."""

    family: Family
    linears: tuple[tuple[str, str], ...]
    """(full module name, group) of each targeted nn.Linear, in module order."""
    experts: tuple[str, ...]
    """Full names of the targeted fused expert modules."""
    all_linears: tuple[str, ...]
    """Every nn.Linear the family could target (to know when a leaf name covers a selection)."""

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.linears)

    def groups(self) -> dict[str, int]:
        """How many modules each group holds (experts count banks)."""
        out: dict[str, int] = {}
        for _, group in self.linears:
            out[group] = out.get(group, 0) + 1
        if self.experts:
            out["experts"] = len(self.experts)
        return out

    def _compact(self, names: Iterable[str]) -> list[str]:
        """Leaf names where a leaf's selection is complete, else the full names."""
        names = list(names)
        leaves: dict[str, list[str]] = {}
        for name in names:
            leaves.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        out: list[str] = []
        for leaf, chosen in sorted(leaves.items()):
            every = [n for n in self.all_linears if n.rsplit(".", 1)[-1] == leaf]
            out += [leaf] if len(chosen) == len(every) else sorted(chosen)
        return out

    def peft_fields(self) -> dict[str, list[str]]:
        """`target_modules` / `target_parameters` of a peft LoraConfig for these targets."""
        as_params = self.family.peft_mlp_as_parameters
        modules = [n for n, g in self.linears if not (as_params and g in ("mlp", "shared"))]
        params = [n for n, g in self.linears if as_params and g in ("mlp", "shared")]
        fields: dict[str, list[str]] = {"target_modules": self._compact(modules)}
        parameters = [f"{n}.weight" for n in self._compact(params)]
        if self.experts:
            parameters += [f"experts.{p}" for p in EXPERT_PARAMS]
        if parameters:
            fields["target_parameters"] = parameters
        return fields

    def sglang_target_modules(self) -> list[str]:
        """SGLang's `target_modules`: a list of leaf suffixes (no regex, no parameters)."""
        leaves = {n.rsplit(".", 1)[-1] for n, _ in self.linears}
        if self.experts:
            leaves |= set(SWIGLU)
        return sorted(leaves)

    @property
    def needs_serving_layout(self) -> bool:
        """SGLang loads routed-expert LoRA only per expert (not peft's `target_parameters`)."""
        return bool(self.experts)


def _group(name: str, leaf: str, family: Family) -> str | None:
    if leaf in family.attn:
        return "attn"
    if leaf in family.mlp:
        return "shared" if any(m in f".{name}." for m in _SHARED_MARKERS) else "mlp"
    return None


def resolve(model: nn.Module, spec: str | Sequence[str]) -> LoraTargets:
    """The targets of `spec` (groups, `all` or leaf names) in `model`; BadTargets when a token
    matches nothing or names a part that stays frozen (router, DSA indexer)."""
    family = family_of(model.config)  # type: ignore[arg-type]
    tokens = parse_targets(spec)
    frozen = [t for t in tokens if t in family.frozen]
    if frozen:
        raise BadTargets(f"LoRA target(s) {frozen} stay frozen in {family.name} (routers and "
                         "the DSA indexer are never trained)")
    groups = {t for t in tokens if t in GROUPS}
    names = {t for t in tokens if t not in GROUPS}
    linears, every, seen = [], [], set()
    experts = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            group = _group(name, leaf, family)
            if group is None and leaf not in names:
                continue
            every.append(name)
            if (group in groups) or leaf in names:
                linears.append((name, group or "named"))
                seen.add(leaf)
        elif family.experts and is_fused_experts(module) and "experts" in groups:
            experts.append(name)
    unknown = sorted(names - seen)
    if unknown:
        raise BadTargets(f"LoRA target(s) {unknown} match no linear layer of this "
                         f"{family.name} model; groups: {', '.join(GROUPS)}")
    if not linears and not experts:
        raise BadTargets(f"LoRA targets {list(tokens)} select nothing in this {family.name} "
                         "model")
    return LoraTargets(family, tuple(linears), tuple(experts), tuple(every))


@functools.lru_cache(maxsize=16)
def skeleton(path: str) -> nn.Module:
    """The base's modules on the meta device (no weights read): enough to resolve targets."""
    from workers.models.base import resolve_base

    config = AutoConfig.from_pretrained(str(resolve_base(path)))
    family_of(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def targets_for_base(path: Path | str, spec: str | Sequence[str]) -> LoraTargets:
    """Resolve targets from a base directory's config alone (cheap; used at start-up)."""
    return resolve(skeleton(str(path)), spec)


def check_base(path: Path | str, spec: str | Sequence[str]) -> LoraTargets:
    """Start-up check of a base: supported architecture and targets that select something.
    Raises UnsupportedArchitecture / BadTargets with one clear message."""
    return targets_for_base(path, spec)


def adapter_config(rank: int, alpha: float, base_model: str,
                   targets: LoraTargets) -> dict[str, Any]:
    """The adapter_config.json that makes `PeftModel.from_pretrained` load an export exactly
    (peft#3711-safe `target_parameters` for MoE families' 2-D MLP linears)."""
    return lora_config(rank, alpha, base_model, targets.peft_fields())


def lora_config(rank: int, alpha: float, base_model: str,
                target_fields: dict[str, Any]) -> dict[str, Any]:
    """peft's adapter_config.json around the given target fields (`target_modules`, and
    `target_parameters` where the registry needs them)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        **target_fields,
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base_model,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def prepare(model: nn.Module) -> Family:
    """What a base needs before the trainer or the engine runs it (both call this, so they
    compute the same thing): DSA indexers get the tie-stable top-k (`workers.models.dsa`);
    float64 MoE models (oracles) take transformers' eager experts path."""
    from workers.models.dsa import stabilize_indexers

    family = family_of(model.config)  # type: ignore[arg-type]
    if family.sparse_indexer:
        stabilize_indexers(model)
    if family.experts and next(model.parameters()).dtype == torch.float64:
        # transformers' default grouped_mm experts kernel rejects float64 (oracles run there)
        model.config._experts_implementation = "eager"  # type: ignore[union-attr]
    return family
