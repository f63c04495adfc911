"""``TrainConfig``: every knob of ``zmqdisagg-train`` (EAGLE3 and DFlash), validated once, loaded from YAML.

Guarantees:
  * a ``TrainConfig`` that exists is valid: ``__post_init__`` checks every field and raises
    ``ConfigError`` naming the field and a valid value;
  * YAML keys and CLI overrides go through the same constructor, so an unknown key in a YAML file is an
    error (``ConfigError: unknown key 'lr_max' in configs/x.yaml``), never silently ignored;
  * list values become tuples, so the config stays hashable and frozen.

The global batch is ``batch_size`` sequences per optimizer step, whatever the number of ranks: each of
``world_size`` ranks runs ``micro_batches`` micro-batches of ``batch_size / (world_size * micro_batches)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from zmqdisagg.errors import ConfigError
from zmqdisagg.target.types import TEACHER_MODES

ALGORITHMS = ("eagle3", "dflash")
TARGET_KINDS = ("local", "remote")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
EXPORT_ENGINES = ("sglang", "vllm")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """A draft-training run. Paths are relative to the working directory.

    Keys marked (eagle3) or (dflash) apply to that ``algorithm`` only; the rest serve both.
    """

    algorithm: str = "eagle3"  # eagle3 (one layer, TTT, draft vocab) or dflash (block diffusion)

    # -- target ------------------------------------------------------------------------------
    model: str = "configs/tiny-llama.json"  # target: HF dir/config json (local target, spawned servers)
    tokenizer: str | None = None  # None -> the target's tokenizer (load_tokenizer(model))
    target: str = "local"  # local: in this process; remote: zmqdisagg-serve over ZeroMQ
    servers: tuple[str, ...] = ()  # remote: server addresses, e.g. tcp://host:5555
    spawn_servers: int = 0  # remote: start this many loopback servers of `model` per rank
    transport: str | None = None  # remote: force a data-plane transport (inline, shm, ...)
    prefetch_depth: int = 0  # target requests kept in flight ahead of the trainer (0 = synchronous)
    target_dtype: str = "float32"  # local target / spawned servers
    teacher: str = "hidden"  # (eagle3) hidden: trainer computes target_p; target_p_*: the server ships it
    aux_layer_ids: tuple[int, ...] | None = None  # (eagle3) None -> the target's default EAGLE3 layers
    dflash_layer_ids: tuple[int, ...] | None = None  # (dflash) None -> default_dflash_layers(N, num_draft_layers)

    # -- data --------------------------------------------------------------------------------
    data_path: str = "data/demo-train.jsonl"
    demo_samples: int = 0  # >0: write this many synthetic dialogues to data_path if it is missing
    demo_seed: int = 0
    demo_target_steps: int = 0  # >0: if `model` is missing, train the tiny demo target there first (demo_target.py)
    eval_samples: int = 32  # held out from data_path (deterministic by seed); 0 disables eval
    max_length: int = 256
    draft_vocab_size: int = 256  # (eagle3)

    # -- draft -------------------------------------------------------------------------------
    ttt_length: int = 7  # (eagle3)
    step_decay: float = 0.8  # (eagle3) TTT step i weighs step_decay ** i
    block_size: int = 16  # (dflash) tokens per block: the anchor, then block_size-1 masks
    num_anchors: int = 512  # (dflash) most blocks per sequence
    loss_decay_gamma: float | None = None  # (dflash) block position k>0 weighs exp(-(k-1)/gamma); None = 1
    num_draft_layers: int = 1  # (dflash) decoder layers (eagle3 always has one)
    mask_token_id: int | None = None  # (dflash) None -> the tokenizer's mask token, else len(tokenizer)
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_heads
    intermediate_size: int | None = None  # None -> 4 * hidden_size
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    # -- optimisation ------------------------------------------------------------------------
    batch_size: int = 8  # global sequences per optimizer step
    micro_batches: int = 1  # per rank; gradients accumulate over them
    max_steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0

    # -- run ---------------------------------------------------------------------------------
    output_dir: str = "runs/eagle3"
    cache_dir: str | None = None  # None -> <output_dir>/cache
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = only at the end
    checkpoints: bool = True  # False: write no checkpoint at all (benchmarks; --resume then finds none)
    resume: bool = False
    export: bool = True  # write <output_dir>/export (SGLang/vLLM EAGLE3 draft) at the end
    export_engine: str = "sglang"  # sglang or vllm: how aux layer ids are numbered (see export.py)
    export_dtype: str = "bfloat16"
    device: str = "auto"
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default
    sync_timing: bool = False  # CUDA: synchronise around target waits so target_wait_ms/train_ms are exact
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_positive()
        if self.target == "remote" and not self.servers and self.spawn_servers == 0:
            raise ConfigError("target='remote' needs servers=[tcp://HOST:PORT, ...] or spawn_servers >= 1")
        if self.target == "local" and (self.servers or self.spawn_servers):
            raise ConfigError("servers/spawn_servers are set but target='local'; set target='remote'")
        if not 0.0 < self.step_decay <= 1.0:
            raise ConfigError(f"step_decay={self.step_decay} must be in (0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self._check_dflash()

    def _check_dflash(self) -> None:
        if self.block_size < 2:
            raise ConfigError(f"block_size={self.block_size} must be >= 2 (the anchor plus at least one mask)")
        if self.loss_decay_gamma is not None and self.loss_decay_gamma <= 0:
            raise ConfigError(f"loss_decay_gamma={self.loss_decay_gamma} must be > 0 (or null for no decay)")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise ConfigError(f"mask_token_id={self.mask_token_id} must be a token id >= 0")
        if self.algorithm == "dflash" and self.teacher != "hidden":
            raise ConfigError(f"teacher={self.teacher!r} applies to algorithm='eagle3' only; DFlash trains on "
                              "the data's tokens, so leave teacher at 'hidden'")

    def _check_choices(self) -> None:
        for name, choices in (("algorithm", ALGORITHMS), ("target", TARGET_KINDS), ("device", DEVICES),
                              ("target_dtype", DTYPES), ("teacher", TEACHER_MODES),
                              ("export_engine", EXPORT_ENGINES), ("export_dtype", EXPORT_DTYPES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {choices}")

    def _check_positive(self) -> None:
        for name in ("max_length", "draft_vocab_size", "ttt_length", "num_heads", "num_kv_heads",
                     "batch_size", "micro_batches", "max_steps", "num_anchors", "num_draft_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("spawn_servers", "prefetch_depth", "demo_samples", "demo_target_steps", "eval_samples",
                     "warmup_steps",
                     "eval_every", "save_every", "num_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.max_length < 4:
            raise ConfigError(f"max_length={self.max_length} must be >= 4 to leave room for the shift")

    def micro_batch_size(self, world_size: int) -> int:
        """Sequences per micro-batch on each rank; raises if the global batch does not split evenly."""
        parts = world_size * self.micro_batches
        if self.batch_size % parts:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by world_size*micro_batches"
                              f"={world_size}*{self.micro_batches}")
        return self.batch_size // parts

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **_normalise(changes, "overrides"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        return cls(**_normalise(values, source))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Load ``path`` and apply ``overrides`` (CLI flags; ``None`` values are ignored)."""
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of TrainConfig fields, got {type(values).__name__}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, str(path))


_FIELDS = {f.name for f in fields(TrainConfig)}
_KINDS = {f.name: type(f.default) for f in fields(TrainConfig) if type(f.default) in (int, float, bool, str)}
_KINDS.update(head_dim=int, intermediate_size=int, tokenizer=str, transport=str, cache_dir=str,
              loss_decay_gamma=float, mask_token_id=int)


def _normalise(values: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {source}; valid keys: {', '.join(sorted(_FIELDS))}")
    out = {k: _coerce(k, v) for k, v in values.items()}
    if isinstance(out.get("servers"), str):
        out["servers"] = tuple(s for s in out["servers"].split(",") if s)
    return out


def _coerce(name: str, v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string and ints where floats are meant; fix both, reject the rest."""
    if isinstance(v, list):
        return tuple(v)
    kind = _KINDS.get(name)
    if v is None or kind is None:
        return v
    if kind is float and isinstance(v, (int, float, str)) and not isinstance(v, bool):
        try:
            return float(v)
        except ValueError:
            pass
    if isinstance(v, kind) and not (kind is int and isinstance(v, bool)):
        return v
    raise ConfigError(f"{name}={v!r} must be of type {kind.__name__}")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
