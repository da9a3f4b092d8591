"""Per-family checks against peft, shared by the tests and `loadtests.architectures`.

Each returns a measured error, so a test asserts a bound and the benchmark reports the figure:
- `oracle_error`: the multi-policy layer (ranks 1 and 8 and a base row in ONE pass) against
  peft's per-adapter passes, float64, logits and gradients (gradients relative to their
  tensor's largest entry: routers take their softmax/sigmoid in float32 by design, so paths
  through the routing weights carry float32 rounding even in a float64 model);
- `reload_error`: a trained policy's export reloaded by plain `PeftModel.from_pretrained`;
- `frozen_unchanged`: every base parameter and buffer bit-identical after training steps;
- `engine_error`: the CPU engine's log-probs on a mixed-adapter batch against the trainer's, both
  its plain forward and the packed GRPO pass that trains on those rollouts.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import peft
import safetensors.torch
import torch
from peft import PeftModel, get_peft_model_state_dict
from torch import nn

from workers.models.base import LoraSpec, load_base_model
from workers.models.registry import adapter_config, prepare
from workers.training.grpo import TrainGroup
from workers.training.multilora import MultiLora, MultiLoraExperts, MultiLoraLinear
from workers.training.multitrainer import MultiPolicyTrainer

RANKS = (1, 8)
ROWS: tuple[int | None, ...] = (0, 1, None, 1, 0)
"""Row -> adapter of the oracle's mixed batch (None: the bare base)."""


def _base64(path: Path) -> nn.Module:
    base, _ = load_base_model(path, dtype=torch.float64)
    prepare(base)
    return base


def _peft_oracle(path: Path, targets: Sequence[str], ids: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]],
                            dict[int, dict[str, torch.Tensor]]]:
    """peft's logits per row (each adapter's rows in its own pass), states and gradients."""
    base = _base64(path)
    torch.manual_seed(0)
    model: peft.PeftModel | None = None
    configs = [LoraSpec(rank=r, alpha=2.0 * r, target_modules=tuple(targets)).peft_config(base)
               for r in RANKS]  # resolved before peft wraps the base's modules
    for i, config in enumerate(configs):
        config.init_lora_weights = False  # random A and B: a zero B would hide bugs
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
    assert model is not None
    model.double()
    logits = torch.zeros(weights.shape, dtype=torch.float64)
    states, grads = {}, {}
    for i in range(len(RANKS)):
        model.set_adapter(f"a{i}")
        rows = [j for j, a in enumerate(ROWS) if a == i]
        out = model(input_ids=ids[rows]).logits
        (out * weights[rows]).sum().backward()
        logits[rows] = out.detach()
        states[i] = get_peft_model_state_dict(model, adapter_name=f"a{i}")
        named = dict(model.named_parameters())
        grads[i] = {k: _grad(named[k.replace(".weight", f".a{i}.weight")]) for k in states[i]}
    rows = [j for j, a in enumerate(ROWS) if a is None]
    with model.disable_adapter(), torch.no_grad():
        logits[rows] = model(input_ids=ids[rows]).logits
    return logits, states, grads


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _grads_as_peft(multi: MultiLora, slot: int) -> dict[str, torch.Tensor]:
    """The slot's gradients laid out as its export (peft keys and shapes), in float64."""
    layers: list[MultiLoraLinear | MultiLoraExperts] = [*multi.linears.values(),
                                                        *multi.experts.values()]
    params = [p for layer in layers for d in (layer.lora_A, layer.lora_B)
              for k, p in d.items() if k.endswith(f"s{slot}")]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:
        return multi.export(slot, dtype=torch.float64)
    finally:
        for p, data in zip(params, saved, strict=True):
            p.data = data


def oracle_error(path: Path, targets: Sequence[str] = LoraSpec().target_modules,
                 length: int = 7) -> float:
    """Max error of the mixed multi-LoRA pass against peft (logits absolute, gradients
    relative to each tensor's largest entry), float64."""
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (len(ROWS), length), generator=gen)
    weights = torch.randn(len(ROWS), length, vocab, dtype=torch.float64, generator=gen)
    want_logits, states, want_grads = _peft_oracle(path, targets, ids, weights)
    base = _base64(path)
    multi = MultiLora.install(base, targets)
    for i, r in enumerate(RANKS):
        multi.add_slot(i, r, 2.0 * r)
        multi.load(i, states[i])
    with multi.route(list(ROWS)):
        logits = base(input_ids=ids).logits
        (logits * weights).sum().backward()
    err = float((logits.detach() - want_logits).abs().max())
    for i in range(len(RANKS)):
        got = _grads_as_peft(multi, i)
        if got.keys() != want_grads[i].keys():
            raise AssertionError(f"gradient keys differ: {sorted(got.keys() ^ want_grads[i])[:3]}")
        for key, want in want_grads[i].items():
            scale = max(float(want.abs().max()), 1e-30)
            err = max(err, float((got[key] - want).abs().max()) / max(scale, 1.0))
    return err


def _state_digest(model: nn.Module) -> str:
    """sha256 of every base parameter and buffer (LoRA factors excluded), bit for bit."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        if "lora_" in name:
            continue
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_two(path: Path, *, steps: int = 2, lora: LoraSpec | None = None, lr: float = 1e-2,
              step_times: list[float] | None = None,
              ) -> tuple[MultiPolicyTrainer, bool, list[list[int]]]:
    """Two policies ("a", "b") trained `steps` joint steps on their own samples; returns the
    trainer, whether the base stayed bit-identical, and the prompts used. `step_times` gets
    each joint step's seconds (sampling excluded). `lr`: the pipeline's default (at 5x it, 4
    steps push tiny DSA logits to ~20 and float32 reload/engine gaps to ~3-6e-5)."""
    import time

    trainer = MultiPolicyTrainer(path, lora or LoraSpec(), lr=lr, kl_beta=0.05)
    before = _state_digest(trainer.base)
    prompts = [list(trainer.tokenizer(p)["input_ids"]) for p in ("hi there?", "count 1 2")]
    for step in range(steps):
        out = trainer.sample_many([(p, pol, 4) for pol in ("a", "b") for p in prompts],
                                  max_new_tokens=6, seed=step)
        groups = [TrainGroup(p, [c.token_ids for c in g], [c.logprobs for c in g],
                             [float(len(c.token_ids)) + 0.1 * k for k, c in enumerate(g)])
                  for p, g in zip(prompts * 2, out, strict=True)]
        started = time.perf_counter()
        results = trainer.step_many({"a": groups[:2], "b": groups[2:]})
        if step_times is not None:
            step_times.append(time.perf_counter() - started)
        bad = {k: v for k, v in results.items() if isinstance(v, Exception)}
        if bad:
            raise AssertionError(f"training failed: {bad}")
    return trainer, _state_digest(trainer.base) == before, prompts


def export_dir(trainer: MultiPolicyTrainer, policy: str, base: Path, out: Path) -> Path:
    """A policy's peft export (weights + registry adapter config), as the export stage writes."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "adapter_model.safetensors"
    safetensors.torch.save_file(trainer.adapter_state(policy), str(weights))
    config = adapter_config(trainer.lora.rank, trainer.lora.alpha, str(base), trainer.multi.targets)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def reload_error(trainer: MultiPolicyTrainer, base: Path, policy: str = "a") -> float:
    """Max |logits| difference between the trainer and plain `PeftModel.from_pretrained`."""
    ids = torch.tensor([list(trainer.tokenizer("hello there, count")["input_ids"])])
    with tempfile.TemporaryDirectory() as tmp:
        adapter = export_dir(trainer, policy, base, Path(tmp) / policy)
        model, _ = load_base_model(base)
        prepare(model)
        reloaded = PeftModel.from_pretrained(model, str(adapter))
        with torch.no_grad():
            want = reloaded(input_ids=ids).logits.float()
    return float((trainer.logits(policy, ids) - want).abs().max())


def _teacher_logps(trainer: MultiPolicyTrainer, policy: str | None, prompt: list[int],
                   completion: list[int], temperature: float) -> torch.Tensor:
    """The trainer's log-probs of `completion` after `prompt` in one full forward."""
    slot = None if policy is None else trainer.slot_of(policy)
    ids = torch.tensor([prompt + completion], device=trainer.device)
    with torch.no_grad(), trainer.multi.route([slot]):
        logits = trainer.base(input_ids=ids).logits[0, len(prompt) - 1:-1].float().cpu()
    logps = torch.log_softmax(logits / temperature, dim=-1)
    return logps.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def engine_error(trainer: MultiPolicyTrainer, base: Path, policies: Sequence[str] = ("a", "b"),
                 *, adapters: dict[str, Path] | None = None, max_new_tokens: int = 8,
                 temperature: float = 1.0) -> float:
    """Max |log-prob| difference between the CPU engine sampling a mixed batch (every policy's
    revision and the bare base, prompts of different lengths, so left padding) and the
    trainer's full forward over the same tokens. `adapters`: dirs to serve (default: each
    policy's peft export)."""
    from workers.serving.sampler import RowRequest, SlotSampler

    with tempfile.TemporaryDirectory() as tmp:
        dirs = adapters or {p: export_dir(trainer, p, base, Path(tmp) / p) for p in policies}
        sampler = SlotSampler(base, num_slots=len(policies), max_rank=max(8, trainer.lora.rank),
                              target_modules=trainer.lora.target_modules)
        for slot, policy in enumerate(policies):
            sampler.load(slot, dirs[policy])
        prompts = [sampler.encode(t) for t in ("hello there, count", "hi", "a b c d e f")]
        owners: list[str | None] = [*policies, None]
        rows, who = [], []
        for i, prompt in enumerate(prompts):
            for j, owner in enumerate(owners):
                row_slot = None if owner is None else list(policies).index(owner)
                rows.append(RowRequest(prompt, row_slot, max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=10 * i + j,
                                       ignore_eos=True))
                who.append((owner, prompt))
        results = sampler.generate(rows)
    err = 0.0
    for (owner, prompt), res in zip(who, results, strict=True):
        want = _teacher_logps(trainer, owner, prompt, res.output_ids, temperature)
        err = max(err, float((torch.tensor(res.logprobs) - want).abs().max()))
    rollouts = [(owner, prompt, res.output_ids, res.logprobs)
                for (owner, prompt), res in zip(who, results, strict=True)]
    return max(err, _packed_error(trainer, rollouts))


def _packed_error(trainer: MultiPolicyTrainer,
                  rollouts: list[tuple[str | None, list[int], list[int], list[float]]]) -> float:
    """The engine's log-probs against the trainer's GRPO pass over the same rollouts (shared
    prompts packed, block masks, per-row slots): what the ratio's `old` term is compared to."""
    from workers.training.grpo import make_batch
    from workers.training.sharedprefix import share_prefixes

    groups = [TrainGroup(prompt, [out], [lps], [0.0]) for _, prompt, out, lps in rollouts]
    slots = [None if owner is None else trainer.slot_of(owner) for owner, *_ in rollouts]
    pad = int(trainer.tokenizer.pad_token_id or 0)
    batch = make_batch(groups, pad)
    packed = share_prefixes(batch, slots, pad).to(trainer.device)
    shape = (batch.ids.shape[0], batch.ids.shape[1] - 1)
    with torch.no_grad(), trainer.multi.route(packed.slots):
        logp = trainer._logps(packed, shape, keep_head=True).cpu()
    mask = batch.cmask[:, 1:].bool()
    return float((logp[mask] - batch.old[mask]).abs().max())


def random_slot(path: Path, targets: Sequence[str] = LoraSpec().target_modules,
                rank: int = 4) -> tuple[nn.Module, MultiLora]:
    """A float64 base with one slot of random, non-zero factors (slot 0, alpha = 2 rank)."""
    base = _base64(path)
    multi = MultiLora.install(base, targets)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in multi.add_slot(0, rank, 2.0 * rank, gen):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return base, multi


def _merge(model: nn.Module, tensors: dict[str, torch.Tensor], scale: float,
           banks: dict[str, tuple[int, bool]]) -> None:
    """Add scale * B A of every (SGLang-layout) LoRA pair into the base's own weights."""
    import re

    from workers.serving.sglang_layout import bank_rows

    per_expert = re.compile(r"^(.+)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
    with torch.no_grad():
        for key_a in (k for k in tensors if k.endswith(".lora_A.weight")):
            module = key_a.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = tensors[key_a], tensors[key_a.replace("lora_A", "lora_B")]
            delta = scale * (b @ a)  # [out, in]
            m = per_expert.match(module)
            if m is None or m[1] not in banks:
                cast(nn.Linear, model.get_submodule(module)).weight += delta
                continue
            bank, e, proj = m[1], int(m[2]), m[3]
            experts = model.get_submodule(bank)
            transposed = getattr(experts, "is_transposed", False)
            w = getattr(experts, "down_proj" if proj == "down_proj" else "gate_up_proj")[e]
            if transposed:
                w = w.T  # a view, [out, in] like delta
            if proj != "down_proj":
                gate, up = bank_rows(banks[bank][1], w.shape[0] // 2)
                w = w[gate if proj == "gate_proj" else up]
            w += delta


def sglang_merge_error(path: Path, out: Path) -> tuple[float, Path]:
    """The SGLang-layout export of a random slot, merged into a float64 copy of the base,
    against the multi-LoRA forward (max |logits| difference); also returns the layout dir."""
    from workers.serving.sglang_layout import bank_layout, to_sglang

    base, multi = random_slot(path)
    peft_dir = out / "peft"
    peft_dir.mkdir(parents=True, exist_ok=True)
    tensors64 = multi.export(0, dtype=torch.float64)
    safetensors.torch.save_file(tensors64, str(peft_dir / "adapter_model.safetensors"))
    config = adapter_config(4, 8.0, str(path), multi.targets)
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    layout = to_sglang(peft_dir, out / "sglang", path)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), multi.route([0, 0]):
        want = base(input_ids=ids).logits
    merged = _base64(path)
    tensors = safetensors.torch.load_file(str(layout / "adapter_model.safetensors"))
    _merge(merged, tensors, 2.0, bank_layout(path, multi.targets))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    return float((got - want).abs().max()), layout
