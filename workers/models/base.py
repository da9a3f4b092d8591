"""The shared frozen base: a tiny local Llama for tests and demos, loading, identity, LoRA spec.

Nothing here downloads: the tiny model and its character-level tokenizer are built from code,
so the whole pipeline runs offline and every test sees the same base. torch, transformers and
peft are imported by the functions that use them, so naming a `LoraSpec` (the CLI, the stages'
configs) stays cheap.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import peft
    import torch
    from transformers import (
        LlamaForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_EOS_ROW_SCALE = 3.0
"""How much larger the EOS row of the LM head is than the others.

A random LM head is symmetric over tokens, so EOS would get ~1/vocab of the mass and almost no
completion would finish within a few tokens. A larger EOS row makes EOS likely in some contexts
and unlikely in others, so completion lengths vary and a length reward has something to learn.
"""
_LM_HEAD_STD = 0.15


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII char, so any text round-trips and lengths are char counts."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    # BPE without merges and without a pre-tokenizer splits a string into its characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )


def _tiny_model(vocab_size: int, tokenizer: PreTrainedTokenizerFast, seed: int,
                hidden_size: int, num_layers: int) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.05,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        head = model.lm_head.weight
        with torch.no_grad():
            head.normal_(0.0, _LM_HEAD_STD)
            head[tokenizer.eos_token_id] *= _EOS_ROW_SCALE
    return model


def is_complete_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def build_tiny_model(
    out_dir: Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> Path:
    """Build (once) a tiny random Llama and its char tokenizer in `out_dir`."""

    def write(tmp: Path) -> None:
        tokenizer = _char_tokenizer()
        _tiny_model(len(tokenizer), tokenizer, seed, hidden_size, num_layers).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_model_dir(out_dir, write)


def build_model_dir(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write` into a sibling temp dir and rename it into place, once: a concurrent reader
    never sees half a model, and a crashed build leaves nothing that looks complete."""
    out_dir = Path(out_dir)
    if is_complete_model_dir(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, out_dir)  # replaces a missing or empty out_dir atomically
        except OSError:
            if not is_complete_model_dir(out_dir):  # someone else won the race: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_base(name: Path | str) -> Path:
    """A base as a local directory: `name` itself, or a hub id (`org/model`) already in the
    local Hugging Face cache. Never downloads: a missing base is a clear error."""
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base model directory {path} has no config.json")
        return path
    repo = str(name)
    if repo.count("/") == 1 and not repo.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"base model {repo!r} is not in the local Hugging Face cache, and lorastream "
                f"never downloads at run time: fetch it first (huggingface-cli download {repo})"
                f" or point LORASTREAM_BASE_MODEL at a local directory ({exc})") from exc
    raise FileNotFoundError(f"base model {str(name)!r} is neither a local directory nor a "
                            "hub id (org/name) in the local Hugging Face cache")


def load_base_model(path: Path | str, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load through the real from_pretrained path, frozen, so tests see what prod sees (a local
    directory or a cached hub id, `resolve_base`); `dtype` None means float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.models.attention import use_gqa_attention

    path = resolve_base(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32 if dtype is None else dtype)
    model.to(device)  # type: ignore[arg-type]
    use_gqa_attention(model)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def base_model_hash(path: Path | str) -> str:
    """Stable id of a base: the sha256 of its config and weight files (adapters are only valid
    on the exact weights they were trained on, whatever name the base was loaded by)."""
    path = resolve_base(path)
    digest = hashlib.sha256()
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    files = [path / "config.json", *weights]
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoraSpec:
    """The adapter shape every policy of a pipeline shares (one export format, one serve config).

    `target_modules` are registry tokens (`workers.models.registry`): groups `attn`, `mlp`,
    `shared`, `experts` (or `all`), or module leaf names such as `q_proj`; each base resolves
    them to its own modules (MLA projections on DeepSeek, fused experts on MoE bases, ...).
    """

    rank: int = 4
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ("attn", "mlp", "shared", "experts")

    def peft_config(self, model: torch.nn.Module) -> peft.LoraConfig:
        """peft's config for `model` (targets resolved by the registry; dropout 0, so sampler
        and trainer compute the same log-probs)."""
        import peft

        from workers.models.registry import resolve

        fields = resolve(model, self.target_modules).peft_fields()
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft accepts floats; its hint says int
            target_modules=fields["target_modules"] or None,
            target_parameters=fields.get("target_parameters"),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
