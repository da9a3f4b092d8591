"""The reference trainer: GRPO through peft, one named adapter per policy on one PeftModel.

Only tests and benchmarks use it, as the oracle the multi-policy trainer is checked against
(`tests/unit/test_multitrainer.py`) and as the peer in the handoff benchmark. Each policy has its
own AdamW over a parameter list cached at creation: `requires_grad` follows peft's active
adapter, so collecting "trainable params" at step time would silently pick another policy's
weights.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar, cast

import peft
import torch
from peft.tuners.lora import LoraLayer

from schemas.errors import PoisonEventError, TrainingRejected
from workers.models.base import LoraSpec, load_base_model
from workers.training import checkpoint
from workers.training.grpo import (
    Batch,
    StepResult,
    TrainGroup,
    grpo_loss,
    make_batch,
    policy_seed,
    token_logps,
    validate_groups,
)


@dataclass
class _Policy:
    adapter: str
    keys: list[str]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    steps: int = 0


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Stream agents call the trainer from worker threads; the shared model is not reentrant."""
    @wraps(method)
    def wrapper(self: PolicyTrainer, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


class PolicyTrainer:
    """Many policies' LoRA adapters on one frozen base; one AdamW and step count per policy."""

    def __init__(
        self, base_path: Path, lora: LoraSpec, *, lr: float = 2e-2, clip_eps: float = 0.2,
        kl_beta: float = 0.0, max_grad_norm: float = 1.0, temperature: float = 1.0,
        seed: int = 0, dtype: torch.dtype = torch.float32,
    ) -> None:
        # float64 makes it an oracle a float64 MultiPolicyTrainer must match to rounding.
        base, self.tokenizer = load_base_model(Path(base_path))
        self.base = base.to(dtype=dtype)  # type: ignore[call-arg]
        self.lora, self.lr, self.clip_eps, self.kl_beta = lora, lr, clip_eps, kl_beta
        self.max_grad_norm, self.temperature, self.seed = max_grad_norm, temperature, seed
        self.model: peft.PeftModel | None = None
        self._peft_config = lora.peft_config(self.base)  # resolved before peft wraps the base
        self._policies: dict[str, _Policy] = {}
        self._lock = threading.RLock()
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self._vocab = int(self.base.get_output_embeddings().weight.shape[0])

    def has_policy(self, policy_id: str) -> bool:
        return policy_id in self._policies

    def steps_done(self, policy_id: str) -> int:
        policy = self._policies.get(policy_id)
        return policy.steps if policy else 0

    def _policy(self, policy_id: str) -> _Policy:
        """Get or create; the init depends only on (seed, policy_id), never on creation order."""
        if policy_id in self._policies:
            return self._policies[policy_id]
        adapter = f"policy_{len(self._policies):06d}"  # ids may hold chars module names reject
        if self.model is None:
            self.model = peft.get_peft_model(self.base, copy.deepcopy(self._peft_config), adapter)
            self.model.eval()  # no dropout; PEFT's mixed-batch guard is irrelevant here
        else:
            self.model.add_adapter(adapter, copy.deepcopy(self._peft_config))
        gen = torch.Generator().manual_seed(policy_seed(self.seed, policy_id))
        keys: list[str] = []
        params: list[torch.nn.Parameter] = []
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                a = cast(torch.nn.Parameter, module.lora_A[adapter].weight)
                b = cast(torch.nn.Parameter, module.lora_B[adapter].weight)
                with torch.no_grad():
                    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                    b.zero_()
                keys += [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
                params += [a, b]
        policy = _Policy(adapter, keys, params, self._new_optimizer(params))
        self._policies[policy_id] = policy
        return policy

    def _new_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        # No weight decay: a zero-advantage step must not shrink the adapter.
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)

    def _activate(self, policy: _Policy) -> peft.PeftModel:
        assert self.model is not None
        self.model.set_adapter(policy.adapter)
        for p in policy.params:
            p.requires_grad_(True)
        return self.model

    def _logps(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """`token_logps`, kept in float64 for a float64 model: that function works in float32
        (right for the half-precision models it serves), which would cap the oracle there."""
        if logits.dtype != torch.float64:
            return token_logps(logits, batch.ids, batch.cmask, self.temperature)
        lp = torch.log_softmax(logits[:, :-1] / self.temperature, dim=-1)
        return lp.gather(-1, batch.ids[:, 1:, None]).squeeze(-1) * batch.cmask[:, 1:]

    def _loss(self, policy: _Policy, batch: Batch) -> tuple[torch.Tensor, float]:
        model = self._activate(policy)
        ref = None
        if self.kl_beta > 0:
            with torch.no_grad(), model.disable_adapter():
                ref_logits = model(input_ids=batch.ids, attention_mask=batch.attention).logits
                ref = self._logps(ref_logits, batch)
        logits = model(input_ids=batch.ids, attention_mask=batch.attention).logits
        logp = self._logps(logits, batch)
        mask = batch.cmask[:, 1:]
        loss = grpo_loss(logp, batch.old, ref, batch.adv, mask, self.clip_eps, self.clip_eps,
                         self.kl_beta)
        kl = 0.0
        if ref is not None:
            d = (ref - logp).detach()
            kl = float(((torch.exp(d) - d - 1) * mask).sum() / mask.sum().clamp(min=1))
        return loss, kl

    @_locked
    def step(self, policy_id: str, groups: list[TrainGroup]) -> StepResult:
        """One optimizer step; a non-finite loss or grad norm changes nothing and raises."""
        validate_groups(groups, self._vocab)
        policy = self._policy(policy_id)
        batch = make_batch(groups, self._pad_id)
        for p in policy.params:
            p.grad = None
        loss, kl = self._loss(policy, batch)
        if not torch.isfinite(loss):
            raise TrainingRejected(f"non-finite loss for policy {policy_id!r}")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.params, self.max_grad_norm)
        if not torch.isfinite(grad_norm):
            for p in policy.params:
                p.grad = None
            raise TrainingRejected(f"non-finite gradient norm for policy {policy_id!r}")
        policy.optimizer.step()
        for p in policy.params:
            p.grad = None
        policy.steps += 1
        return StepResult(
            step=policy.steps, loss=float(loss.detach()), mean_reward=batch.mean_reward, kl=kl,
            grad_norm=float(grad_norm), tokens=int(batch.cmask.sum()),
        )

    @_locked
    @torch.no_grad()
    def logits(self, policy_id: str, input_ids: torch.Tensor) -> torch.Tensor:
        """The policy's logits for a batch (for export round-trip checks and debugging)."""
        return self._activate(self._require(policy_id))(input_ids=input_ids).logits.float()

    @_locked
    def adapter_state(self, policy_id: str) -> dict[str, torch.Tensor]:
        """PEFT saved-key format (adapter name stripped), ready to export as a revision."""
        policy = self._require(policy_id)
        return {k: p.detach().to("cpu", torch.float32).clone().contiguous()
                for k, p in zip(policy.keys, policy.params, strict=True)}

    def _require(self, policy_id: str) -> _Policy:
        if policy_id not in self._policies:
            raise KeyError(f"unknown policy {policy_id!r}")
        return self._policies[policy_id]

    def _set_weights(self, policy: _Policy, tensors: dict[str, torch.Tensor]) -> None:
        """Validate everything first, so a bad revision cannot leave a half-loaded adapter."""
        if set(tensors) != set(policy.keys):
            missing, extra = set(policy.keys) - set(tensors), set(tensors) - set(policy.keys)
            raise PoisonEventError(f"adapter keys mismatch: missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(extra)[:3]}")
        for key, p in zip(policy.keys, policy.params, strict=True):
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise PoisonEventError(f"{key}: shape {tuple(tensors[key].shape)} != {p.shape}")
        with torch.no_grad():
            for key, p in zip(policy.keys, policy.params, strict=True):
                p.copy_(tensors[key])

    @_locked
    def load_adapter_weights(
        self, policy_id: str, tensors: dict[str, torch.Tensor], *, step: int | None = None
    ) -> None:
        """Start (or restart) a policy from exported weights with a fresh optimizer."""
        policy = self._policy(policy_id)
        self._set_weights(policy, tensors)
        policy.optimizer = self._new_optimizer(policy.params)
        if step is not None:
            policy.steps = step

    @_locked
    def save_checkpoint(self, policy_id: str, directory: Path) -> None:
        """Adapter + AdamW moments as safetensors, hyper-params + step as JSON (no pickle)."""
        policy = self._require(policy_id)
        checkpoint.save(directory, policy_id=policy_id, step=policy.steps, lora=self.lora,
                        adapter=self.adapter_state(policy_id), optimizer=policy.optimizer,
                        keys=policy.keys)

    @_locked
    def load_checkpoint(self, policy_id: str, directory: Path) -> None:
        """Resume exactly where save_checkpoint left off (weights, moments, step)."""
        ckpt = checkpoint.load(directory, self.lora)
        policy = self._policy(policy_id)
        if ckpt.meta["keys"] != policy.keys:
            raise PoisonEventError(f"checkpoint in {directory} has other adapter keys")
        self._set_weights(policy, ckpt.adapter)
        policy.optimizer = self._new_optimizer(policy.params)
        ckpt.restore_optimizer(policy.optimizer, policy.params)
        policy.steps = ckpt.step
