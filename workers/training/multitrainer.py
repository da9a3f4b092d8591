"""GRPO for many policies in shared steps: batched forward/backward passes over their rows.

Same public API as `PolicyTrainer` (step, steps_done, has_policy, adapter_state, checkpoints),
plus `step_many`, which trains several policies in one step: their rows go through batched
passes over the resident base (`workers.training.multilora`), packed under an activation-memory
budget (`workers.training.multipass`), with each group's prompt computed once for its G completions
(`workers.training.sharedprefix`), and each policy steps once. Policies stay isolated:
each policy's loss is normalised by its own token count and the losses are summed (parameters are
disjoint, so each adapter gets exactly its own gradient); gradient norms are clipped per policy;
each policy has its own AdamW, stepped only when that policy was in the step. A policy whose
loss or gradient is not finite is rejected; if anything in a multi-policy pass is not finite the
pass is redone one policy at a time, so a bad policy can never move (or poison through 0 * NaN)
the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.checkpoint import checkpoint

from schemas.errors import PoisonEventError, TrainingRejected
from workers.models.base import LoraSpec, load_base_model
from workers.training import checkpoint as ckpt_io
from workers.training.grpo import (
    Batch,
    StepResult,
    TrainGroup,
    grpo_loss,
    make_batch,
    policy_seed,
    validate_groups,
)
from workers.training.multilora import MultiLora
from workers.training.multipass import PASS_ACTIVATION_MB, concat, pack, token_activation_mb
from workers.training.multisample import Completion, SampleRequest, sample_many
from workers.training.sharedprefix import Packed, packed_shape, share_prefixes

HEAD_CHUNK = 256
"""Completion positions per LM-head chunk: a [chunk, vocab] logits is the most the head holds at
once beyond what backward keeps (each chunk's log-softmax, unless the pass recomputes)."""
CHECKPOINT_ABOVE_TOKENS = 512
"""A pass over more (padded) tokens than this recomputes each decoder layer in backward instead
of keeping its activations: a K-policy pass then holds little more than one policy's activation
memory (layer inputs only), so batching policies does not raise the trainer's peak memory."""

StepOutcome = StepResult | TrainingRejected | PoisonEventError


@dataclass
class _Policy:
    slot: int
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    steps: int = 0


@dataclass(frozen=True)
class _Item:
    policy_id: str
    policy: _Policy
    batch: Batch


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Stream agents call the trainer from worker threads; the shared model is not reentrant."""
    @wraps(method)
    def wrapper(self: MultiPolicyTrainer, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


class MultiPolicyTrainer:
    """Many policies' LoRA slots on one frozen base; one AdamW and step count per policy."""

    def __init__(
        self, base_path: Path, lora: LoraSpec, *, lr: float = 2e-2, clip_eps: float = 0.2,
        kl_beta: float = 0.0, max_grad_norm: float = 1.0, temperature: float = 1.0,
        seed: int = 0, dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
        checkpoint_above_tokens: int | None = CHECKPOINT_ABOVE_TOKENS,
        max_grad_norm_reject: float | None = None,
        pass_activation_mb: float | None = PASS_ACTIVATION_MB,
    ) -> None:
        base, self.tokenizer = load_base_model(Path(base_path))
        self.base = base.to(dtype=dtype)  # type: ignore[call-arg]
        self.multi = MultiLora.install(self.base, lora.target_modules)
        self.lora, self.lr, self.clip_eps, self.kl_beta = lora, lr, clip_eps, kl_beta
        self.max_grad_norm, self.temperature, self.seed = max_grad_norm, temperature, seed
        self.gradient_checkpointing = gradient_checkpointing  # True: every pass
        self.checkpoint_above_tokens = checkpoint_above_tokens
        # A pre-clip gradient norm above this rejects the step (clipping would hide a blow-up).
        self.max_grad_norm_reject = max_grad_norm_reject
        self.pass_activation_mb = pass_activation_mb  # None: every policy of a step in one pass
        # HF checkpoints a layer only in train mode, so `_pass` picks per pass with .train().
        self.base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        self.base.eval()
        self._policies: dict[str, _Policy] = {}
        self._next_slot = 0
        self._lock = threading.RLock()
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self._vocab = int(self.base.get_output_embeddings().weight.shape[0])
        self._token_mb = token_activation_mb(self.base.config, dtype)
        self._dtype = dtype

    def has_policy(self, policy_id: str) -> bool:
        return policy_id in self._policies

    def steps_done(self, policy_id: str) -> int:
        policy = self._policies.get(policy_id)
        return policy.steps if policy else 0

    def slot_of(self, policy_id: str) -> int:
        """The policy's routing slot (for sampling from its live adapter)."""
        return self._require(policy_id).slot

    def _policy(self, policy_id: str) -> _Policy:
        """Get or create; the init depends only on (seed, policy_id), as in PolicyTrainer."""
        if policy_id in self._policies:
            return self._policies[policy_id]
        gen = torch.Generator().manual_seed(policy_seed(self.seed, policy_id))
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        params = self.multi.add_slot(slot, self.lora.rank, self.lora.alpha, gen)
        policy = _Policy(slot, params, self._new_optimizer(params))
        self._policies[policy_id] = policy
        return policy

    def _new_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        # No weight decay: a zero-advantage step must not shrink the adapter. Fused: one kernel
        # for all of a policy's LoRA tensors, several times faster than foreach on CPU
        # (docs/performance.md); the same update up to rounding.
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0, fused=True)

    def _require(self, policy_id: str) -> _Policy:
        if policy_id not in self._policies:
            raise KeyError(f"unknown policy {policy_id!r}")
        return self._policies[policy_id]

    # -- the batched GRPO pass ----------------------------------------------------------------
    def _logps(self, packed: Packed, shape: tuple[int, int], keep_head: bool) -> torch.Tensor:
        """Token log-probs in the batch's [B, L-1] layout (as `token_logps`) from one decoder
        pass over the shared-prefix sequences; the LM head runs only on the hidden states that
        predict completion tokens, in chunks. `keep_head` keeps each chunk's log-softmax for
        backward (~4 bytes x vocab a token: small beside a decoder token's activations); else
        the chunk is recomputed in backward, so a big pass never holds more than one chunk."""
        decoder = getattr(self.base, self.base.base_model_prefix)
        hidden = decoder(input_ids=packed.ids, position_ids=packed.positions,
                         attention_mask=packed.attention_mask(self._dtype),
                         use_cache=False).last_hidden_state
        picked = hidden[packed.seq, packed.pos]
        head = self.base.get_output_embeddings()
        dtype = torch.promote_types(hidden.dtype, torch.float32)

        def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = head(h).to(dtype)
            if self.temperature != 1.0:
                logits = logits / self.temperature
            return torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1)

        targets = packed.targets
        parts = [chunk_logps(picked[i:i + HEAD_CHUNK], targets[i:i + HEAD_CHUNK]) if keep_head
                 else checkpoint(chunk_logps, picked[i:i + HEAD_CHUNK],
                                 targets[i:i + HEAD_CHUNK], use_reentrant=False)
                 for i in range(0, len(targets), HEAD_CHUNK)]
        flat = torch.cat(parts) if parts else picked.new_zeros(0, dtype=dtype)
        out = torch.zeros(shape, dtype=dtype)
        return out.index_put((packed.rows, packed.cols), flat)

    def _ref_logps(self, packed: Packed, shape: tuple[int, int]) -> torch.Tensor | None:
        """One shared base pass (LoRA off for every row) is the KL reference of all policies."""
        if self.kl_beta <= 0:
            return None
        with torch.no_grad(), self.multi.route([None] * packed.ids.shape[0]):
            return self._logps(packed, shape, keep_head=False)

    def _pass(self, items: list[_Item]) -> dict[str, tuple[float, float, float] | None]:
        """Forward + backward over all items' rows; per policy (loss, kl, clipped grad norm),
        or None when something of that policy is not finite. Grads are left in place."""
        batch = concat([it.batch for it in items], self._pad_id)
        row_slots: list[int | None] = [it.policy.slot for it in items
                                       for _ in range(it.batch.ids.shape[0])]
        packed = share_prefixes(batch, row_slots, self._pad_id)
        shape = (batch.ids.shape[0], batch.ids.shape[1] - 1)
        ref = self._ref_logps(packed, shape)
        bounds, start = [], 0
        for it in items:
            bounds.append((start, start + it.batch.ids.shape[0]))
            start = bounds[-1][1]
        recompute = self._checkpoint(packed.tokens)
        self.base.train(recompute)  # dropout is 0: train mode only checkpoints
        out: dict[str, tuple[float, float, float] | None] = {}
        try:
            with self.multi.route(packed.slots):  # kept through backward: for recomputation
                logp = self._logps(packed, shape, keep_head=not recompute)
                total: torch.Tensor | None = None
                for it, (s, e) in zip(items, bounds, strict=True):
                    mask = batch.cmask[s:e, 1:]
                    r = None if ref is None else ref[s:e]
                    loss = grpo_loss(logp[s:e], batch.old[s:e].to(logp.dtype), r,
                                     batch.adv[s:e], mask, self.clip_eps, self.clip_eps,
                                     self.kl_beta)
                    if not torch.isfinite(loss):
                        out[it.policy_id] = None
                        continue
                    kl = 0.0
                    if r is not None:
                        d = (r - logp[s:e]).detach()
                        kl = float(((torch.exp(d) - d - 1) * mask).sum() / mask.sum().clamp(min=1))
                    out[it.policy_id] = (float(loss.detach()), kl, 0.0)
                    total = loss if total is None else total + loss
                if total is not None and total.requires_grad:
                    total.backward()
        finally:
            self.base.eval()
        for it in items:
            done = out[it.policy_id]
            if done is None:
                continue
            grads = [p for p in it.policy.params if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm) if grads else \
                torch.tensor(0.0)
            out[it.policy_id] = (done[0], done[1], float(norm)) if torch.isfinite(norm) else None
        return out

    def _checkpoint(self, tokens: int) -> bool:
        limit = self.checkpoint_above_tokens
        return self.gradient_checkpointing or (limit is not None and tokens > limit)

    @staticmethod
    def _clear(items: list[_Item]) -> None:
        for it in items:
            for p in it.policy.params:
                p.grad = None

    @_locked
    def step_many(self, batches: dict[str, list[TrainGroup]]) -> dict[str, StepOutcome]:
        """Every policy's groups in batched passes (packed under `pass_activation_mb`); each
        valid policy steps once, exactly as it would alone.

        Returns, per policy, its StepResult or the exception that rejected it (poison input,
        non-finite reward/loss/gradient); a rejected policy's adapter and optimizer are untouched.
        """
        results: dict[str, StepOutcome] = {}
        items: list[_Item] = []
        for policy_id, groups in batches.items():
            try:
                validate_groups(groups, self._vocab)
            except (PoisonEventError, TrainingRejected) as exc:
                results[policy_id] = exc
                continue
            items.append(_Item(policy_id, self._policy(policy_id),
                               make_batch(groups, self._pad_id)))
        shapes = [packed_shape(it.batch) for it in items]
        for chunk in pack(shapes, self._token_mb, self.pass_activation_mb):
            self._train([items[i] for i in chunk], results)
        return {policy_id: results[policy_id] for policy_id in batches}

    def _train(self, items: list[_Item], results: dict[str, StepOutcome]) -> None:
        """One pass over `items`, then each valid policy steps; if anything in a multi-policy
        pass is not finite, the pass is redone one policy at a time (no 0 * NaN poisoning)."""
        self._clear(items)
        outcome = self._pass(items)
        if len(items) > 1 and any(v is None for v in outcome.values()):
            self._clear(items)
            outcome = {}
            for it in items:
                outcome.update(self._pass([it]))
        for it in items:
            self._apply(it, outcome[it.policy_id], results)

    def _apply(self, it: _Item, done: tuple[float, float, float] | None,
               results: dict[str, StepOutcome]) -> None:
        reject = self.max_grad_norm_reject
        if done is None:
            results[it.policy_id] = TrainingRejected(
                f"non-finite loss or gradient for policy {it.policy_id!r}")
        elif reject is not None and done[2] > reject:
            results[it.policy_id] = TrainingRejected(
                f"exploding gradient for policy {it.policy_id!r}: pre-clip norm {done[2]:.4g} "
                f"exceeds max_grad_norm_reject {reject:g}")
        else:
            it.policy.optimizer.step()
            it.policy.steps += 1
            loss, kl, norm = done
            results[it.policy_id] = StepResult(
                step=it.policy.steps, loss=loss, mean_reward=it.batch.mean_reward, kl=kl,
                grad_norm=norm, tokens=int(it.batch.cmask.sum()))
        for p in it.policy.params:
            p.grad = None

    def step(self, policy_id: str, groups: list[TrainGroup]) -> StepResult:
        """One policy's step (PolicyTrainer's API); raises what step_many would return."""
        result = self.step_many({policy_id: groups})[policy_id]
        if isinstance(result, Exception):
            raise result
        return result

    # -- weights, sampling, checkpoints ------------------------------------------------------
    @_locked
    @torch.no_grad()
    def logits(self, policy_id: str, input_ids: torch.Tensor) -> torch.Tensor:
        """The policy's logits for a batch (export round-trip checks and debugging)."""
        slot = self._require(policy_id).slot
        with self.multi.route([slot] * input_ids.shape[0]):
            return self.base(input_ids=input_ids).logits.float()

    @_locked
    def sample_many(
        self, requests: Sequence[tuple[list[int], str | None, int]], *, max_new_tokens: int,
        seed: int | None = None, stop_at_eos: bool = True,
    ) -> list[list[Completion]]:
        """(prompt ids, policy or None, n) requests from the LIVE adapters, in one pass, at the
        trainer's temperature, so the log-probs are this trainer's own GRPO `old` term.
        `stop_at_eos=False` always samples `max_new_tokens` (fixed-size work for benchmarks)."""
        reqs = [SampleRequest(prompt, None if pid is None else self._policy(pid).slot, n)
                for prompt, pid, n in requests]
        eos = int(self.tokenizer.eos_token_id) if stop_at_eos else -1  # -1: no token matches
        return sample_many(self.base, self.multi, reqs, max_new_tokens=max_new_tokens,
                           temperature=self.temperature, eos_id=eos, pad_id=self._pad_id,
                           seed=seed)

    @_locked
    def adapter_state(self, policy_id: str) -> dict[str, torch.Tensor]:
        """PEFT saved-key format (adapter name stripped), ready to export as a revision."""
        return self.multi.export(self._require(policy_id).slot)

    def _set_weights(self, policy: _Policy, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.multi.load(policy.slot, tensors)
        except ValueError as exc:
            raise PoisonEventError(str(exc)) from exc

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
        ckpt_io.save(directory, policy_id=policy_id, step=policy.steps, lora=self.lora,
                     adapter=self.adapter_state(policy_id), optimizer=policy.optimizer,
                     keys=list(self.multi.export(policy.slot)),
                     shapes=[list(p.shape) for p in policy.params])

    @_locked
    def load_checkpoint(self, policy_id: str, directory: Path) -> None:
        """Resume exactly where save_checkpoint left off (weights, moments, step)."""
        ckpt = ckpt_io.load(directory, self.lora)
        policy = self._policy(policy_id)
        shapes = ckpt.meta.get("shapes")
        if shapes is not None and shapes != [list(p.shape) for p in policy.params]:
            raise PoisonEventError(f"checkpoint in {directory} has other parameter shapes")
        self._set_weights(policy, ckpt.adapter)
        policy.optimizer = self._new_optimizer(policy.params)
        ckpt.restore_optimizer(policy.optimizer, len(policy.params))
        policy.steps = ckpt.step
