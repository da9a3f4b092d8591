"""In-process reference sampler over peft: one frozen base, named LoRA adapters, log-probs.

Tests and experiments use it as the peft-backed reference; the pipeline itself samples through
SGLang's HTTP API (`workers/serving/sampling.py`).

The log-probs it returns are GRPO's `old` term, so they must be exactly what the trainer would
compute for the same tokens: log_softmax(logits / temperature) with no other logit processing
(no top-k/top-p/repetition penalty), and dropout-free adapters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import peft
import torch

from workers.models.base import load_base_model
from workers.models.chat import render_prompt
from workers.serving.sampling import Sample

_PLACEHOLDER = "_engine_placeholder"
"""A rank-1 zero adapter that keeps the PeftModel valid when no real adapter is loaded."""


class LocalEngine:
    """Loads the base once and attaches adapters by name, evicting least-recently-used ones."""

    def __init__(self, base_path: Path, *, max_loaded: int = 64) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        base, self.tokenizer = load_base_model(Path(base_path))
        placeholder = peft.LoraConfig(r=1, target_modules="all-linear", lora_dropout=0.0,
                                      init_lora_weights=True)
        # peft does not support deleting the last adapter, so one inert adapter always stays.
        self.model = peft.get_peft_model(base, placeholder, adapter_name=_PLACEHOLDER)
        self.model.eval()
        self.model.requires_grad_(False)
        self.max_loaded = max_loaded
        self._adapters: OrderedDict[str, str] = OrderedDict()  # public name -> peft name
        self._counter = 0
        self._lock = threading.RLock()

    def load_adapter(self, name: str, path: Path) -> None:
        """Attach a PEFT adapter dir under `name`; a name already loaded is only touched (LRU)."""
        with self._lock:
            if name in self._adapters:
                self._adapters.move_to_end(name)
                return
            while len(self._adapters) >= self.max_loaded:
                self.unload_adapter(next(iter(self._adapters)))
            # Public names may hold characters torch module names reject ('.'), so map them.
            self._counter += 1
            internal = f"engine_adapter_{self._counter}"
            self.model.load_adapter(str(path), adapter_name=internal, is_trainable=False)
            self.model.requires_grad_(False)
            self._adapters[name] = internal

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            internal = self._adapters.pop(name, None)
            if internal is None:
                raise KeyError(f"adapter {name!r} is not loaded")
            self.model.set_adapter(_PLACEHOLDER)
            self.model.delete_adapter(internal)

    def loaded_adapters(self) -> list[str]:
        """Loaded names, least recently used first."""
        with self._lock:
            return list(self._adapters)

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def render(self, prompt: str, messages: list[dict[str, str]] | None = None) -> list[int]:
        """The prompt ids the pipeline's sampler sends (`workers.models.chat`)."""
        return render_prompt(self.tokenizer, prompt, messages)

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        adapter: str | None,
        *,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
        greedy: bool = False,
    ) -> list[list[Sample]]:
        """Sample `n` completions per prompt in one left-padded batched generate (KV cache)."""
        if n < 1 or max_new_tokens < 1 or temperature <= 0.0:
            raise ValueError("need n >= 1, max_new_tokens >= 1, temperature > 0")
        if not prompts:
            return []
        with self._lock:
            internal = self._use(adapter)
            ids = [p if isinstance(p, list) else self.encode(p) for p in prompts]
            batch = dict(self.tokenizer.pad({"input_ids": [p for p in ids for _ in range(n)]},
                                            return_tensors="pt"))
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                out = self._generate(batch, internal, max_new_tokens, temperature, greedy)
        samples = self._to_samples(out, batch["input_ids"].shape[1], temperature)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _use(self, adapter: str | None) -> str | None:
        if adapter is None:
            return None
        if adapter not in self._adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        self._adapters.move_to_end(adapter)
        return self._adapters[adapter]

    @torch.no_grad()
    def _generate(self, batch: dict[str, torch.Tensor], internal: str | None,
                  max_new_tokens: int, temperature: float, greedy: bool) -> object:
        kwargs = dict(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_k=None,
            top_p=None,
            min_p=None,
            repetition_penalty=None,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
        )
        if internal is None:
            with self.model.disable_adapter():
                return self.model.generate(**kwargs)
        self.model.set_adapter(internal)
        return self.model.generate(**kwargs)

    def _to_samples(self, out: object, prompt_len: int, temperature: float) -> list[Sample]:
        """Cut each row after its EOS and attach log_softmax(raw logits / T) of chosen tokens."""
        new = out.sequences[:, prompt_len:]  # type: ignore[attr-defined]
        logits = torch.stack(out.logits, dim=1).float()  # type: ignore[attr-defined]
        logps = torch.log_softmax(logits / temperature, dim=-1)
        chosen = logps.gather(-1, new[..., None]).squeeze(-1)
        eos = self.tokenizer.eos_token_id
        samples = []
        for row, row_lp in zip(new.tolist(), chosen.tolist(), strict=True):
            length = row.index(eos) + 1 if eos in row else len(row)
            ids = row[:length]
            samples.append(Sample(
                text=str(self.tokenizer.decode(ids, skip_special_tokens=True)),
                token_ids=ids,
                logprobs=row_lp[:length],
                finished=eos in ids,
            ))
        return samples
