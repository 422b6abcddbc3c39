"""The one home for "is this an ONNX Runtime GenAI model folder": checks, size, weights hash, chat template.

Every stage that takes a genai folder (the flavor, the benchmark, the deployment) checks it here, so a
broken folder gets the same one-line error wherever it is found.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow_slmops import errors

GENAI_CONFIG = "genai_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer.model", "vocab.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# ONNX external-data files are read in chunks of this size when hashing.
_HASH_CHUNK = 1 << 20
# Bits of one element of each fixed-size ONNX TensorProto data type (FLOAT, UINT8, INT8, UINT16, INT16, INT32,
# INT64, BOOL, FLOAT16, DOUBLE, UINT32, UINT64, BFLOAT16, UINT4, INT4); 4-bit types pack two elements a byte.
# Strings and types not listed have no fixed size: their bytes are measured.
ONNX_ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
                     21: 4, 22: 4}
BITS_PER_BYTE = 8


def tensor_bytes(data_type: int, dims) -> int | None:
    """Bytes of a dense tensor's raw data from its type and dims, or None for a type of no fixed size."""
    bits = ONNX_ELEMENT_BITS.get(data_type)
    return None if bits is None else -(-math.prod(dims) * bits // BITS_PER_BYTE)


@dataclass(frozen=True)
class GenaiDirInfo:
    """What a checked genai folder is: read from its genai_config.json and files."""

    path: str
    model_type: str
    context_length: int
    execution_provider: str
    onnx_files: tuple[str, ...]
    size_bytes: int
    has_chat_template: bool

    def to_dict(self) -> dict:
        return asdict(self)


def read_json_or_empty(path: Path | None) -> dict:
    """A JSON object from path, or {} when it is missing, unreadable, not JSON or not an object."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.SlmopsError(f"cannot read {what} {path}: {exc.strerror or exc}",
                                 "check the file exists and is readable")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.SlmopsError(
            f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            "re-export the model folder or fix the file",
        )
    if not isinstance(data, dict):
        raise errors.SlmopsError(f"{what} {path} holds a JSON {type(data).__name__}, expected an object",
                                 "re-export the model")
    return data


def read_genai_config(model_dir: str | Path) -> dict:
    """Read and minimally validate genai_config.json; raise SlmopsError naming the file on any fault."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise errors.SlmopsError(f"model folder {model_dir} does not exist",
                                 "pass the folder that holds genai_config.json")
    if not model_dir.is_dir():
        raise errors.SlmopsError(f"model path {model_dir} is a file, expected a folder",
                                 "pass the folder that holds genai_config.json")
    cfg_path = model_dir / GENAI_CONFIG
    if not cfg_path.is_file():
        raise errors.SlmopsError(
            f"{model_dir} has no {GENAI_CONFIG}, so it is not an ONNX Runtime GenAI model folder",
            "convert the Hugging Face model first with `slmops convert`",
        )
    cfg = _read_json(cfg_path, GENAI_CONFIG)
    decoder = cfg.get("model", {}).get("decoder") if isinstance(cfg.get("model"), dict) else None
    if not isinstance(decoder, dict) or "filename" not in decoder:
        raise errors.SlmopsError(
            f"{cfg_path} has no model.decoder.filename, expected the layout onnxruntime-genai writes",
            "re-export the model folder with the model builder",
        )
    return cfg


def _external_data_refs(onnx_path: Path) -> dict[str, int]:
    """Map each external-data file of an ONNX model to the byte length its tensors need."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    needed: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        loc = info["location"]
        needed[loc] = max(needed.get(loc, 0), end)
    return needed


def check_onnx_files(model_dir: Path, filename: str) -> list[str]:
    """Check the decoder ONNX file and its external data exist and are complete. Return the file names."""
    onnx_path = model_dir / filename
    ensure_inside(model_dir, onnx_path, what=f"{GENAI_CONFIG} model.decoder.filename")
    if not onnx_path.is_file():
        raise errors.SlmopsError(f"{onnx_path} is missing (named by {GENAI_CONFIG})", "re-export the model folder")
    try:
        refs = _external_data_refs(onnx_path)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt protobuf
        raise errors.SlmopsError(f"{onnx_path} is not a readable ONNX model ({type(exc).__name__})",
                                 "re-export the model folder")
    files = [filename]
    for loc, needed in refs.items():
        data_path = (model_dir / loc)
        ensure_inside(model_dir, data_path, what=f"external data of {filename}")
        if not data_path.is_file():
            raise errors.SlmopsError(f"{data_path} is missing (external data of {filename})",
                                     "copy the whole model folder")
        have = data_path.stat().st_size
        if have < needed:
            raise errors.SlmopsError(
                f"{data_path} is truncated: {have} bytes, the model needs {needed}",
                "copy or download the model folder again",
            )
        files.append(loc)
    return files


def ensure_inside(root: Path, candidate: Path, what: str = "file") -> None:
    """Refuse a path (or symlink) that resolves outside root."""
    root_r = Path(root).resolve()
    cand_r = Path(candidate).resolve()
    if cand_r != root_r and root_r not in cand_r.parents:
        raise errors.SlmopsError(
            f"{what} {candidate} points outside the model folder {root} (to {cand_r})",
            "remove the symlink or absolute/.. path and copy the real file into the folder",
        )


def check_no_escaping_links(model_dir: Path) -> None:
    """Refuse a folder with any symlink that leads outside it."""
    for dirpath, dirnames, filenames in os.walk(model_dir):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                ensure_inside(model_dir, p, what="symlink")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in TOKENIZER_FILES)


def read_chat_template(model_dir: str | Path) -> str | None:
    """The model's own chat template: chat_template.jinja first, then tokenizer_config.json."""
    model_dir = Path(model_dir)
    jinja = model_dir / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        text = jinja.read_text(encoding="utf-8")
        return text if text.strip() else None
    tok_cfg = model_dir / TOKENIZER_CONFIG
    if tok_cfg.is_file():
        try:
            template = json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) and template.strip() else None
    return None


def token_ids(model_dir: str | Path) -> dict[str, int]:
    """Single tokens of the tokenizer by text: its added tokens (special or not) and a BPE's vocabulary."""
    data = read_json_or_empty(Path(model_dir) / TOKENIZER_JSON)
    ids: dict[str, int] = {}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids.update({k: v for k, v in vocab.items() if isinstance(v, int)})
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and isinstance(tok.get("id"), int):
            ids[tok["content"]] = tok["id"]
    return ids


def dir_size_bytes(model_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file() and not p.is_symlink())


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the ONNX graph files and their external data, in name order: the model's identity."""
    model_dir = Path(model_dir)
    cfg = read_genai_config(model_dir)
    files = check_onnx_files(model_dir, cfg["model"]["decoder"]["filename"])
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        with open(model_dir / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_genai_dir(model_dir: str | Path) -> GenaiDirInfo:
    """Check a genai folder fully and describe it. Raises SlmopsError naming the file and the fix."""
    model_dir = Path(model_dir)
    cfg = read_genai_config(model_dir)
    check_no_escaping_links(model_dir)
    decoder = cfg["model"]["decoder"]
    onnx_files = check_onnx_files(model_dir, decoder["filename"])
    if not has_tokenizer(model_dir):
        raise errors.SlmopsError(
            f"{model_dir} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})",
            "copy the tokenizer files from the Hugging Face model folder",
        )
    providers = decoder.get("session_options", {}).get("provider_options", [])
    ep = next(iter(providers[0]), "cpu") if providers else "cpu"
    return GenaiDirInfo(
        path=str(model_dir),
        model_type=str(cfg["model"].get("type", "unknown")),
        context_length=int(cfg["model"].get("context_length", 0) or 0),
        execution_provider=ep,
        onnx_files=tuple(onnx_files),
        size_bytes=dir_size_bytes(model_dir),
        has_chat_template=read_chat_template(model_dir) is not None,
    )


def onnx_weight_bytes(model_dir: str | Path, exclude: tuple[str, ...] = ()) -> int:
    """Bytes of all initializers of the decoder graph (but those named in ``exclude``): what one decode step
    reads from memory."""
    import onnx

    model_dir = Path(model_dir)
    cfg = read_genai_config(model_dir)
    model = onnx.load(str(model_dir / cfg["model"]["decoder"]["filename"]), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if init.name in exclude:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            total += int(info.get("length", 0))
        else:
            size = tensor_bytes(init.data_type, init.dims)
            total += size if size is not None else len(init.raw_data)
    return total
