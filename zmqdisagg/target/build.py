"""Build a :class:`TargetModel` and its tokenizer from a local directory or a bundled config.

Guarantees:
- Never touches the Hugging Face Hub. A source is either a local HF directory (``config.json`` +
  ``*.safetensors`` + tokenizer files, loaded with ``local_files_only=True``) or a JSON/YAML model
  config (a path, or the name of a file in ``configs/`` such as ``tiny-llama``). Anything else,
  including a string that looks like a hub id, raises ``ConfigError`` saying what to pass.
- A config builds a random-init model that is bit-identical in every process for the same
  ``seed``, ``dtype`` and device type: weights are drawn directly in ``dtype`` on ``device`` under
  ``torch.random.fork_rng`` (the caller's global RNG is left untouched). CPU weights are the same on
  every machine; CUDA weights are the same across processes on one GPU model, but differ from the
  CPU ones (drawing an 8B model on the CPU takes minutes, on a GPU about a second).
- The attention kernel is set explicitly (``sdpa`` by default; ``eager`` also allowed) so that outputs
  do not depend on which optional kernels happen to be installed.
- A config picks its tokenizer with the key ``"zmqdisagg_tokenizer"``: ``"bytes"`` (the default) is the
  built-in byte tokenizer, any other value is a local tokenizer directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.target.model import TargetModel
from zmqdisagg.target.tokenizer import TOKENIZER_NAME, byte_tokenizer

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/
DEFAULT_CONFIG = "tiny-llama"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_YAML_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Source:
    """Where a target comes from: a local HF directory, or a model config (parsed)."""

    path: Path
    config: dict[str, Any] | None = None  # None for a directory


def load_target(path_or_config: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                attn_implementation: str = "sdpa") -> TargetModel:
    """Load a local HF directory or build a seeded random model from a config; wrap it as a TargetModel."""
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"--attn-implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    source = resolve_source(path_or_config)
    if source.config is None:
        model = _from_directory(source.path, torch_dtype, torch_device, attn_implementation)
    else:
        model = _from_config(source.config, torch_dtype, torch_device, seed, attn_implementation)
    logger.info("loaded target from %s (%s, %s)", source.path, dtype, torch_device)
    return TargetModel(model)


def load_tokenizer(path_or_config: str) -> Any:
    """The tokenizer for a target: the HF directory's own, or the one a config names (bytes by default)."""
    from transformers import AutoTokenizer

    source = resolve_source(path_or_config)
    if source.config is None:
        return _local_only(AutoTokenizer.from_pretrained, source.path)
    name = source.config.get("zmqdisagg_tokenizer", TOKENIZER_NAME)
    tok = byte_tokenizer() if name == TOKENIZER_NAME else _local_only(AutoTokenizer.from_pretrained, Path(name))
    vocab = source.config.get("vocab_size")
    if vocab is not None and len(tok) > vocab:
        raise ConfigError(f"{source.path}: vocab_size={vocab} is smaller than its tokenizer ({len(tok)} tokens); "
                          "raise vocab_size or pick another zmqdisagg_tokenizer")
    return tok


def resolve_source(path_or_config: str) -> Source:
    """Turn a CLI value into a :class:`Source`, or raise ``ConfigError`` explaining what to pass."""
    text = str(path_or_config)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is a directory without config.json; pass a Hugging Face model directory "
                              f"(config.json + *.safetensors) or a model config ({_bundled_hint()})")
        return Source(path=path)
    if path.is_file():
        return Source(path=path, config=read_model_config(path))
    bundled = _find_bundled(text)
    if bundled is not None:
        return Source(path=bundled, config=read_model_config(bundled))
    if _HUB_ID.match(text):
        raise ConfigError(f"no local path {text!r} exists, and a Hugging Face Hub id is never downloaded. Download it "
                          f"first (huggingface-cli download {text} --local-dir DIR) and pass DIR, or pass a model "
                          f"config ({_bundled_hint()})")
    raise ConfigError(f"no such model directory or config: {text!r}; pass a local Hugging Face model directory or "
                      f"a model config ({_bundled_hint()})")


def read_model_config(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML model config; it must be a mapping with ``model_type``."""
    if path.suffix not in _CONFIG_SUFFIXES:
        raise ConfigError(f"{path}: a model config must end in one of {_CONFIG_SUFFIXES}; to load weights pass "
                          "the directory that holds config.json")
    try:
        raw = path.read_text()
        data = json.loads(raw) if path.suffix == ".json" else _yaml_load(raw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(f"{path} is not a model config: it needs a \"model_type\" key (e.g. \"llama\")")
    return data


def bundled_configs() -> list[str]:
    """Names of the model configs shipped in ``configs/`` (other YAML there is ignored)."""
    names = []
    for path in sorted(CONFIG_DIR.glob("*")) if CONFIG_DIR.is_dir() else []:
        try:
            if path.suffix in _CONFIG_SUFFIXES and read_model_config(path):
                names.append(path.stem)
        except ConfigError:
            continue
    return names


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device must look like cpu, cuda or cuda:1, got {device!r}") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"--device must be cpu or cuda[:N], got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {device} asks for CUDA but this machine has no usable GPU; pass --device cpu")
    if (dev.index or 0) >= count:
        raise ConfigError(f"--device {device}: only cuda:0..cuda:{count - 1} exist")
    return dev


def _from_config(config: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int, attn: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if not k.startswith(("_", "zmqdisagg"))}
    try:
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    except Exception as exc:  # unknown model_type, or a field transformers' validators reject
        raise ConfigError(f"transformers cannot build this model config: {exc}") from exc
    # manual_seed reseeds the CPU and every GPU, so fork them all: the caller's RNG state comes back after.
    gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), torch.device(device):  # draw on the device: 8B in seconds
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)


def _from_directory(path: Path, dtype: torch.dtype, device: torch.device, attn: str) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = {"": str(device)}  # stream weights straight to the GPU
    model = _local_only(AutoModelForCausalLM.from_pretrained, path, **kwargs)
    return model.to(device)


def _local_only(loader: Any, path: Path, **kwargs: Any) -> Any:
    try:
        return loader(str(path), local_files_only=True, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {path} as a local Hugging Face directory: {exc}") from exc


def _find_bundled(name: str) -> Path | None:
    if Path(name).parent.name == "configs":  # "configs/tiny-llama.json" typed outside the repo root
        name = Path(name).name
    for candidate in (CONFIG_DIR / name, *(CONFIG_DIR / f"{name}{s}" for s in _CONFIG_SUFFIXES)):
        if candidate.is_file():
            return candidate
    return None


def _bundled_hint() -> str:
    names = bundled_configs()
    return f"one of {', '.join(names)} from {CONFIG_DIR}" if names else f"a JSON/YAML file like those in {CONFIG_DIR}"


def _yaml_load(raw: str) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise ConfigError("YAML model configs need PyYAML (pip install pyyaml), or use a .json config") from exc
    class Loader(yaml.SafeLoader):
        """YAML 1.1 reads ``1e-05`` (no dot) as a string; configs mean a float, as in JSON."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    try:
        return yaml.load(raw, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"invalid YAML: {exc}") from exc
